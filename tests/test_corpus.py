import json
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from corpus.clean import CleanSettings, clean
from corpus.dedup import DedupSettings, dedup, detection_probability, minhash, near_duplicate_clusters
from corpus.extract import ExtractSettings, extract_html
from corpus.normalize import normalize
from corpus.schema import DOC, DROPPED, EXTRACTED
from corpus.storage import Storage

STORY = (
    "みどり町の朝は、川霧がゆっくりと晴れていくところから始まります。"
    "商店街のパン屋さんは五時に火を入れ、焼きたての香りが通りに広がります。"
    "子どもたちは橋を渡って学校へ向かい、おじいさんたちは縁側でお茶を飲みながら天気の話をしています。"
    "昼になると役場の前の広場に人が集まり、季節の野菜を売る小さな市が開かれます。"
)


def test_normalize_folds_width_newlines_controls_and_spaces():
    assert normalize("ＡＢＣ\r\n１２３\x00\u3000\u3000x\ud800") == "ABC\n123 x"
    assert normalize("a\n\n\n\nb") == "a\n\nb"
    assert normalize("ｶﾞ", "none") == "ｶﾞ"


def test_extract_html_gets_main_text_title_and_lang():
    html = f"<html lang='ja'><head><title>町の朝</title></head><body><nav>トップ | ブログ</nav><article><p>{STORY}</p></article></body></html>"
    got = extract_html(html, "http://x.example/a", ExtractSettings())
    assert got["lang"] == "ja" and got["title"] == "町の朝" and "川霧" in got["text"]
    assert extract_html("<html><body><nav><a href='/'>トップ</a></nav></body></html>", "http://x/", ExtractSettings()) is None


def _extracted(storage, rows, name="e"):
    ts = datetime(2026, 1, 1, tzinfo=timezone.utc)
    full = [
        {"url": u, "source": "s", "genre": "blog", "fetched_at": ts, "content_sha1": "0", "title": "", "published": "", "lang": "ja", "text": t}
        for u, t in rows
    ]
    storage.write_parquet(f"{name}/extracted.parquet", pa.Table.from_pylist(full, schema=EXTRACTED))
    storage.write_parquet(f"{name}/dropped.parquet", pa.Table.from_pylist([], schema=DROPPED))
    return [f"{name}/extracted.parquet"], [f"{name}/dropped.parquet"]


def test_clean_keeps_japanese_prose_and_explains_every_drop(tmp_path):
    storage = Storage(str(tmp_path))
    rows = [
        ("http://a/1-first", STORY * 2),
        ("http://a/2-copy", STORY * 2),  # exact duplicate of ok
        ("http://a/short", "短い文です。"),
        ("http://a/en", "This page is written in English for visitors to the town. " * 10),
        ("http://a/kata", "カタカナ" * 60 + "。"),
        ("http://a/menu", " ".join(["トップページ", "ブログ", "お知らせ", "町ことば辞典"] * 20)),
    ]
    stats = clean(storage, *_extracted(storage, rows), CleanSettings(min_chars=100), "out")
    docs = storage.read_parquet(["out/docs.parquet"])
    dropped = {r["url"]: r for r in storage.read_parquet(["out/dropped.parquet"]).to_pylist()}
    assert docs.schema.equals(DOC) and docs["url"].to_pylist() == ["http://a/1-first"]
    assert dropped["http://a/2-copy"]["reasons"] == ["exact_duplicate"]
    assert "too_short" in dropped["http://a/short"]["reasons"]
    assert "not_japanese" in dropped["http://a/en"]["reasons"]
    assert "high_katakana" in dropped["http://a/kata"]["reasons"]
    assert "overlong_sentence" in dropped["http://a/menu"]["reasons"]
    assert json.loads(dropped["http://a/en"]["detail"])["japanese_ratio"] == 0.0
    assert stats["kept"] == 1 and stats["documents"] == 6


def _edit(text: str, n: int) -> str:
    sentences = text.split("。")
    for i in range(n):
        sentences[i * 3] = f"ここは書き換えた文の{i}番目です"
    return "。".join(sentences)


def test_minhash_finds_near_duplicates_but_not_different_texts():
    base = (STORY * 6)
    variants = [base, _edit(base, 2), "まったく別の話題について書かれた文章で、共通する部分はほとんどありません。" * 20]
    labels = near_duplicate_clusters(variants, DedupSettings())
    assert labels[0] == labels[1] != labels[2]


def test_detection_curve_meets_the_targets():
    s = DedupSettings()
    assert detection_probability(0.8, s.bands, s.rows) >= 0.9
    assert detection_probability(0.5, s.bands, s.rows) <= 0.05


def test_minhash_is_deterministic_and_bounded_for_huge_documents():
    s = DedupSettings(max_chars=10_000)
    big = "あ" * 2_000_000
    assert (minhash(big, s) == minhash(big[:10_000], s)).all()
    assert (minhash(STORY, s) == minhash(STORY, s)).all()


def test_dedup_keeps_the_earliest_member_and_records_why(tmp_path):
    storage = Storage(str(tmp_path))
    base = STORY * 6
    ts = [datetime(2026, 1, d, tzinfo=timezone.utc) for d in (2, 1)]
    docs = [
        {"doc_id": f"id{i}", "url": f"http://a/{i}", "source": "s", "genre": "news", "fetched_at": t, "title": "",
         "text": text, "n_chars": len(text), "hiragana_ratio": 0.5, "japanese_ratio": 1.0, "katakana_ratio": 0.0, "dup_cluster": None}
        for i, (t, text) in enumerate(zip(ts, [base, _edit(base, 2)]))
    ]
    storage.write_parquet("c/docs.parquet", pa.Table.from_pylist(docs, schema=DOC))
    storage.write_parquet("c/dropped.parquet", pa.Table.from_pylist([], schema=DROPPED))
    stats = dedup(storage, "c", DedupSettings(), "d")
    kept = storage.read_parquet(["d/docs.parquet"]).to_pylist()
    (drop,) = storage.read_parquet(["d/dropped.parquet"]).to_pylist()
    assert [k["url"] for k in kept] == ["http://a/1"]  # fetched first
    assert drop["reasons"] == ["near_duplicate"] and json.loads(drop["detail"])["kept_url"] == "http://a/1"
    assert stats["near_duplicates"] == 1


def test_a_refetched_page_supersedes_its_older_copy(tmp_path):
    storage = Storage(str(tmp_path))
    old, new = datetime(2026, 1, 1, tzinfo=timezone.utc), datetime(2026, 1, 8, tzinfo=timezone.utc)
    rows = [
        {"url": "http://a/p", "source": "s", "genre": "news", "fetched_at": t, "content_sha1": "0", "title": "",
         "published": "", "lang": "ja", "text": text}
        for t, text in [(old, STORY * 2), (new, STORY * 2 + "追記しました。"), (new, STORY * 2)]
    ]
    rows[2]["url"] = "http://a/q"  # another page that now repeats the old text
    storage.write_parquet("e/extracted.parquet", pa.Table.from_pylist(rows, schema=EXTRACTED))
    clean(storage, ["e/extracted.parquet"], [], CleanSettings(min_chars=100), "out")
    kept = storage.read_parquet(["out/docs.parquet"]).to_pylist()
    dropped = storage.read_parquet(["out/dropped.parquet"]).to_pylist()
    assert sorted((k["url"], k["text"].endswith("追記しました。")) for k in kept) == [("http://a/p", True), ("http://a/q", False)]
    assert [(d["url"], d["reasons"]) for d in dropped] == [("http://a/p", ["superseded"])]
