"""The encoder's inner loops, compiled with numba: encoding and training.

All of the encoder's compiled code is in this one module on purpose: numba
caches machine code per source file and checks only that file for changes, so
a compiled function calling one from another module would keep running a
stale copy of it after that module changed.

Encoding (:func:`encode_segments`, used by :class:`encoder.bpe.CompiledBPE`)
gives the ids the tokenizers library gives for a jagpt ``tokenizer.json``,
several times faster. The library's cost on Japanese is per piece: each
pre-tokenizer piece becomes a string, a cache lookup, a vector of symbols and
a heap, and Japanese pieces rarely repeat, so its cache seldom helps. Here a
whole batch is one array of code points and one loop:

* **Pre-tokenization** (:func:`piece_end`) walks the code points with a class
  table (which of :data:`encoder.bpe.PRETOKENIZE_PATTERN`'s character classes
  each code point is in), trying the pattern's alternatives in order at each
  position, as the regex engine does. Text that no alternative matches is a
  piece of its own (``Split`` with ``isolated``). The table is read off the
  library's own regex engine (:func:`char_classes`), so both agree on every
  Unicode property.
* **BPE** is the library's ``merge_all`` (``models/bpe/word.rs``): a min-heap
  of adjacent pairs by (merge rank, position); a popped pair that no longer
  stands at its position is skipped. Characters outside the vocabulary are
  spelled by their UTF-8 byte tokens.

Training (:func:`count_pieces`, :func:`piece_symbols`, :func:`learn_merges`,
driven by :mod:`encoder.trainer`, which says how) is greedy BPE over flat
arrays.
"""

from __future__ import annotations

import logging
from functools import cache

import numba
import numpy as np
from tokenizers import Regex, pre_tokenizers

from encoder import bpe

log = logging.getLogger(__name__)

NUMBER, JAPANESE, CLOSING, LATIN, SYMBOL = 1, 2, 4, 8, 16
_CLASSES = ((NUMBER, bpe.NUMBER), (JAPANESE, bpe.JAPANESE), (CLOSING, bpe.CLOSING), (LATIN, bpe.LATIN),
            (SYMBOL, bpe.SYMBOL))
# Planes 4 to 16 hold no letters, numbers or spaces (tags, variation selectors,
# private use, unassigned), so above this every code point is a SYMBOL; a test
# checks it on every code point.
CLASS_LIMIT = 0x40000
EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_PRIME = np.uint64(0x100000001B3)
BARRIER = -1  # training: the end of a piece, or a character outside the alphabet
REMOVED = -2  # training: the right half of a merged pair
REPORT_EVERY = 2000  # training: merges between progress lines


@cache
def char_classes() -> np.ndarray:
    """For each code point below :data:`CLASS_LIMIT`, the bit set of pattern
    classes it belongs to, as the library's regex engine sees them."""
    cps = np.array([c for c in range(CLASS_LIMIT) if not 0xD800 <= c < 0xE000])
    text = "".join(map(chr, cps))
    table = np.zeros(CLASS_LIMIT, np.uint8)
    for flag, pattern in _CLASSES:
        member = np.ones(len(text), bool)
        for _, (start, end) in pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text):
            member[start:end] = False
        table[cps[member]] |= flag
    return table


