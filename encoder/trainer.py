"""jagpt's BPE trainer: a 1 GB sample in minutes, in about 9 bytes of memory per byte.

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

import numpy as np

from encoder.kernels import BARRIER, EMPTY, char_classes, char_counts, count_pieces, learn_merges, piece_symbols

log = logging.getLogger(__name__)
MAX_POSITIONS = 2**31 - 1  # the merge kernel's positions and list entries are int32


class PieceCounter:
    """The distinct pre-tokenizer pieces of the text fed to it, with their counts."""

    def __init__(self):
        self.classes = char_classes()
        self.keys = np.full(1 << 16, EMPTY, np.uint64)
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
        (self.keys, self.ids, self.start, self.length, self.count, self.arena, self.n, self.used) = count_pieces(
            codes, ends - lengths, ends, self.classes, self.keys, self.ids, self.start, self.length, self.count,
            self.arena, self.n, self.used)

    def pieces(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(code points of every distinct piece end to end, starts, lengths, counts)."""
        n = self.n
        return self.arena[: self.used], self.start[:n], self.length[:n], self.count[:n]

    def char_counts(self) -> np.ndarray:
        """How often each code point occurs in the text fed (weighted by piece count)."""
        return char_counts(*self.pieces())

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
    if 3 * (counter.used + counter.n + 1) + 16 > MAX_POSITIONS:
        raise ValueError(f"{counter.used} characters in distinct pieces is more than the trainer's 32-bit "
                         f"positions hold (about {MAX_POSITIONS // 3}); lower encoder.sample_chars")
    sym, weight = piece_symbols(arena, start, length, count, char_tok)
    del arena, start, length, count
    counter.clear()
    merges, tok_chars, tok_start, tok_len, entries, pairs = learn_merges(
        sym, weight, alpha.astype(np.int32), np.arange(len(alpha), dtype=np.int64),
        np.ones(len(alpha), np.int64), len(alpha), target, min_frequency, max_token_length)
    log.info("encoder: learned %d merges on %d positions (%d pair entries, %d distinct pairs)",
             len(merges), len(sym), entries, pairs)
    used = int(tok_start[-1] + tok_len[-1])
    text = tok_chars[:used].astype(np.uint32).tobytes().decode("utf-32-le")
    tokens = [text[s:s + n] for s, n in zip(tok_start.tolist(), tok_len.tolist())]
    return tokens, [tuple(m) for m in merges.tolist()]
