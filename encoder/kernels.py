"""jagpt's encoder compiled with numba: the ids the tokenizers library gives for a
jagpt ``tokenizer.json``, several times faster.

The library's cost on Japanese is per piece: each pre-tokenizer piece becomes
a string, a cache lookup, a vector of symbols and a heap, and Japanese pieces
rarely repeat, so its cache seldom helps. Here the whole batch is one array of
code points and one loop:

* **Pre-tokenization** walks the code points with a class table (which of
  :data:`encoder.bpe.PRETOKENIZE_PATTERN`'s character classes each code point
  is in), trying the pattern's alternatives in order at each position, as the
  regex engine does. Text that no alternative matches is a piece of its own
  (``Split`` with ``isolated``). The table is read off the library's own regex
  engine (:func:`char_classes`), so both agree on every Unicode property.
* **BPE** is the library's ``merge_all`` (``models/bpe/word.rs``): a min-heap
  of adjacent pairs by (merge rank, position); a popped pair that no longer
  stands at its position is skipped. Characters outside the vocabulary are
  spelled by their UTF-8 byte tokens.
* **Added tokens** (``<|endoftext|>`` when asked for, the content tags) are cut
  out first, with a regex, and are single ids.

:class:`CompiledBPE` refuses a tokenizer it does not implement (another
pattern, a normalizer, merges with dropout), and the encoder then uses the
library. Tests hold both to the same ids on arbitrary text.
"""

from __future__ import annotations

import json
import re
from functools import cache

import numba
import numpy as np
from tokenizers import Regex, Tokenizer, pre_tokenizers

from encoder import bpe

NUMBER, JAPANESE, CLOSING, LATIN, SYMBOL = 1, 2, 4, 8, 16
_CLASSES = ((NUMBER, bpe.NUMBER), (JAPANESE, bpe.JAPANESE), (CLOSING, bpe.CLOSING), (LATIN, bpe.LATIN),
            (SYMBOL, bpe.SYMBOL))
# Planes 4 to 16 hold no letters, numbers or spaces (tags, variation selectors,
# private use, unassigned), so above this every code point is a SYMBOL; a test
# checks it on every code point.
CLASS_LIMIT = 0x40000
_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
_MIX = np.uint64(0x9E3779B97F4A7C15)


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


