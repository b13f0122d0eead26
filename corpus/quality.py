"""The quality signals SQL cannot compute well, per document, in Python.

Repetition (Gopher rules as the Swallow corpus applies them to characters),
sentences trailing off, NG words and the zlib compression ratio. DuckDB
computes the character-class ratios and sentence lengths (see corpus/clean.py);
the thresholds for both live in :class:`corpus.clean.CleanSettings`.

Character n-grams are counted by compiled loops (corpus/kernels.py).
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache
from importlib import resources


TOP_NGRAMS = (2, 3, 4)
DUP_NGRAMS = (5, 6, 7, 8, 9, 10)  # contiguous after TOP_NGRAMS, as corpus.kernels.ngram_stats counts them
# A closing bracket after the full stop belongs to the sentence: 「はい。」
_SENTENCE = re.compile(r"[^。！？!?\n]+[。！？!?]*[」』）)]*")
_TRAILING_OFF = re.compile(r"(?:\.{2,}|…|‥|・)\s*[。！？!?]*[」』）)]*$")


def _duplicates(items: list[str]) -> tuple[float, float]:
    """Share of items, and of their characters, that repeat an earlier item."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_items = dup_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items / len(items), dup_chars / max(total_chars, 1)


def ngram_signals(text: str) -> dict[str, float]:
    """top_<n>gram (n = 2..4): the most frequent n-gram's share of characters;
    dup_<n>gram (n = 5..10): share of characters inside n-grams that repeat an
    earlier occurrence (first occurrences are not counted).

    N-grams are compared by a 64-bit polynomial hash of their code points. The
    loops are compiled (:func:`corpus.kernels.ngram_stats`).
    """
    from corpus.kernels import code_points, ngram_stats

    names = [f"top_{n}gram" for n in TOP_NGRAMS] + [f"dup_{n}gram" for n in DUP_NGRAMS]
    if not text:
        return dict.fromkeys(names, 0.0)
    return dict(zip(names, ngram_stats(code_points(text), max(TOP_NGRAMS), max(DUP_NGRAMS)).tolist()))


@lru_cache(maxsize=8)
def ng_pattern(extra: tuple[str, ...] = (), use_bundled: bool = True) -> re.Pattern[str] | None:
    words = list(extra)
    if use_bundled:
        bundled = (resources.files("corpus") / "ng_words.txt").read_text(encoding="utf-8")
        words += [w.strip() for w in bundled.splitlines() if w.strip() and not w.startswith("#")]
    words = sorted(set(words), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, words))) if words else None


def signals(text: str, ng: re.Pattern[str] | None) -> dict[str, float]:
    """Every Python-side signal of one (normalized) document."""
    lines = [line for line in (s.strip() for s in text.split("\n")) if line]
    sentences = [s.strip() for s in _SENTENCE.findall(text) if s.strip()]
    dup_lines, dup_line_chars = _duplicates(lines)
    dup_sentences, dup_sentence_chars = _duplicates(sentences)
    data = text.encode("utf-8", "surrogatepass")
    out = {
        "dup_line_ratio": dup_lines,
        "dup_line_char_ratio": dup_line_chars,
        "dup_sentence_ratio": dup_sentences,
        "dup_sentence_char_ratio": dup_sentence_chars,
        "trailing_off_ratio": sum(1 for s in sentences if _TRAILING_OFF.search(s)) / max(len(sentences), 1),
        "ng_char_ratio": sum(len(m) for m in ng.findall(text)) / max(len(text), 1) if ng else 0.0,
        "zlib_ratio": len(zlib.compress(data)) / len(data) if data else 1.0,
    }
    out.update(ngram_signals(text))
    return out


SIGNAL_NAMES = list(signals("a", None))