def merge_table(pairs: list[tuple[int, int]], merged: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Open-addressing table from ``(a << 32) | b`` to ``(rank << 32) | merged id``."""
    bits = max(4, (2 * len(pairs)).bit_length())
    keys = np.full(1 << bits, EMPTY, np.uint64)
    values = np.zeros(1 << bits, np.int64)
    _fill(keys, values, np.array([(a << 32) | b for a, b in pairs], np.uint64).reshape(-1),
          np.array([(r << 32) | m for r, m in enumerate(merged)], np.int64).reshape(-1), 64 - bits)
    return keys, values, 64 - bits


@numba.njit(cache=True, nogil=True)
def _fill(keys, values, pair_keys, pair_values, shift):
    mask = keys.shape[0] - 1
    for i in range(pair_keys.shape[0]):
        s = np.intp((pair_keys[i] * _MIX) >> np.uint64(shift))
        while keys[s] != EMPTY and keys[s] != pair_keys[i]:
            s = (s + 1) & mask
        keys[s] = pair_keys[i]
        values[s] = pair_values[i]


@numba.njit(cache=True, nogil=True, inline="always")
def _merge_of(keys, values, shift, a, b):
    key = (np.uint64(a) << np.uint64(32)) | np.uint64(b)
    mask = keys.shape[0] - 1
    s = np.intp((key * _MIX) >> np.uint64(shift))
    while True:
        k = keys[s]
        if k == key:
            return values[s]
        if k == EMPTY:
            return np.int64(-1)
        s = (s + 1) & mask


@numba.njit(cache=True, nogil=True, inline="always")
def _class(classes, c):
    return classes[c] if c < classes.shape[0] else SYMBOL


@numba.njit(cache=True, nogil=True)
def _match_end(codes, i, end, classes):
    """Where the pattern's match at ``i`` ends, or -1 if no alternative matches there."""
    c = codes[i]
    k = _class(classes, c)
    j = i + 1
    if k & NUMBER:
        return j
    if k & JAPANESE:
        return _class_run(codes, _class_run(codes, j, end, classes, JAPANESE), end, classes, CLOSING)
    if k & LATIN:
        return _class_run(codes, j, end, classes, LATIN)
    if c == 13:
        return j + 1 if j < end and codes[j] == 10 else -1
    if c == 10 or c == 0x3000:
        return _code_run(codes, j, end, c, c)
    if c == 32 or c == 9:
        return _code_run(codes, j, end, 32, 9)
    if k & SYMBOL:
        return _class_run(codes, j, end, classes, SYMBOL)
    return -1


@numba.njit(cache=True, nogil=True, inline="always")
def _class_run(codes, j, end, classes, flag):
    """Where the run of code points in class ``flag`` from ``j`` ends."""
    while j < end and _class(classes, codes[j]) & flag:
        j += 1
    return j


@numba.njit(cache=True, nogil=True, inline="always")
def _code_run(codes, j, end, a, b):
    """Where the run of code points ``a`` or ``b`` from ``j`` ends."""
    while j < end and (codes[j] == a or codes[j] == b):
        j += 1
    return j


@numba.njit(cache=True, nogil=True)
def piece_end(codes, i, end, classes):
    """Where the pre-tokenizer's piece that starts at ``i`` ends: the pattern's match
    there, or the run of text no alternative matches (``Split`` with ``isolated``)."""
    j = _match_end(codes, i, end, classes)
    if j < 0:
        j = i + 1
        while j < end and _match_end(codes, j, end, classes) < 0:
            j += 1
    return j


@numba.njit(cache=True, nogil=True, inline="always")
def _push(heap, size, item):
    i = size
    heap[i] = item
    while i > 0:
        parent = (i - 1) >> 1
        if heap[parent] <= item:
            break
        heap[i] = heap[parent]
        i = parent
    heap[i] = item
    return size + 1


@numba.njit(cache=True, nogil=True, inline="always")
def _pop(heap, size):
    top = heap[0]
    size -= 1
    item = heap[size]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= size:
            break
        if child + 1 < size and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= item:
            break
        heap[i] = heap[child]
        i = child
    if size > 0:
        heap[i] = item
    return top, size


@numba.njit(cache=True, nogil=True)
def _bpe(codes, start, end, char_id, byte_id, keys, values, shift, sym, prev, nxt, heap, out, n_out):
    """BPE on the piece ``codes[start:end]``, appended to ``out`` from ``n_out``; returns the new length."""
    n = 0
    for i in range(start, end):
        c = codes[i]
        t = char_id[c]
        if t >= 0:
            sym[n] = t
            n += 1
        elif c < 0x80:
            sym[n] = byte_id[c]
            n += 1
        elif c < 0x800:
            sym[n] = byte_id[0xC0 | (c >> 6)]
            sym[n + 1] = byte_id[0x80 | (c & 0x3F)]
            n += 2
        elif c < 0x10000:
            sym[n] = byte_id[0xE0 | (c >> 12)]
            sym[n + 1] = byte_id[0x80 | ((c >> 6) & 0x3F)]
            sym[n + 2] = byte_id[0x80 | (c & 0x3F)]
            n += 3
        else:
            sym[n] = byte_id[0xF0 | (c >> 18)]
            sym[n + 1] = byte_id[0x80 | ((c >> 12) & 0x3F)]
            sym[n + 2] = byte_id[0x80 | ((c >> 6) & 0x3F)]
            sym[n + 3] = byte_id[0x80 | (c & 0x3F)]
            n += 4
    size = 0
    for p in range(n):
        prev[p] = p - 1
        nxt[p] = p + 1 if p + 1 < n else -1
        if p + 1 < n:
            m = _merge_of(keys, values, shift, sym[p], sym[p + 1])
            if m >= 0:
                size = _push(heap, size, ((m >> 32) << 32) | p)
    while size > 0:
        top, size = _pop(heap, size)
        pos = top & 0xFFFFFFFF
        rank = top >> 32
        q = nxt[pos]
        if sym[pos] < 0 or q < 0:
            continue
        m = _merge_of(keys, values, shift, sym[pos], sym[q])
        if m < 0 or (m >> 32) != rank:
            continue
        sym[pos] = m & 0xFFFFFFFF
        sym[q] = -1
        r = nxt[q]
        nxt[pos] = r
        if r >= 0:
            prev[r] = pos
            m = _merge_of(keys, values, shift, sym[pos], sym[r])
            if m >= 0:
                size = _push(heap, size, ((m >> 32) << 32) | pos)
        p = prev[pos]
        if p >= 0:
            m = _merge_of(keys, values, shift, sym[p], sym[pos])
            if m >= 0:
                size = _push(heap, size, ((m >> 32) << 32) | p)
    p = 0
    while p >= 0:
        out[n_out] = sym[p]
        n_out += 1
        p = nxt[p]
    return n_out


@numba.njit(cache=True, nogil=True)
def encode_segments(codes, seg_start, seg_end, seg_token, classes, char_id, byte_id, keys, values, shift):
    """Encode each segment ``codes[seg_start[k]:seg_end[k]]``, or emit ``seg_token[k]``
    where it is not -1 (an added token). Returns the ids and, per segment, the
    number of ids up to its end."""
    out = np.empty(max(16, codes.shape[0] + codes.shape[0] // 2), np.int32)
    ends = np.empty(seg_start.shape[0], np.int64)
    scratch = 64
    sym = np.empty(scratch, np.int64)
    prev = np.empty(scratch, np.int64)
    nxt = np.empty(scratch, np.int64)
    heap = np.empty(3 * scratch, np.int64)
    n_out = 0
    for k in range(seg_start.shape[0]):
        if seg_token[k] >= 0:
            if n_out + 1 > out.shape[0]:
                out = _grown(out, n_out + 1)
            out[n_out] = seg_token[k]
            n_out += 1
            ends[k] = n_out
            continue
        i = seg_start[k]
        end = seg_end[k]
        while i < end:
            j = piece_end(codes, i, end, classes)
            # Every code point can become 4 byte tokens.
            need = 4 * (j - i)
            if need > sym.shape[0]:
                size = max(need, 2 * sym.shape[0])
                sym = np.empty(size, np.int64)
                prev = np.empty(size, np.int64)
                nxt = np.empty(size, np.int64)
                heap = np.empty(3 * size, np.int64)
            if n_out + need > out.shape[0]:
                out = _grown(out, n_out + need)
            n_out = _bpe(codes, i, j, char_id, byte_id, keys, values, shift, sym, prev, nxt, heap, out, n_out)
            i = j
        ends[k] = n_out
    return out[:n_out], ends


# -- training -------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _slot(key, mask):
    return np.intp((key * _MIX) >> np.uint64(32)) & mask


@numba.njit(cache=True, nogil=True)
def count_pieces(codes, seg_start, seg_end, classes, keys, ids, start, length, count, arena, n, used):
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
            while keys[s] != EMPTY:
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
    new_keys = np.full(2 * keys.shape[0], EMPTY, np.uint64)
    moved = np.full(keys.shape[0], -1, np.int64)
    mask = new_keys.shape[0] - 1
    for s in range(keys.shape[0]):
        if keys[s] != EMPTY:
            t = _slot(keys[s], mask)
            while new_keys[t] != EMPTY:
                t = (t + 1) & mask
            new_keys[t] = keys[s]
            moved[s] = t
    return new_keys, moved


@numba.njit(cache=True, nogil=True)
def char_counts(arena, start, length, count):
    """How often each code point occurs, each piece weighted by its count."""
    out = np.zeros(0x110000, np.int64)
    for p in range(start.shape[0]):
        for t in range(start[p], start[p] + length[p]):
            out[arena[t]] += count[p]
    return out


@numba.njit(cache=True, nogil=True)
def piece_symbols(arena, start, length, count, char_tok):
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
    while pkeys[s] != EMPTY and pkeys[s] != key:
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
def learn_merges(sym, weight, tok_chars, tok_start, tok_len, n_tokens, target, min_frequency, max_len):
    """Greedy BPE on ``sym`` until ``target`` tokens. Tokens ``0 .. n_tokens-1`` are the
    alphabet (their characters in ``tok_chars``). Returns the merges as (a, b, new id) rows
    and the grown token arrays."""
    n = sym.shape[0]
    # Pair table: key, count, head of the list of positions seen, stamp of the last merge that touched it.
    pkeys = np.full(1 << 16, EMPTY, np.uint64)
    pcount = np.zeros(1 << 16, np.int64)
    phead = np.full(1 << 16, -1, np.int32)
    pstamp = np.full(1 << 16, -1, np.int32)
    n_pairs = 0
    # Position lists: entry e says "pair seen at lpos[e]", next entry lnext[e]. There are
    # at most 3n entries: n initial pairs, then two new pairs per merged occurrence, and
    # each occurrence removes a position. Reserved, not touched: pages are mapped as they fill.
    lpos = np.empty(3 * n + 16, np.int32)
    lnext = np.empty(3 * n + 16, np.int32)
    n_entries = 0
    # Initial pairs, inserted right to left, so a list starts in position order; merges
    # add entries at the head, so a list is not ordered after that (see the sort below).
    for p in range(n - 2, 0, -1):
        a = sym[p]
        b = sym[p + 1]
        if a < 0 or b < 0 or tok_len[a] + tok_len[b] > max_len:
            continue
        s, key = _pair_slot(pkeys, a, b)
        if pkeys[s] == EMPTY:
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
        if pkeys[s] != EMPTY and pcount[s] > 0:
            heap, size = _heap_push(heap, size, _heap_key(pcount[s], np.int64(pkeys[s] >> np.uint64(32)),
                                                          np.int64(pkeys[s] & np.uint64(0xFFFFFFFF))))
    # Token strings, to reuse the id of a merge that spells an existing token.
    tbits = 4
    while (1 << tbits) < 4 * target:
        tbits += 1
    tkeys = np.full(1 << tbits, EMPTY, np.uint64)
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
                if pkeys[t] == EMPTY:
                    pkeys[t] = key
                    n_pairs += 1
                pcount[t] += w
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
    while tkeys[s] != EMPTY:
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
    while tkeys[s] != EMPTY:
        s = (s + 1) & mask
    tkeys[s] = h
    tids[s] = t
