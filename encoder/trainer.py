"""jagpt's BPE trainer, compiled with numba: a 1 GB sample in minutes and a few GB.

The tokenizers library's trainer keeps, for every distinct pre-tokenizer
piece, a vector of 32-byte symbols, and for every pair a hash set of the
pieces that hold it: about 28 bytes of memory per byte of varied Japanese
text, so a 1 GB sample does not fit in 24 GB. This trainer does the same
greedy BPE in flat arrays:

1. :class:`PieceCounter` cuts the text into pre-tokenizer pieces (the
   compiled encoder's own cutter, :func:`encoder.kernels.piece_end`) and
   counts the distinct ones in a hash table, keeping each distinct piece's
   code points once. The text is fed in chunks, so it is never held whole as
   code points.
2. The alphabet is the most frequent characters (ties by code point); a
   character outside it is a barrier that no merge crosses, as its byte
   tokens will be at encode time.
3. Every distinct piece with two symbols or more goes into one array of
   symbol ids, separated by barriers, with the piece's count beside each
   position (8 bytes per character).
4. Each pair's count is kept in a hash table, with a linked list of the
   positions where it was seen (8 bytes per entry). The most frequent pair
   (ties: the smaller ids, so the earlier-learned tokens) is merged at each of
   its positions, left to right, and the counts of the pairs around it are
   updated; a max-heap of (count, pair) with lazy re-checks finds the next.
   Removed positions are marked in place, so neighbours are found by skipping
   at most a token's length.

A merge whose token is longer than ``max_token_length`` characters is never
counted; a merge that spells an existing token reuses its id. Tests hold the
result to a plain-Python definition of the same BPE.
"""

from __future__ import annotations

import logging

import numba
import numpy as np

from encoder.kernels import _pop, _push, char_classes, piece_end

log = logging.getLogger(__name__)

BARRIER = -1
REMOVED = -2
_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_PRIME = np.uint64(0x100000001B3)
REPORT_EVERY = 2000  # merges between progress lines
MAX_POSITIONS = 2**31 - 1  # positions and list entries are int32


@numba.njit(cache=True, nogil=True, inline="always")
def _slot(key, mask):
    return np.intp((key * _MIX) >> np.uint64(32)) & mask


# -- 1. distinct pieces -------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _count_pieces(codes, seg_start, seg_end, classes, keys, ids, start, length, count, arena, n, used):
    """Add the pieces of each segment to the table; returns the (maybe grown) arrays and counts."""
    for k in range(seg_start.shape[0]):
        i = seg_start[k]
        end = seg_end[k]
        while i < end:
            j = piece_end(codes, i, end, classes)
            h = np.uint64(j - i)
            for t in range(i, j):
                h = h * _PRIME + np.uint64(codes[t])
            mask = keys.shape[0] - 1
            s = _slot(h, mask)
            found = -1
            while keys[s] != _EMPTY:
                if keys[s] == h:
                    p = ids[s]
                    if length[p] == j - i:
                        same = True
                        for t in range(j - i):
                            if arena[start[p] + t] != codes[i + t]:
                                same = False
                                break
                        if same:
                            found = p
                            break
                s = (s + 1) & mask
            if found >= 0:
                count[found] += 1
            else:
                if n == start.shape[0]:
                    start = _grown(start, n + 1)
                    length = _grown(length, n + 1)
                    count = _grown(count, n + 1)
                if used + (j - i) > arena.shape[0]:
                    arena = _grown(arena, used + (j - i))
                arena[used:used + (j - i)] = codes[i:j]
                start[n] = used
                length[n] = j - i
                count[n] = 1
                keys[s] = h
                ids[s] = n
                used += j - i
                n += 1
                if 2 * n > keys.shape[0]:
                    keys, ids = _rehash(keys, ids)
            i = j
    return keys, ids, start, length, count, arena, n, used


