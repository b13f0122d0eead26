"""The compiled encoder gives the tokenizers library's ids, on any text."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, normalizers

from encoder.bpe import EOT, PAD, RESERVED_TAGS, CompiledBPE, Encoder, EncoderSettings, Unsupported, train
from encoder.kernels import CLASS_LIMIT, char_classes
from tests.test_encoder import TAGGED, TEXTS, TRICKY

ALPHABET = sorted(set("".join(TEXTS + TAGGED)))


@pytest.fixture(scope="module")
def plain():
    return train(TEXTS, EncoderSettings(vocab_size=600), "tok-test")


@pytest.fixture(scope="module")
def tagged():
    return train(TEXTS + TAGGED, EncoderSettings(vocab_size=600, reserved_tags=True), "tok-tagged")


def same_ids(encoder: Encoder, texts: list[str], allow_special: bool = False) -> None:
    assert encoder.compiled is not None
    got = [a.tolist() for a in encoder.compiled.encode_batch(texts, allow_special)]
    assert got == encoder.reference_encode(texts, allow_special)


# Text the merges apply to: the training text's own characters, with tags, specials and odd code points.
japanese = st.text(alphabet=ALPHABET, max_size=60)
mixed = st.lists(st.one_of(japanese, st.text(max_size=6), st.sampled_from([*RESERVED_TAGS, EOT, PAD, "\r\n", "\0"])),
                 max_size=8).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(mixed, max_size=5), st.booleans())
def test_any_batch_encodes_as_the_library_does(plain, tagged, texts, allow_special):
    same_ids(plain, texts, allow_special)
    same_ids(tagged, texts, allow_special)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_arbitrary_text_encodes_as_the_library_does(plain, text):
    same_ids(plain, [text])


def test_tricky_strings_and_the_training_text(plain, tagged):
    for encoder in (plain, tagged):
        same_ids(encoder, TRICKY + TEXTS + TAGGED)
        same_ids(encoder, TRICKY, allow_special=True)
    assert plain.encode("今日は良い天気です。") == plain.reference_encode(["今日は良い天気です。"])[0]
    assert len(plain.encode("今日は良い天気です。")) < len("今日は良い天気です。")  # merges applied


def test_every_code_point_is_classified_as_the_library_does(plain):
    """One string of every code point: the pieces and byte fallback beyond the class table too."""
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    same_ids(plain, [text])
    assert char_classes().shape == (CLASS_LIMIT,)


def test_a_long_piece_is_encoded_as_the_library_does(plain):
    same_ids(plain, ["".join(TEXTS).replace("。", "")])  # thousands of characters with no cut


def test_a_tokenizer_it_does_not_implement_is_left_to_the_library(plain):
    tok = Encoder.from_json(plain.to_json()).tokenizer
    tok.normalizer = normalizers.NFKC()
    with pytest.raises(Unsupported, match="no normalizer"):
        CompiledBPE(tok)
    fallback = Encoder(tok)
    assert fallback.compiled is None
    assert fallback.encode("ＡＢＣ") == fallback.reference_encode(["ＡＢＣ"])[0]
    assert fallback.encode_arrays(["ＡＢＣ"])[0].dtype == np.int32


def test_overlapping_added_tokens_and_truncation_are_left_to_the_library(plain):
    """The library matches a special token even where it encodes it as text, hiding a
    non-special token that overlaps it; truncation cuts ids. Neither is implemented here."""
    tok = Encoder.from_json(plain.to_json()).tokenizer
    tok.add_tokens([AddedToken("|>x", special=False, normalized=False)])
    with pytest.raises(Unsupported, match="added tokens that do not overlap"):
        CompiledBPE(tok)
    fallback = Encoder(tok)
    assert fallback.compiled is None and fallback.encode("<|pad|>x") == fallback.reference_encode(["<|pad|>x"])[0]
    tok = Encoder.from_json(plain.to_json()).tokenizer
    tok.enable_truncation(2)
    with pytest.raises(Unsupported, match="no truncation"):
        CompiledBPE(tok)
