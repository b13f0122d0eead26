"""``jagpt encoder eval`` on a small corpus: real tokenizers (jagpt's, SentencePiece, the char-pair
baseline) trained on the sample site's paragraphs, written as DOC docs.parquet + corpus/current.json."""

import glob
import os
import re

import pyarrow as pa
import pytest

from corpus.explain import write_current
from corpus.schema import DOC
from corpus.storage import Storage
from encoder.bpe import EncoderSettings, train
from encoder.evaluate import COLUMNS, CharPairTokenizer, evaluate, japanese_lines, split_corpus
from flows import cli, stages

SITE = os.path.join(os.path.dirname(stages.__file__), "..", "crawlers", "sample-site")
# Full-width forms, tabs, U+3000, half-width kana: an NFKC normalizer changes them, jagpt keeps them.
HELD_OUT_TRICKY = [
    "ＡＢＣ株式会社は１２３名。\tタブの後に　全角スペース。ｶﾀｶﾅも。",
    "価格：１，０００円（税込）\n\t字下げした行\n😀 と 𠮷",
]


def paragraphs() -> list[str]:
    out: list[str] = []
    for path in sorted(glob.glob(os.path.join(SITE, "*", "*.html"))):
        if "update" in path:  # the planted near duplicate
            continue
        try:
            with open(path, encoding="utf-8") as f:
                html = f.read()
        except UnicodeDecodeError:  # the Shift_JIS page
            continue
        out += [p for p in re.findall(r"<p>([^<]{40,})</p>", html) if p not in out]
    return out