@numba.njit(cache=True, nogil=True)
def _grown(a, need):
    bigger = np.empty(max(need, a.shape[0] + a.shape[0] // 2 + 16), a.dtype)
    bigger[: a.shape[0]] = a
    return bigger


@numba.njit(cache=True, nogil=True)
def _rehash(keys, ids):
    new_keys, moved = _rehashed(keys)
    new_ids = np.empty(new_keys.shape[0], ids.dtype)
    new_ids[moved[moved >= 0]] = ids[moved >= 0]
    return new_keys, new_ids


@numba.njit(cache=True, nogil=True)
def _rehashed(keys):
    """A table twice the size with the same keys, and each old slot's new slot (-1: empty)."""
    new_keys = np.full(2 * keys.shape[0], _EMPTY, np.uint64)
    moved = np.full(keys.shape[0], -1, np.int64)
    mask = new_keys.shape[0] - 1
    for s in range(keys.shape[0]):
        if keys[s] != _EMPTY:
            t = _slot(keys[s], mask)
            while new_keys[t] != _EMPTY:
                t = (t + 1) & mask
            new_keys[t] = keys[s]
            moved[s] = t
    return new_keys, moved


class PieceCounter:
    """The distinct pre-tokenizer pieces of the text fed to it, with their counts."""

    def __init__(self):
        self.classes = char_classes()
        self.keys = np.full(1 << 16, _EMPTY, np.uint64)
        self.ids = np.empty(1 << 16, np.int64)
        self.start = np.empty(1 << 12, np.int64)
        self.length = np.empty(1 << 12, np.int32)
        self.count = np.empty(1 << 12, np.int64)
        self.arena = np.empty(1 << 16, np.uint32)
        self.n = 0
        self.used = 0

    def feed(self, texts: list[str]) -> None:
        """Count the pieces of ``texts``: each text is cut on its own."""
        codes = np.frombuffer("".join(texts).encode("utf-32-le"), np.uint32)
        lengths = np.fromiter((len(t) for t in texts), np.int64, len(texts))
        ends = np.cumsum(lengths)
        (self.keys, self.ids, self.start, self.length, self.count, self.arena, self.n, self.used) = _count_pieces(
            codes, ends - lengths, ends, self.classes, self.keys, self.ids, self.start, self.length, self.count,
            self.arena, self.n, self.used)

    def pieces(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(code points of every distinct piece end to end, starts, lengths, counts)."""
        n = self.n
        return self.arena[: self.used], self.start[:n], self.length[:n], self.count[:n]

    def char_counts(self) -> np.ndarray:
        """How often each code point occurs in the text fed (weighted by piece count)."""
        arena, start, length, count = self.pieces()
        return np.bincount(arena, weights=np.repeat(count, length), minlength=0x110000)

    def clear(self) -> None:
        """Free the counts (:func:`learn` does, once it has the symbols)."""
        self.__init__()

    def as_dict(self) -> dict[str, int]:
        arena, start, length, count = self.pieces()
        text = arena.tobytes().decode("utf-32-le")
        return {text[s:s + n]: int(c) for s, n, c in zip(start, length, count)}


def alphabet(char_counts: np.ndarray, limit: int) -> np.ndarray:
    """The ``limit`` most frequent code points, ties broken by code point, in code point order."""
    seen = np.flatnonzero(char_counts)
    top = seen[np.lexsort((seen, -char_counts[seen]))][:limit]
    return np.sort(top)


# -- 2-4. merges ----------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _symbols(arena, start, length, count, char_tok):
    """One array of symbol ids for every piece with a pair, barriers between; the piece count per position."""
    total = 1
    for p in range(start.shape[0]):
        if length[p] >= 2:
            total += length[p] + 1
    sym = np.full(total, BARRIER, np.int32)
    weight = np.zeros(total, np.int32)
    i = 1
    for p in range(start.shape[0]):
        if length[p] < 2:
            continue
        for t in range(length[p]):
            sym[i] = char_tok[arena[start[p] + t]]
            weight[i] = count[p]
            i += 1
        i += 1  # the barrier after the piece
    return sym, weight


@numba.njit(cache=True, nogil=True)
def _pair_slot(pkeys, a, b):
    key = (np.uint64(a) << np.uint64(32)) | np.uint64(b)
    mask = pkeys.shape[0] - 1
    s = _slot(key, mask)
    while pkeys[s] != _EMPTY and pkeys[s] != key:
        s = (s + 1) & mask
    return s, key


@numba.njit(cache=True, nogil=True)
def _heap_push(heap, size, item):
    if size == heap.shape[0]:
        heap = _grown(heap, size + 1)
    return heap, _push(heap, size, item)


@numba.njit(cache=True, nogil=True)
def _heap_key(count, a, b):
    # Min-heap order: the higher count, then the smaller ids (ids < 2**16).
    return -((np.int64(count) << 32) | (np.int64(0xFFFF - a) << 16) | np.int64(0xFFFF - b))


@numba.njit(cache=True)  # not nogil: it reports progress through the interpreter
def _learn(sym, weight, tok_chars, tok_start, tok_len, n_tokens, target, min_frequency, max_len):
    """Greedy BPE on ``sym`` until ``target`` tokens. Tokens ``0 .. n_tokens-1`` are the
    alphabet (their characters in ``tok_chars``). Returns the merges as (a, b, new id) rows
    and the grown token arrays."""
    n = sym.shape[0]
    # Pair table: key, count, head of the list of positions seen, stamp of the last merge that touched it.
    pkeys = np.full(1 << 16, _EMPTY, np.uint64)
    pcount = np.zeros(1 << 16, np.int64)
    phead = np.full(1 << 16, -1, np.int32)
    pstamp = np.full(1 << 16, -1, np.int32)
    n_pairs = 0
    # Position lists: entry e says "pair seen at lpos[e]", next entry lnext[e]. Room for
    # three entries per position is reserved, not touched: the pages are mapped as they fill.
    lpos = np.empty(3 * n + 16, np.int32)
    lnext = np.empty(3 * n + 16, np.int32)
    n_entries = 0
    # Initial pairs, inserted right to left so each list reads left to right.
    for p in range(n - 2, 0, -1):
        a = sym[p]
        b = sym[p + 1]
        if a < 0 or b < 0 or tok_len[a] + tok_len[b] > max_len:
            continue
        s, key = _pair_slot(pkeys, a, b)
        if pkeys[s] == _EMPTY:
            pkeys[s] = key
            n_pairs += 1
        pcount[s] += weight[p]
        lpos[n_entries] = p
        lnext[n_entries] = phead[s]
        phead[s] = n_entries
        n_entries += 1
        if 2 * n_pairs > pkeys.shape[0]:
            pkeys, pcount, phead, pstamp = _rehash_pairs(pkeys, pcount, phead, pstamp)
    heap = np.empty(max(16, n_pairs), np.int64)
    size = 0
    for s in range(pkeys.shape[0]):
        if pkeys[s] != _EMPTY and pcount[s] > 0:
            heap, size = _heap_push(heap, size, _heap_key(pcount[s], np.int64(pkeys[s] >> np.uint64(32)),
                                                          np.int64(pkeys[s] & np.uint64(0xFFFFFFFF))))
    # Token strings, to reuse the id of a merge that spells an existing token.
    tbits = 4
    while (1 << tbits) < 4 * target:
        tbits += 1
    tkeys = np.full(1 << tbits, _EMPTY, np.uint64)
    tids = np.empty(1 << tbits, np.int64)
    for t in range(n_tokens):
        _token_slot_insert(tkeys, tids, tok_chars, tok_start, tok_len, t)
    merges = np.empty((max(target - n_tokens, 1) * 2, 3), np.int64)
    n_merges = 0
    touched = np.empty(64, np.int64)
    positions = np.empty(64, np.int32)
    while n_tokens < target and size > 0:
        top, size = _pop(heap, size)
        top = -top
        stored = top >> 32
        a = 0xFFFF - ((top >> 16) & 0xFFFF)
        b = 0xFFFF - (top & 0xFFFF)
        s, key = _pair_slot(pkeys, a, b)
        if pcount[s] != stored:
            if pcount[s] > 0:
                heap, size = _heap_push(heap, size, _heap_key(pcount[s], a, b))
            continue
        if stored < min_frequency:
            break
        # The merged token: an existing one with the same characters, or a new id.
        new_len = tok_len[a] + tok_len[b]
        if tok_start[n_tokens - 1] + tok_len[n_tokens - 1] + new_len > tok_chars.shape[0]:
            tok_chars = _grown(tok_chars, tok_chars.shape[0] + new_len)
        if n_tokens == tok_start.shape[0]:
            tok_start = _grown(tok_start, n_tokens + 1)
            tok_len = _grown(tok_len, n_tokens + 1)
        at = tok_start[n_tokens - 1] + tok_len[n_tokens - 1]
        tok_chars[at:at + tok_len[a]] = tok_chars[tok_start[a]:tok_start[a] + tok_len[a]]
        tok_chars[at + tok_len[a]:at + new_len] = tok_chars[tok_start[b]:tok_start[b] + tok_len[b]]
        tok_start[n_tokens] = at
        tok_len[n_tokens] = new_len
        new = _token_find(tkeys, tids, tok_chars, tok_start, tok_len, n_tokens)
        if new < 0:
            new = n_tokens
            _token_slot_insert(tkeys, tids, tok_chars, tok_start, tok_len, new)
            n_tokens += 1
        if n_merges == merges.shape[0]:
            bigger = np.empty((2 * merges.shape[0], 3), np.int64)
            bigger[:n_merges] = merges
            merges = bigger
        if n_merges % REPORT_EVERY == 0 and n_merges:
            with numba.objmode():
                _report(n_merges, n_tokens, target)
        merges[n_merges, 0] = a
        merges[n_merges, 1] = b
        merges[n_merges, 2] = new
        n_merges += 1
        # Where the pair was seen; the list is consumed (new occurrences only ever involve ``new``).
        n_pos = 0
        e = phead[s]
        phead[s] = -1
        while e >= 0:
            if n_pos == positions.shape[0]:
                positions = _grown(positions, n_pos + 1)
            positions[n_pos] = lpos[e]
            n_pos += 1
            e = lnext[e]
        if a == b:  # overlapping occurrences ("aaa"): left to right
            positions[:n_pos] = np.sort(positions[:n_pos])
        n_touched = 0
        for k in range(n_pos):
            p = positions[k]
            if sym[p] != a:
                continue
            q = p + 1
            while sym[q] == REMOVED:
                q += 1
            if sym[q] != b:
                continue
            w = weight[p]
            left = p - 1
            while sym[left] == REMOVED:
                left -= 1
            right = q + 1
            while right < n and sym[right] == REMOVED:
                right += 1
            has_left = sym[left] >= 0
            has_right = right < n and sym[right] >= 0
            pcount[s] -= w
            if has_left and tok_len[sym[left]] + tok_len[a] <= max_len:
                t, _ = _pair_slot(pkeys, sym[left], a)
                pcount[t] -= w
            if has_right and tok_len[b] + tok_len[sym[right]] <= max_len:
                t, _ = _pair_slot(pkeys, b, sym[right])
                pcount[t] -= w
            sym[p] = new
            sym[q] = REMOVED
            for side in range(2):
                if side == 0:
                    if not has_left:
                        continue
                    x, y, at_pos = sym[left], np.int32(new), left
                else:
                    if not has_right:
                        continue
                    x, y, at_pos = np.int32(new), sym[right], p
                if tok_len[x] + tok_len[y] > max_len:
                    continue
                t, key = _pair_slot(pkeys, x, y)
                if pkeys[t] == _EMPTY:
                    pkeys[t] = key
                    n_pairs += 1
                pcount[t] += w
                if n_entries == lpos.shape[0]:
                    if n_entries >= MAX_POSITIONS:
                        raise ValueError("the sample has too many pair positions for 32-bit lists; "
                                         "lower encoder.sample_chars")
                    lpos = _grown(lpos, n_entries + 1)
                    lnext = _grown(lnext, n_entries + 1)
                lpos[n_entries] = at_pos
                lnext[n_entries] = phead[t]
                phead[t] = n_entries
                n_entries += 1
                if pstamp[t] != n_merges:
                    pstamp[t] = n_merges
                    if n_touched == touched.shape[0]:
                        touched = _grown(touched, n_touched + 1)
                    touched[n_touched] = np.int64(key)
                    n_touched += 1
                if 2 * n_pairs > pkeys.shape[0]:
                    pkeys, pcount, phead, pstamp = _rehash_pairs(pkeys, pcount, phead, pstamp)
                    s, _ = _pair_slot(pkeys, a, b)
        for k in range(n_touched):
            x = np.int64(np.uint64(touched[k]) >> np.uint64(32))
            y = touched[k] & 0xFFFFFFFF
            t, _ = _pair_slot(pkeys, x, y)
            if pcount[t] > 0:
                heap, size = _heap_push(heap, size, _heap_key(pcount[t], x, y))
    return merges[:n_merges], tok_chars, tok_start[:n_tokens], tok_len[:n_tokens], n_entries, n_pairs


def _report(merges: int, tokens: int, target: int) -> None:
    log.info("encoder: %d merges learned, %d of %d tokens", merges, tokens, target)


@numba.njit(cache=True, nogil=True)
def _rehash_pairs(pkeys, pcount, phead, pstamp):
    keys, moved = _rehashed(pkeys)
    old = moved >= 0
    new = moved[old]
    count = np.zeros(keys.shape[0], np.int64)
    head = np.full(keys.shape[0], -1, np.int32)
    stamp = np.full(keys.shape[0], -1, np.int32)
    count[new] = pcount[old]
    head[new] = phead[old]
    stamp[new] = pstamp[old]
    return keys, count, head, stamp


@numba.njit(cache=True, nogil=True)
def _token_hash(tok_chars, start, length):
    h = np.uint64(length)
    for i in range(start, start + length):
        h = h * _PRIME + np.uint64(tok_chars[i])
    return h


@numba.njit(cache=True, nogil=True)
def _token_find(tkeys, tids, tok_chars, tok_start, tok_len, t):
    h = _token_hash(tok_chars, tok_start[t], tok_len[t])
    mask = tkeys.shape[0] - 1
    s = _slot(h, mask)
    while tkeys[s] != _EMPTY:
        if tkeys[s] == h:
            u = tids[s]
            if tok_len[u] == tok_len[t]:
                same = True
                for i in range(tok_len[t]):
                    if tok_chars[tok_start[u] + i] != tok_chars[tok_start[t] + i]:
                        same = False
                        break
                if same:
                    return u
        s = (s + 1) & mask
    return -1


@numba.njit(cache=True, nogil=True)
def _token_slot_insert(tkeys, tids, tok_chars, tok_start, tok_len, t):
    h = _token_hash(tok_chars, tok_start[t], tok_len[t])
    mask = tkeys.shape[0] - 1
    s = _slot(h, mask)
    while tkeys[s] != _EMPTY:
        s = (s + 1) & mask
    tkeys[s] = h
    tids[s] = t


def learn(counter: PieceCounter, alphabet_limit: int, target: int, min_frequency: int,
          max_token_length: int) -> tuple[list[str], list[tuple[int, int, int]]]:
    """BPE on the counted pieces (``counter`` is cleared on the way): ``alphabet_limit``
    characters at most, then merges until ``target`` tokens. Returns the tokens (the
    alphabet in code point order, then the learned ones in order) and the merges as
    (left, right, merged) token ids."""
    if target > 0xFFFF:
        raise ValueError(f"at most {0xFFFF} tokens can be learned, not {target}")
    arena, start, length, count = counter.pieces()
    alpha = alphabet(counter.char_counts(), min(alphabet_limit, target))
    if len(alpha) == 0:
        return [], []
    char_tok = np.full(0x110000, BARRIER, np.int32)
    char_tok[alpha] = np.arange(len(alpha), dtype=np.int32)
    if counter.used + counter.n >= MAX_POSITIONS // 3:
        raise ValueError(f"{counter.used} characters in distinct pieces is more than the trainer's 32-bit "
                         f"positions hold (about {MAX_POSITIONS // 3}); lower encoder.sample_chars")
    sym, weight = _symbols(arena, start, length, count, char_tok)
    del arena, start, length, count
    counter.clear()
    merges, tok_chars, tok_start, tok_len, entries, pairs = _learn(
        sym, weight, alpha.astype(np.int32), np.arange(len(alpha), dtype=np.int64),
        np.ones(len(alpha), np.int64), len(alpha), target, min_frequency, max_token_length)
    log.info("encoder: learned %d merges on %d positions (%d pair entries, %d distinct pairs)",
             len(merges), len(sym), entries, pairs)
    used = int(tok_start[-1] + tok_len[-1])
    text = tok_chars[:used].astype(np.uint32).tobytes().decode("utf-32-le")
    tokens = [text[s:s + n] for s, n in zip(tok_start.tolist(), tok_len.tolist())]
    return tokens, [tuple(m) for m in merges.tolist()]
