"""The corpus stages' inner loops over code points, compiled with numba.

* :func:`ngram_stats`: the character n-gram repetition signals of the clean
  stage (:func:`corpus.quality.ngram_signals` says what they mean), with one
  hash-table pass per n where numpy would sort.
* :func:`minhash_mins`: the MinHash signature of the dedup stage
  (:func:`corpus.dedup.minhash`), with the shingle hashes and every
  permutation's minimum in registers, where numpy would materialize a
  permutations × shingles matrix.

Both are pure functions of their arrays; numba caches the machine code next to
this file, so only the first process on a machine compiles them.
"""

from __future__ import annotations

import numba
import numpy as np

PRIME = np.uint64(0x100000001B3)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_MASK32 = np.uint64(0xFFFFFFFF)


def code_points(text: str) -> np.ndarray:
    """``text``'s code points as uint64, the kernels' input (lone surrogates kept)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)


@numba.njit(cache=True, nogil=True)
def _slot(key, shift):
    return np.intp((key * _MIX) >> shift)


@numba.njit(cache=True, nogil=True)
def _find(keys, used, key, shift, mask):
    s = _slot(key, shift)
    while used[s] and keys[s] != key:
        s = (s + 1) & mask
    return s


@numba.njit(cache=True, nogil=True)
def ngram_stats(codes, top_longest, longest):
    """``codes``: a document's code points as uint64. Returns, for n = 2 ..
    ``longest``, the top n-gram's share of characters (n <= ``top_longest``)
    or the share of characters inside n-grams that repeat an earlier one."""
    length = codes.shape[0]
    out = np.zeros(longest - 1)
    bits = 1
    while (1 << bits) < 2 * length:
        bits += 1
    size = 1 << bits
    mask = size - 1
    shift = np.uint64(64 - bits)
    keys = np.zeros(size, np.uint64)
    used = np.zeros(size, np.bool_)
    counts = np.zeros(size, np.int32)
    seen = np.zeros(size, np.bool_)
    h = codes.copy()
    # Positions whose (n-1)-gram occurs more than once: only they can start a repeated n-gram.
    candidate = np.ones(length, np.bool_)
    for n in range(2, longest + 1):
        if n > length:
            break
        m = length - n + 1
        for i in range(m):
            h[i] = h[i] * PRIME + codes[i + n - 1]
        used[:] = False
        counts[:] = 0
        if n <= top_longest:
            best = 0
            for i in range(m):
                s = _find(keys, used, h[i], shift, mask)
                if not used[s]:
                    used[s] = True
                    keys[s] = h[i]
                counts[s] += 1
                if counts[s] > best:
                    best = counts[s]
            out[n - 2] = best * n / length
            continue
        for i in range(m):
            if candidate[i]:
                s = _find(keys, used, h[i], shift, mask)
                if not used[s]:
                    used[s] = True
                    keys[s] = h[i]
                counts[s] += 1
        seen[:] = False
        covered = 0
        end = 0
        repeats = 0
        for i in range(m):
            if not candidate[i]:
                continue
            s = _find(keys, used, h[i], shift, mask)
            if counts[s] < 2:
                candidate[i] = False
            elif seen[s]:
                repeats += 1
                start = i if i > end else end
                covered += i + n - start
                end = i + n
            else:
                seen[s] = True
        out[n - 2] = covered / length
        if repeats == 0:
            break
    return out


@numba.njit(cache=True, nogil=True)
def minhash_mins(codes, k, a, b):
    """For each permutation ``(a[j], b[j])``, the top 32 bits of the minimum of
    ``a[j] * x + b[j]`` (mod 2**64) over the 32-bit hashes ``x`` of the
    character k-grams of ``codes`` (uint64 code points, at least ``k``)."""
    low = np.full(a.shape[0], np.uint64(0xFFFFFFFFFFFFFFFF))
    for i in range(codes.shape[0] - k + 1):
        x = codes[i]
        for t in range(1, k):
            x = x * PRIME + codes[i + t]
        x ^= x >> np.uint64(29)
        x &= _MASK32
        for j in range(a.shape[0]):
            v = a[j] * x + b[j]
            if v < low[j]:
                low[j] = v
    return (low >> np.uint64(32)).astype(np.uint32)
