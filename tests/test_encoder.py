import io

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corpus.schema import DOC
from corpus.storage import Storage
from encoder.bpe import EOT, EncoderSettings, train
from encoder.shards import ShardSettings, build_shards, load_split

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
]


@pytest.fixture(scope="module")
def encoder():
    return train(TEXTS, EncoderSettings(vocab_size=600), "tok-test")


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_strings_round_trip(encoder, text):
    assert encoder.decode(encoder.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_round_trips(encoder, text):
    assert encoder.decode(encoder.encode(text)) == text


def test_literal_special_token_is_plain_text_unless_allowed(encoder):
    assert encoder.eot_id not in encoder.encode(f"a{EOT}b")
    assert encoder.encode(EOT, allow_special=True) == [encoder.eot_id]


def test_digits_are_split_and_japanese_merges(encoder):
    pieces = [encoder.decode([i]) for i in encoder.encode("2026年")]
    assert pieces[:4] == ["2", "0", "2", "6"]
    assert len(encoder.encode("今日はとても良い天気ですね")) < len("今日はとても良い天気ですね")


def test_shards_manifest_and_split(tmp_path, encoder):
    storage = Storage(str(tmp_path))
    docs = [
        {"doc_id": f"0{i:031x}" if i % 3 == 0 else f"f{i:031x}", "url": f"u{i}", "source": "s", "genre": "blog",
         "fetched_at": None, "title": "", "text": TEXTS[i % 4], "n_chars": 1, "hiragana_ratio": 0.0,
         "japanese_ratio": 0.0, "katakana_ratio": 0.0, "dup_cluster": None}
        for i in range(12)
    ]
    # The corpus is one docs.parquet per dedup link; shards read them in order, a batch at a time.
    storage.write_parquet("c1/docs.parquet", pa.Table.from_pylist(docs[:5], schema=DOC))
    storage.write_parquet("c2/docs.parquet", pa.Table.from_pylist(docs[5:], schema=DOC))
    settings = ShardSettings(shard_tokens=100, val_fraction=0.2, batch_docs=2)
    manifest = build_shards(storage, ["c1/docs.parquet", "c2/docs.parquet"], encoder, settings, "sh", "corpus/x")
    train_split = manifest["splits"]["train"]
    assert manifest["tokenizer_id"] == "tok-test" and manifest["dtype"] == "uint16"
    assert all(s["tokens"] == 100 for s in train_split["shards"][:-1])
    assert train_split["documents"] + manifest["splits"]["val"]["documents"] == 12
    tokens = load_split(storage, "sh", "train")
    assert len(tokens) == train_split["tokens"] and (tokens == encoder.eot_id).sum() == train_split["documents"]
    storage.write_bytes("sh/" + train_split["shards"][0]["path"], _npy(np.zeros(100, np.uint16)))
    with pytest.raises(ValueError, match="sha256"):
        load_split(storage, "sh", "train")


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()
