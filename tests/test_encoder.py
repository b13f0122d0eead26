import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corpus.normalize import normalize
from encoder.bpe import EOT, PAD, RESERVED_TAGS, EncoderSettings, train
from flows import stages
from flows.config import parse_config

TEXTS = [
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
    "今日はとても良い天気ですね。明日も晴れるといいのですが、天気予報では雨だそうです。",
    "カタカナのコンピューターとインターネットとソフトウェア。Python 3.11 と JAX 0.10。",
    "町の図書館は十時に開きます。子どもたちは絵本を読むのが大好きです。",
] * 20

TRICKY = [
    "👨‍👩‍👧‍👦 👍🏽 🇯🇵 ❤️",
    "𠮷野家の𩸽",
    "ｶﾞｷﾞｸﾞ ﾊﾟﾋﾟ",
    "e\u0301 か\u3099",
    "line1\r\nline2\tTab\u3000全角\u00a0nbsp",
    "   indented\n\n\n    more",
    "user typed <|endoftext|> and <|pad|> literally",
    "<SP><BR><URL><EMAIL> tags from the seed",
    "",
    "\x00\x7f\ufffd",
    # One case each, alone and in Japanese context: must decode to exactly the same string.
    "👨‍👩‍👧‍👦",  # ZWJ family
    "👍🏽",  # skin tone modifier
    "🇯🇵",  # regional indicator pair
    "❤️",  # VS16
    "𠮷", "𩸽", "𪚲", "𠀋", "叱󠄀",  # non-BMP kanji, and an ideographic variation selector (U+E0100)
    "ｶﾞｷﾞ", "ﾊﾟﾋﾟﾌﾟ｡ｰ",  # half-width kana with (semi-)voiced marks as separate characters
    "e\u0301", "か\u3099", "cafe\u0301のは\u309a",  # combining marks, not composed
    "a\r\nb\r\n\r\nc\rd",  # CRLF and a lone CR
    "\t", "\t\t字下げ\tと\tタブ",
    "\u3000", "\u3000\u3000全角の\u3000空白",
    "\u00a0", "価格\u00a0100円",
    "<|endoftext|>", "<|pad|>", "文書<|endoftext|>の途中",
    "<SP>", "<BR>", "<URL>", "<EMAIL>", "<TEL>", "<DATE>", "<PRICE>", "<URL", "URL>", "<<URL>>", "<url>",
    "詳細は <URL> まで。<DATE>に<PRICE>で発売。<SP>と<BR>",
    "ＡＢＣ１２３！？",  # full-width forms (NFKC would change them)
]


@pytest.fixture(scope="module")
def encoder():
    return train(TEXTS, EncoderSettings(vocab_size=600), "tok-test")


TAGGED = [normalize(t, content_tags=True) for t in [
    "詳細は https://example.jp/a まで。連絡先 info@example.jp、03-1234-5678。2026年1月5日に1,000円で発売。",
    "公式サイト https://example.com/news をご覧ください。価格は ¥2,980 です。",
]] * 10


@pytest.fixture(scope="module")
def tagged():
    """An encoder with the content tags reserved, trained on text where the corpus stage put them."""
    return train(TEXTS + TAGGED, EncoderSettings(vocab_size=600, reserved_tags=True), "tok-tagged")


@pytest.fixture(params=["plain", "tagged"])
def any_encoder(request, encoder, tagged):
    return encoder if request.param == "plain" else tagged


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_round_trip(any_encoder, text):
    assert any_encoder.decode(any_encoder.encode(text)) == text
    assert any_encoder.decode(any_encoder.encode(f"今日は{text}です")) == f"今日は{text}です"
    assert any_encoder.decode(any_encoder.encode_batch([text])[0]) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_round_trips(encoder, text):
    assert encoder.decode(encoder.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=8), st.sampled_from([*RESERVED_TAGS, EOT, PAD, "<", ">"]))).map("".join))
def test_text_with_tags_round_trips(tagged, text):
    assert tagged.decode(tagged.encode(text)) == text


