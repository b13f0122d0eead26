"""The Japanese quality rules: each with a document that passes and one that fails."""

import json
import random
from collections import Counter
from datetime import datetime, timedelta, timezone

import hypothesis
import pyarrow as pa
import pytest
from hypothesis import given, strategies as st

from corpus.clean import RULES, CleanSettings, Thresholds, clean
from corpus.normalize import normalize
from corpus.quality import ngram_signals, signals
from corpus.schema import DOC, DROPPED, EXTRACTED
from corpus.storage import Storage

SENTENCES = [
    "みどり町の朝は、川霧がゆっくりと晴れていくところから始まります。",
    "商店街のパン屋さんは五時に火を入れ、焼きたての香りが通りに広がります。",
    "子どもたちは橋を渡って学校へ向かい、おじいさんたちは縁側でお茶を飲んでいます。",
    "昼になると役場の前の広場に人が集まり、季節の野菜を売る小さな市が開かれます。",
    "午後の図書館は静かで、窓際の席では高校生が試験の勉強に集中していました。",
    "夕方には西の山に日が沈み、田んぼの水面が一面の茜色に染まっていきます。",
    "駅前の喫茶店では、常連のお客さんが店主と将棋の話で盛り上がっていました。",
    "秋祭りの準備が始まると、公民館からは太鼓の練習の音が毎晩聞こえてきます。",
    "川沿いの遊歩道には桜並木が続き、春には遠くから見物に来る人もいるそうです。",
    "冬の朝は冷え込みが厳しく、屋根に積もった雪が朝日を受けてきらきらと光ります。",
    "町の歴史を調べている先生によると、この通りは江戸時代の街道の名残だそうです。",
    "雨の日には長靴を履いた子どもたちが、わざと水たまりを選んで歩いていきます。",
    "隣町との境にある峠道は、紅葉の季節になると写真を撮る人でにぎわいます。",
    "祖母が漬けた梅干しは酸っぱくて、一粒でご飯を一杯食べられるほどでした。",
    "夏休みの宿題に、近所の神社の由来を聞いて回ったことを今でも覚えています。",
    "新しくできた公園には大きな滑り台があり、週末は家族連れでいっぱいになります。",
    "郵便局の局長さんは町のことなら何でも知っていて、道を聞くと丁寧に教えてくれます。",
    "古い酒蔵を改装した資料館では、昔の農具や暮らしの道具が展示されています。",
    "台風が過ぎた翌朝、空は驚くほど青く澄みわたり、遠くの島まで見えました。",
    "年末になると商店街に飾りつけがされて、夜遅くまで明かりが灯っています。",
]
PROSE = "".join(SENTENCES)
NOW = datetime(2026, 11, 1, tzinfo=timezone.utc)


def run_clean(tmp_path, docs, settings=None, name="c"):
    """docs: (url, text) or (url, text, source, genre, fetched_at); returns {url: kept doc or dropped row}."""
    storage = Storage(str(tmp_path / name))
    rows = []
    for d in docs:
        url, text, source, genre, fetched = (*d, "s", "blog", NOW)[:5] if len(d) == 2 else d
        rows.append({"url": url, "source": source, "genre": genre, "fetched_at": fetched, "content_sha1": "0",
                     "title": "", "published": "", "lang": "ja", "text": text})
    storage.write_parquet("e/extracted.parquet", pa.Table.from_pylist(rows, schema=EXTRACTED))
    stats = clean(storage, ["e/extracted.parquet"], [], settings or CleanSettings(), "out")
    kept = storage.read_parquet(["out/docs.parquet"])
    dropped = storage.read_parquet(["out/dropped.parquet"])
    assert kept.schema.equals(DOC) and dropped.schema.equals(DROPPED)
    return {r["url"]: r for r in kept.to_pylist()}, {r["url"]: r for r in dropped.to_pylist()}, stats