def _pair_table(pairs: list[tuple[int, int]], merged: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Open-addressing table from ``(a << 32) | b`` to ``(rank << 32) | merged id``."""
    bits = max(4, (2 * len(pairs)).bit_length())
    keys = np.full(1 << bits, _EMPTY, np.uint64)
    values = np.zeros(1 << bits, np.int64)
    _fill(keys, values, np.array([(a << 32) | b for a, b in pairs], np.uint64).reshape(-1),
          np.array([(r << 32) | m for r, m in enumerate(merged)], np.int64).reshape(-1), 64 - bits)
    return keys, values, 64 - bits


@numba.njit(cache=True, nogil=True)
def _fill(keys, values, pair_keys, pair_values, shift):
    mask = keys.shape[0] - 1
    for i in range(pair_keys.shape[0]):
        s = np.intp((pair_keys[i] * _MIX) >> np.uint64(shift))
        while keys[s] != _EMPTY and keys[s] != pair_keys[i]:
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
        if k == _EMPTY:
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
        while j < end and _class(classes, codes[j]) & JAPANESE:
            j += 1
        while j < end and _class(classes, codes[j]) & CLOSING:
            j += 1
        return j
    if k & LATIN:
        while j < end and _class(classes, codes[j]) & LATIN:
            j += 1
        return j
    if c == 13:
        return j + 1 if j < end and codes[j] == 10 else -1
    if c == 10:
        while j < end and codes[j] == 10:
            j += 1
        return j
    if c == 32 or c == 9:
        while j < end and (codes[j] == 32 or codes[j] == 9):
            j += 1
        return j
    if c == 0x3000:
        while j < end and codes[j] == 0x3000:
            j += 1
        return j
    if k & SYMBOL:
        while j < end and _class(classes, codes[j]) & SYMBOL:
            j += 1
        return j
    return -1


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
                out = _grow(out, n_out + 1)
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
                out = _grow(out, n_out + need)
            n_out = _bpe(codes, i, j, char_id, byte_id, keys, values, shift, sym, prev, nxt, heap, out, n_out)
            i = j
        ends[k] = n_out
    return out[:n_out], ends


@numba.njit(cache=True, nogil=True)
def _grow(out, need):
    bigger = np.empty(max(need, 2 * out.shape[0]), np.int32)
    bigger[: out.shape[0]] = out
    return bigger


class Unsupported(ValueError):
    """The tokenizer uses something :class:`CompiledBPE` does not implement."""


class CompiledBPE:
    """Encode with a jagpt tokenizer's vocabulary and merges, without the library."""

    def __init__(self, tokenizer: Tokenizer):
        data = json.loads(tokenizer.to_str())
        model = data["model"]
        pre = data.get("pre_tokenizer") or {}
        checks = {
            "a BPE model": model.get("type") == "BPE",
            "byte fallback": model.get("byte_fallback") is True,
            "no dropout": model.get("dropout") is None,
            "merges applied to whole-vocabulary words too": not model.get("ignore_merges"),
            "no subword prefix or suffix": not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix"),
            "no normalizer": data.get("normalizer") is None,
            "jagpt's pre-tokenizer": pre.get("type") == "Split" and pre.get("behavior") == "Isolated"
            and not pre.get("invert") and pre.get("pattern") == {"Regex": bpe.PRETOKENIZE_PATTERN},
            "added tokens matched as typed": all(
                not (t["single_word"] or t["lstrip"] or t["rstrip"] or t["normalized"]) for t in data["added_tokens"]),
        }
        missing = [what for what, ok in checks.items() if not ok]
        vocab: dict[str, int] = model["vocab"]
        missing += [f"byte token {t}" for t in bpe.BYTE_TOKENS if t not in vocab][:1]
        if missing:
            raise Unsupported("the compiled encoder needs " + ", ".join(missing))
        self.char_id = np.full(0x110000, -1, np.int32)
        for token, i in vocab.items():
            if len(token) == 1:
                self.char_id[ord(token)] = i
        self.byte_id = np.array([vocab[t] for t in bpe.BYTE_TOKENS], np.int32)
        pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        self.keys, self.values, self.shift = _pair_table(
            [(vocab[a], vocab[b]) for a, b in pairs], [vocab[a + b] for a, b in pairs])
        self.classes = char_classes()
        added = sorted(data["added_tokens"], key=lambda t: -len(t["content"]))
        self.added_ids = {t["content"]: t["id"] for t in added}
        self._always = self._pattern([t["content"] for t in added if not t["special"]])
        self._with_special = self._pattern([t["content"] for t in added])

    @staticmethod
    def _pattern(contents: list[str]) -> re.Pattern | None:
        return re.compile("|".join(map(re.escape, contents))) if contents else None

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[np.ndarray]:
        """The ids of each text (int32 arrays)."""
        if not texts:
            return []
        pattern = self._with_special if allow_special else self._always
        joined = "".join(texts)
        segments: list[tuple[int, int, int]] = []  # (start, end, added token id or -1) in ``joined``
        last = []
        pos = 0
        for text in texts:
            stop = pos + len(text)
            if pattern is not None:
                for m in pattern.finditer(joined, pos, stop):  # within this text only
                    if m.start() > pos:
                        segments.append((pos, m.start(), -1))
                    segments.append((m.start(), m.end(), self.added_ids[m.group()]))
                    pos = m.end()
            segments.append((pos, stop, -1))
            last.append(len(segments) - 1)
            pos = stop
        starts, ends, tokens = np.array(segments, np.int64).T.copy()
        ids, seg_ends = encode_segments(
            np.frombuffer(joined.encode("utf-32-le"), np.uint32), starts, ends, tokens,
            self.classes, self.char_id, self.byte_id, self.keys, self.values, self.shift)
        return np.split(ids, seg_ends[last][:-1])