def doc(doc_id: str, text: str) -> dict:
    return {"doc_id": doc_id, "url": f"http://a.example/{doc_id}", "source": "a", "genre": "blog", "fetched_at": None,
            "title": "", "text": text, "n_chars": len(text), "hiragana_ratio": 0.5, "japanese_ratio": 1.0,
            "katakana_ratio": 0.0, "dup_cluster": None}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two dedup links' docs.parquet and corpus/current.json.

    Val (doc ids 0...) holds every 5th paragraph and the tricky texts."""
    root = tmp_path_factory.mktemp("eval")
    storage = Storage(str(root))
    paras = paragraphs()
    rows = [doc(f"{'0' if i % 5 == 0 else 'f'}{i:031x}", p) for i, p in enumerate(paras)]
    rows += [doc(f"0{900 + i:031x}", t) for i, t in enumerate(HELD_OUT_TRICKY)]
    half = len(rows) // 2
    storage.write_parquet("corpus/dedup/l1/docs.parquet", pa.Table.from_pylist(rows[:half], schema=DOC))
    storage.write_parquet("corpus/dedup/l2/docs.parquet", pa.Table.from_pylist(rows[half:], schema=DOC))
    write_current(storage, [], [], ["corpus/dedup/l1", "corpus/dedup/l2"])
    return root, storage, ["corpus/dedup/l1/docs.parquet", "corpus/dedup/l2/docs.parquet"]


def test_split_follows_the_doc_id_hash(corpus):
    _, storage, files = corpus
    train, val = split_corpus(storage, files, 0.2)
    assert all(t in val for t in HELD_OUT_TRICKY) and not set(train) & set(val)
    assert len(val) == len(paragraphs()[::5]) + len(HELD_OUT_TRICKY)
    capped, _ = split_corpus(storage, files, 0.2, train_chars=1000)
    assert sum(len(t) for t in capped) == 1000


def test_eval_table_rows_and_round_trip(corpus):
    _, storage, files = corpus
    result = evaluate(storage, files, EncoderSettings(vocab_size=2000), 0.2, threads=1)
    assert result["errors"] == {}
    rows = {r["tokenizer"]: r for r in result["rows"]}
    assert list(rows) == [
        "jagpt", "tokenizers-library-bpe", "sentencepiece-bpe-default", "sentencepiece-bpe-identity",
        "sentencepiece-unigram-default", "sentencepiece-unigram-identity", "char-pair",
    ]
    assert all(list(r) == COLUMNS for r in rows.values())
    jagpt = rows["jagpt"]
    assert jagpt["round_trip_docs"] == 1.0 and jagpt["vocab_size"] == 2000
    assert rows["char-pair"]["round_trip_docs"] == 1.0 and rows["char-pair"]["vocab_size"] == 2000
    library = rows["tokenizers-library-bpe"]  # the same design, trained and encoded by the library
    assert library["round_trip_docs"] == 1.0 and library["vocab_size"] <= 2000
    # NFKC turns full-width letters and digits into ASCII, so the default SentencePiece is lossy here.
    assert rows["sentencepiece-bpe-default"]["round_trip_docs"] < 1.0
    assert rows["sentencepiece-unigram-default"]["round_trip_docs"] < 1.0
    for r in rows.values():
        assert r["chars_per_token"] > 1.0 and r["bytes_per_token"] > 1.0 and r["ja_chars_per_token"] > 1.0
        assert 0 < r["vocab_used"] <= 1 and 0 <= r["byte_fallback"] < 1 and r["encode_mb_s"] > 0
    assert rows["char-pair"]["byte_fallback"] > 0  # 𠮷 and 😀 are not among its characters
    assert result["japanese_lines"] > 0 and result["eval_documents"] == len(paragraphs()[::5]) + 2


def test_japanese_lines_are_all_kana_and_kanji():
    assert japanese_lines(["今日は、晴れ。\nPython を使う\n123\nカタカナー々"]) == ["今日は、晴れ。", "カタカナー々"]


def test_char_pair_baseline_is_lossless_and_greedy():
    tok = CharPairTokenizer(["ああいいああいい", "うえお"], 256 + 4)
    assert tok.vocab_size == 260
    ids = tok.encode("ああい𠮷x")
    assert ids[0] == tok.pairs["ああ"] and ids[-1] == ord("x")
    assert tok.decode(ids) == "ああい𠮷x"
    assert sum(tok.fallback[i] for i in ids) == 4  # 𠮷 as its four UTF-8 bytes


def test_cli_encoder_eval_writes_the_table(corpus, capsys):
    root, storage, _ = corpus
    config = root / "jagpt.yaml"
    config.write_text(
        "sources:\n  - name: a\n    start_urls: ['http://a.example/']\n"
        f"storage: {{root: '{root}'}}\nencoder: {{vocab_size: 2000}}\nshards: {{val_fraction: 0.2}}\n"
    )
    assert cli.main(["encoder", "eval", "--config", str(config), "--train-chars", "20000"]) == 0
    out = capsys.readouterr().out
    assert "sentencepiece-unigram-identity" in out and "char-pair" in out
    (folder,) = storage.glob("evals/encoder/ev-*")
    assert storage.exists(f"{folder}/eval.md") and storage.exists(f"{folder}/tokenizer.json")
    assert [r["tokenizer"] for r in storage.read_json(f"{folder}/eval.json")["rows"]][0] == "jagpt"
    # Same corpus and settings: the stored table, nothing retrained.
    assert cli.main(["encoder", "eval", "--config", str(config), "--train-chars", "20000"]) == 0
    assert "(stored result)" in capsys.readouterr().out


def test_cli_encoder_eval_of_a_stored_tokenizer(corpus, capsys):
    root, storage, _ = corpus
    config = root / "stored.yaml"
    config.write_text(
        "sources:\n  - name: a\n    start_urls: ['http://a.example/']\n"
        f"storage: {{root: '{root}'}}\nencoder: {{vocab_size: 2000}}\nshards: {{val_fraction: 0.2}}\n"
    )
    assert cli.main(["encoder", "eval", "--config", str(config), "--tokenizer", "newest"]) == 1
    assert "no trained encoder" in capsys.readouterr().err
    stored = train(paragraphs(), EncoderSettings(vocab_size=2000), "tok-stored")
    storage.write_text("tokenizers/tok-stored/tokenizer.json", stored.to_json())
    storage.publish("tokenizers/tok-stored", {"finished_at": "2026-01-05T00:00:00Z"})
    assert cli.main(["encoder", "eval", "--config", str(config), "--tokenizer", "newest", "--train-chars", "5000"]) == 0
    assert "jagpt tok-stored" in capsys.readouterr().out