def random_chars(seed: int, alphabet: str, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


KANJI = "".join(chr(c) for c in range(0x4E00, 0x9FFF))


def shuffled_prose(seed: int, n: int = 20) -> str:
    rng = random.Random(seed)
    return "".join(rng.sample(SENTENCES, n))


# One failing document per rule; the passing document is PROSE itself.
FAILING = {
    "too_short": ("短い文です。", {}),
    "too_long": (PROSE + PROSE, {"max_chars": 1000}),
    "not_japanese": ("This page is written in English for the visitors who come to the small town by the river. " * 6, {}),
    "low_hiragana": (random_chars(1, KANJI[:3000], 700) + PROSE[:150], {"max_zlib_ratio": 1}),
    "high_katakana": ("コンピュータネットワークセキュリティマネジメントシステムソリューション。" * 12 + PROSE[:200], {}),
    "short_sentences": ("".join(f"{w}だ。" for w in "雨風雪雲空海山川森林花草木石砂土火水光音色形心夢夜朝昼星月日年春夏秋冬東西南北上下左右前後内外" * 3) + PROSE[:300], {}),
    "long_sentences": ("、".join(s.rstrip("。") for s in SENTENCES) + "。", {}),
    "overlong_sentence": (PROSE + "、".join(s.rstrip("。") for s in SENTENCES[:6]) + "。", {}),
    "dup_lines": ("\n".join([SENTENCES[0]] * 8 + SENTENCES[1:12]), {}),
    "dup_line_chars": ("\n".join([SENTENCES[2]] * 8 + SENTENCES[3:20]), {"max_dup_line_ratio": 1}),
    "dup_sentences": ("".join([SENTENCES[0]] * 8 + SENTENCES[1:12]), {}),
    "dup_sentence_chars": ("".join([SENTENCES[2]] * 8 + SENTENCES[3:20]), {"max_dup_sentence_ratio": 1}),
    "top_2gram": ("ああ" * 150 + PROSE[:400], {}),
    "top_3gram": ("abc" * 120 + PROSE[:500], {"max_top_2gram": 1}),
    "top_4gram": ("abcd" * 100 + PROSE[:600], {"max_top_2gram": 1, "max_top_3gram": 1}),
    "dup_5gram": (PROSE + "焼きたての香り" * 40, {}),
    "dup_10gram": (PROSE + "".join(f"{i}回目、焼きたての香りが通りに広がる" for i in range(6)), {}),
    "trailing_off": ("".join(s.rstrip("。") + "…。" for s in SENTENCES[:8]) + "".join(SENTENCES[8:]), {}),
    "ng_words": (PROSE + "出会い系アダルト無修正オンラインカジノ情報商材" * 3, {}),
    "too_compressible": ("\n".join(SENTENCES * 6), {}),
    "incompressible": (random_chars(0, KANJI, 800) + PROSE[:100], {}),
}


def test_every_rule_has_a_failing_document():
    assert set(FAILING) >= {r[0] for r in RULES} - {"dup_6gram", "dup_7gram", "dup_8gram", "dup_9gram"}


def test_natural_prose_passes_every_rule(tmp_path):
    kept, dropped, _ = run_clean(tmp_path, [("http://a/ok", PROSE), ("http://a/ok2", shuffled_prose(1))])
    assert set(kept) == {"http://a/ok", "http://a/ok2"}, {u: r["reasons"] for u, r in dropped.items()}
    values = json.loads(kept["http://a/ok"]["signals"])
    assert values["hiragana_ratio"] > 0.3 and values["zlib_ratio"] < 0.7


@pytest.mark.parametrize("reason", sorted(FAILING))
def test_rule_drops_its_failing_document_and_says_why(tmp_path, reason):
    text, overrides = FAILING[reason]
    settings = CleanSettings(**overrides)
    kept, dropped, stats = run_clean(tmp_path, [("http://a/ok", PROSE), ("http://a/bad", text)], settings)
    assert "http://a/ok" in kept, dropped.get("http://a/ok", {}).get("reasons")
    row = dropped["http://a/bad"]
    assert reason in row["reasons"] and row["stage"] == "clean"
    detail = json.loads(row["detail"])
    assert "n_chars" in detail and stats["dropped"][reason] == 1


def test_blocked_domains_and_their_subdomains_are_dropped(tmp_path):
    settings = CleanSettings(blocked_domains=["spam.example"])
    docs = [("http://www.spam.example/a", PROSE), ("http://notspam.example/b", shuffled_prose(2))]
    kept, dropped, _ = run_clean(tmp_path, docs, settings)
    assert dropped["http://www.spam.example/a"]["reasons"] == ["blocked_domain"] and "http://notspam.example/b" in kept


def test_a_refetched_page_supersedes_its_older_copy(tmp_path):
    docs = [("http://a/p", PROSE, "s", "blog", NOW), ("http://a/p", PROSE + "追記しました。", "s", "blog", NOW + timedelta(days=7))]
    kept, dropped, _ = run_clean(tmp_path, docs)
    assert kept["http://a/p"]["text"].endswith("追記しました。")
    assert dropped["http://a/p"]["reasons"] == ["superseded"]


def test_genre_and_source_overrides(tmp_path):
    dialogue = "\n".join(f"「{clause}。」" for s in SENTENCES for clause in s.rstrip("。").split("、"))
    docs = [("http://n/1", dialogue, "aozora", "novel", NOW), ("http://b/1", dialogue, "blog1", "blog", NOW),
            ("http://n/2", dialogue, "strict", "novel", NOW)]
    # Dialogue: short sentences, and 。」「 repeated on every line.
    novel = {"min_mean_sentence_chars": 8, "max_top_4gram": 0.25, "max_dup_5gram": 0.25, "max_dup_6gram": 0.2}
    settings = CleanSettings(per_genre={"novel": novel},
                             per_source={"strict": {"min_mean_sentence_chars": 20}})
    kept, dropped, _ = run_clean(tmp_path, docs, settings)
    assert "http://n/1" in kept
    assert "short_sentences" in dropped["http://b/1"]["reasons"]
    assert "short_sentences" in dropped["http://n/2"]["reasons"]


def test_overrides_must_name_thresholds():
    with pytest.raises(ValueError, match="not thresholds"):
        CleanSettings(per_genre={"novel": {"min_hiragana": 0.1}})
    with pytest.raises(ValueError):
        CleanSettings(per_source={"x": {"min_hiragana_ratio": 3}})
    assert CleanSettings(per_genre={"novel": {"min_chars": 10}}).thresholds("s", "novel").min_chars == 10
    assert Thresholds().min_chars == 400


def test_bad_input_is_counted_and_dropped_never_fatal(tmp_path):
    huge = "あ" * (50 * 1024 * 1024 // 3)  # a 50 MB single document
    docs = [
        ("http://x/empty", ""),
        ("http://x/huge", huge),
        ("http://x/controls", "\x00\x01\x02\x1b[31m" * 50 + "\x7f"),
        ("http://x/ok", PROSE),
    ]
    kept, dropped, stats = run_clean(tmp_path, docs)
    assert set(kept) == {"http://x/ok"}
    assert dropped["http://x/huge"]["reasons"] == ["too_long"]
    assert "too_short" in dropped["http://x/empty"]["reasons"]
    assert "too_short" in dropped["http://x/controls"]["reasons"]
    assert stats["documents"] == 4 and stats["kept"] == 1


def test_lone_surrogates_from_a_broken_decode_are_removed():
    broken = b"\xe5\xa3\x8a\xe3\x82\x8c\xff\xfe".decode("utf-8", "surrogateescape")
    assert normalize(broken) == "壊れ"
    assert signals(broken, None)["zlib_ratio"] > 0


def test_normalize_with_content_tags():
    text = "詳細は https://example.jp/a?b=1 まで。連絡先 info@example.co.jp、03-1234-5678。２０２４年３月１日に¥1,200で発売。"
    assert normalize(text, content_tags=True) == "詳細は <URL> まで。連絡先 <EMAIL>、<TEL>。<DATE>に<PRICE>で発売。"
    assert normalize(text) != normalize(text, content_tags=True)


def test_ngram_signals_measure_repetition():
    assert ngram_signals("")["top_2gram"] == 0
    assert ngram_signals("abababab")["top_2gram"] == pytest.approx(4 * 2 / 8)
    repeated = ngram_signals("0123456789" * 2)
    assert repeated["dup_10gram"] == pytest.approx(0.5)  # the second copy repeats the first
    assert signals(PROSE, None)["dup_5gram"] < 0.15


def _ngram_signals_by_definition(text: str) -> dict[str, float]:
    """The n-gram signals computed from their definitions, on strings, in plain Python."""
    out = {}
    for n in (2, 3, 4):
        grams = Counter(text[i : i + n] for i in range(len(text) - n + 1))
        out[f"top_{n}gram"] = max(grams.values()) * n / len(text) if grams else 0.0
    for n in range(5, 11):
        seen, covered = set(), set()
        for i in range(len(text) - n + 1):
            if text[i : i + n] in seen:
                covered.update(range(i, i + n))
            seen.add(text[i : i + n])
        out[f"dup_{n}gram"] = len(covered) / len(text) if text else 0.0
    return out


@hypothesis.settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "ab", "あいう", "abcab", "𠮷", "\n", "あいうえおか"]), max_size=40).map("".join)
    | st.text(max_size=60)
)
def test_compiled_ngram_signals_match_their_definition(text):
    assert ngram_signals(text) == pytest.approx(_ngram_signals_by_definition(text))


def test_worker_processes_give_the_same_result_as_one_process(tmp_path, monkeypatch):
    import corpus.clean

    monkeypatch.setattr(corpus.clean, "POOL_SLICE_DOCS", 2)  # several slices from a few documents
    docs = [(f"http://a/{i}", shuffled_prose(i)) for i in range(7)] + [("http://a/bad", FAILING["dup_lines"][0])]
    one = run_clean(tmp_path, docs, CleanSettings(workers=1), name="one")
    two = run_clean(tmp_path, docs, CleanSettings(workers=2), name="two")
    assert one == two and len(one[0]) == 7 and "dup_lines" in one[1]["http://a/bad"]["reasons"]
