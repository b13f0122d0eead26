"""jagpt's compiled BPE trainer learns what a plain-Python definition of the same BPE learns."""

from collections import Counter

import numpy as np
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encoder.bpe import CompiledBPE, EncoderSettings, train
from encoder.trainer import PieceCounter, alphabet, learn
from tests.test_encoder import TEXTS


def reference_learn(pieces: dict[str, int], alphabet_limit: int, target: int, min_frequency: int, max_len: int):
    """Greedy BPE, spelled out: the most frequent pair (ties: smaller ids), merged left to right."""
    chars: Counter[str] = Counter()
    for piece, n in pieces.items():
        for c in piece:
            chars[c] += n
    tokens = sorted(sorted(chars, key=lambda c: (-chars[c], ord(c)))[:min(alphabet_limit, target)])
    ids = {t: i for i, t in enumerate(tokens)}
    words = []
    for piece, n in pieces.items():
        run: list[int] = []
        for c in piece + "\uffff":  # a character outside the alphabet ends a run (\uffff never is in one here)
            if c in ids:
                run.append(ids[c])
            else:
                if len(run) >= 2:
                    words.append((run, n))
                run = []
    merges = []
    while len(tokens) < target:
        counts: Counter[tuple[int, int]] = Counter()
        for word, n in words:
            for a, b in zip(word, word[1:]):
                if len(tokens[a]) + len(tokens[b]) <= max_len:
                    counts[(a, b)] += n
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        if counts[best] < min_frequency:
            break
        spelled = tokens[best[0]] + tokens[best[1]]
        if spelled not in ids:
            ids[spelled] = len(tokens)
            tokens.append(spelled)
        merges.append((*best, ids[spelled]))
        merged = []
        for word, n in words:
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(ids[spelled])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged.append((out, n))
        words = merged
    return tokens, merges


POOLS = ["あいうえおかきくけこ。", "ab", "aaab", "日本語のテキスト。、", "aあ1 .\n", "ab" + "\u00e9" * 3]
texts = st.sampled_from(POOLS).flatmap(lambda pool: st.lists(st.text(alphabet=pool, max_size=40), min_size=1, max_size=8))


@settings(max_examples=300, deadline=None)
@given(texts, st.integers(1, 12), st.integers(1, 60), st.integers(1, 3), st.integers(1, 8))
def test_learns_what_the_plain_definition_learns(texts, alphabet_limit, target, min_frequency, max_len):
    counter = PieceCounter()
    counter.feed(texts[: len(texts) // 2])
    counter.feed(texts[len(texts) // 2:])
    want = reference_learn(counter.as_dict(), alphabet_limit, target, min_frequency, max_len)
    assert learn(counter, alphabet_limit, target, min_frequency, max_len) == want


def test_pieces_are_counted_as_the_pre_tokenizer_cuts_them():
    enc = train(TEXTS, EncoderSettings(vocab_size=600))
    counter = PieceCounter()
    counter.feed(TEXTS)
    want = Counter(p for t in TEXTS for p, _ in enc.tokenizer.pre_tokenizer.pre_tokenize_str(t))
    assert counter.as_dict() == dict(want)
    assert counter.char_counts()[ord("。")] == sum(t.count("。") for t in TEXTS)


def test_alphabet_takes_the_most_frequent_characters_ties_by_code_point():
    counts = [0] * 0x110000
    counts[ord("b")], counts[ord("a")], counts[ord("c")], counts[ord("日")] = 5, 5, 1, 9
    assert [chr(c) for c in alphabet(np.array(counts), 3)] == ["a", "b", "日"]


def test_a_trained_tokenizer_is_an_ordinary_tokenizers_file():
    enc = train(TEXTS, EncoderSettings(vocab_size=600))
    assert enc.vocab_size <= 600  # fewer: every pair seen twice or more is merged
    assert CompiledBPE(enc.tokenizer) is not None
    text = "今日はとても良い天気ですね。"
    ids = enc.reference_encode([text])[0]
    assert enc.encode(text) == ids and enc.decode(ids) == text
    assert len(ids) < len(text) / 2  # the merges are words


def test_a_sample_beyond_the_trainers_32_bit_positions_is_refused_by_the_settings():
    EncoderSettings(sample_chars=450_000_000)
    with pytest.raises(pydantic.ValidationError, match="450000000"):
        EncoderSettings(sample_chars=450_000_001)