def test_literal_special_token_is_plain_text_unless_allowed(any_encoder):
    e = any_encoder
    for special, special_id in ((EOT, e.eot_id), (PAD, e.pad_id)):
        typed = e.encode(f"a{special}b")
        assert special_id not in typed and len(typed) > 3
        assert special_id not in e.encode_batch([special])[0]
        assert e.encode(special, allow_special=True) == [special_id]
        assert special_id in e.encode(f"a{special}b", allow_special=True)
    assert (e.eot_id, e.pad_id) == (0, 1)


def test_reserved_tags_are_single_plain_tokens(encoder, tagged):
    ids = [tagged.tokenizer.token_to_id(t) for t in RESERVED_TAGS]
    assert ids == [2, 3, 4, 5, 6] and tagged.reserved_tags == RESERVED_TAGS and tagged.vocab_size <= 600
    for tag, tag_id in zip(RESERVED_TAGS, ids):
        # The same token whether the corpus stage wrote it or a user typed it, with or without allow_special.
        assert tagged.encode(tag) == [tag_id] == tagged.encode(tag, allow_special=True)
        assert tag_id in tagged.encode(f"詳細は{tag}まで")
        assert tagged.decode([tag_id]) == tag
    line = TAGGED[0]
    assert sum(i in ids for i in tagged.encode(line)) == line.count("<")
    # Text that only looks like a tag is plain text; without reserved_tags, no tag is a token.
    assert len(tagged.encode("<SP>")) > 1 and len(tagged.encode("<url>")) > 1
    assert encoder.reserved_tags == [] and len(encoder.encode("<URL>")) > 1
    # The byte tokens follow the added tokens.
    assert tagged.tokenizer.token_to_id("<0x00>") == 7 and encoder.tokenizer.token_to_id("<0x00>") == 2


def test_encoder_stage_reserves_tags_when_the_corpus_writes_them():
    base = "sources:\n  - name: a\n    start_urls: ['http://a.example/']\n"
    assert not stages.encoder_settings(parse_config(base)).reserved_tags
    assert stages.encoder_settings(parse_config(base + "clean: {content_tags: true}\n")).reserved_tags
    assert stages.encoder_settings(parse_config(base + "encoder: {reserved_tags: true}\n")).reserved_tags


def test_bpe_dropout_resegments_losslessly_and_is_seeded(encoder):
    text = "今日はとても良い天気ですね。明日も晴れるといいのですが、天気予報では雨だそうです。" * 4
    plain = encoder.encode(text)
    runs = [encoder.dropout(plain, 0.5, np.random.default_rng(seed)) for seed in range(5)]
    assert all(encoder.decode(r) == text for r in runs)
    assert len({tuple(r) for r in runs}) > 1 and min(len(r) for r in runs) > len(plain)
    assert max(max(r) for r in runs) < encoder.vocab_size  # the same vocabulary
    assert encoder.dropout(plain, 0.5, np.random.default_rng(3)) == runs[3]  # seeded
    assert encoder.dropout(plain, 0.0, np.random.default_rng(0)) == plain
    assert encoder.encode(text) == plain  # encoding itself stays deterministic
    # Fully undone (p near 1), every token is a single character or a byte.
    finest = encoder.dropout(plain, 0.999999, np.random.default_rng(0))
    assert all(len(encoder.decode([i])) <= 1 for i in finest) and encoder.decode(finest) == text
    with pytest.raises(ValueError):
        encoder.dropout(plain, 1.0, np.random.default_rng(0))


def test_digits_are_split_and_japanese_merges(encoder):
    pieces = [encoder.decode([i]) for i in encoder.encode("2026年")]
    assert pieces[:4] == ["2", "0", "2", "6"]
    assert len(encoder.encode("今日はとても良い天気ですね")) < len("今日はとても良い天気ですね")


def test_the_same_text_trains_the_same_tokenizer_in_any_process():
    """The trainer's own alphabet limit broke ties between equally frequent characters in a hash
    map's order, which differs between processes: the vocabulary changed from run to run."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import hashlib; from encoder.bpe import EncoderSettings, train; from tests.test_encoder import TEXTS; "
        "print(hashlib.sha256(train(TEXTS, EncoderSettings(vocab_size=300)).to_json().encode()).hexdigest())"
    )
    root = Path(__file__).resolve().parents[1]
    digests = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True).stdout
        for _ in range(3)
    }
    assert len(digests) == 1
