"""Bulk sources: Wikipedia dumps, Aozora Bunko zips and WARC/WET files become raw partitions."""

import bz2
import gzip
import hashlib
import io
import os
import zipfile

import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from corpus.extract import ExtractSettings, extract_partition
from corpus.schema import EXTRACTED, RAW_PAGE
from corpus.storage import Storage
from crawlers.bulk import aozora_to_text, import_bulk, looks_japanese_html, wiki_to_text
from crawlers.crawl import partition_files, raw_partitions

STORY = (
    "みどり町の朝は、川霧がゆっくりと晴れていくところから始まります。"
    "商店街のパン屋さんは五時に火を入れ、焼きたての香りが通りに広がります。"
    "子どもたちは橋を渡って学校へ向かい、おじいさんたちは縁側でお茶を飲みながら天気の話をしています。"
    "昼になると役場の前の広場に人が集まり、季節の野菜を売る小さな市が開かれます。"
)

# -- fixtures the tests write ------------------------------------------------------

ARTICLE = """{{Infobox 人物
| 名前 = 山田{{lang|en|Yamada {{nowrap|Taro}}}}
| 画像 = [[ファイル:Yamada.jpg|200px]]
}}
'''山田太郎'''（やまだ たろう、{{lang-en|Taro Yamada}}、[[1900年]] - [[1980年]]）は、[[日本]]の[[小説家|作家]]である<ref name="a">{{Cite book|title=出典の本}}</ref>。<!-- 隠しコメント -->
[[File:Bar.png|thumb|写真の[[説明]]]]
[[画像:Baz.png|thumb|別の写真]]
== 経歴 ==
* 1900年 [[東京]]に生まれる<ref>脚注の文</ref>
* 1920年 [[東京大学]]を卒業
{| class="wikitable"
|-
! 年 !! 出来事
|-
| 1921 || 表の中身
|}
=== 作品 ===
代表作は『[[みどり町]]』と『[[Re:みどり町]]』で、<span>町の暮らし</span>を描いた。[http://example.com 公式サイト]もある。
__TOC__
[[Category:日本の小説家]]
[[en:Taro Yamada]]
"""


def wiki_page(title: str, ns: int, text: str, redirect: str | None = None, ts: str = "2024-05-01T12:34:56Z") -> str:
    esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    red = f'<redirect title="{redirect}" />' if redirect else ""
    return (
        f"  <page>\n    <title>{title}</title>\n    <ns>{ns}</ns>\n    <id>1</id>\n    {red}\n"
        f"    <revision>\n      <id>2</id>\n      <timestamp>{ts}</timestamp>\n"
        f'      <text bytes="{len(text)}" xml:space="preserve">{esc}</text>\n    </revision>\n  </page>\n'
    )


WIKI_HEAD = (
    '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="ja">\n'
    "  <siteinfo>\n    <sitename>Wikipedia</sitename>\n    <dbname>jawiki</dbname>\n"
    "    <base>https://ja.wikipedia.org/wiki/%E3%83%A1%E3%82%A4%E3%83%B3%E3%83%9A%E3%83%BC%E3%82%B8</base>\n"
    "  </siteinfo>\n"
)
WIKI_PAGES = [
    wiki_page("山田太郎", 0, ARTICLE),
    wiki_page("ヤマダタロウ", 0, "#転送 [[山田太郎]]", redirect="山田太郎"),
    wiki_page("Wikipedia:井戸端", 4, "ここはプロジェクト文書です。" * 5),
    wiki_page("みどり町 (架空)", 0, "'''みどり町'''は架空の町である。\n" + STORY, ts="2023-01-02T03:04:05Z"),
    wiki_page("空の記事", 0, "{{削除依頼}}"),
]


def write_wikipedia(path, pages=WIKI_PAGES, truncate: bool = False) -> str:
    """A multistream bz2 dump: header + first pages in one stream, the rest in another."""
    first = bz2.compress((WIKI_HEAD + "".join(pages[:2])).encode("utf-8"))
    rest = bz2.compress(("".join(pages[2:]) + "</mediawiki>\n").encode("utf-8"))
    path.write_bytes(first + (rest[: len(rest) // 2] if truncate else rest))
    return str(path)


AOZORA_TEXT = "\r\n".join(
    [
        "みどり町の四季",
        "髙橋①郎",
        "",
        "-------------------------------------------------------",
        "【テキスト中に現れる記号について】",
        "",
        "《》：ルビ",
        "（例）川霧《かわぎり》",
        "",
        "｜：ルビの付く文字列の始まりを特定する記号",
        "（例）商店街｜朝市《あさいち》",
        "",
        "［＃］：入力者注　主に外字の説明や、傍点の位置の指定",
        "-------------------------------------------------------",
        "",
        "［＃３字下げ］一［＃「一」は中見出し］",
        "",
        "　みどり町の朝は、川霧《かわぎり》がゆっくりと晴れていくところから始まります。",
        "　商店街の｜朝市《あさいち》には、※［＃「てへん＋劣」、第3水準1-84-77］という字の看板と、",
        "　※［＃「口＋世」、U+546D、12-3］の看板があり、髙橋さんの店は①番地にあります。",
        "［＃改ページ］",
        "",
        "",
        "底本：「みどり町の四季」架空書房",
        "　　1950（昭和25）年1月1日発行",
        "入力：テスト",
        "",
    ]
)


def write_aozora(path, text: str = AOZORA_TEXT, raw: bytes | None = None) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("midori.txt", raw if raw is not None else text.encode("cp932"))
        zf.writestr("midori.png", b"\x89PNG not text")
    return str(path)


def _response(writer: WARCWriter, url: str, body: bytes, content_type: str, date: str, status: str = "200 OK") -> None:
    http = StatusAndHeaders(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))], protocol="HTTP/1.1")
    rec = writer.create_warc_record(
        url, "response", payload=io.BytesIO(body), http_headers=http, warc_headers_dict={"WARC-Date": date}
    )
    writer.write_record(rec)


SJIS_PAGE = (
    f"<html><head><title>みどり町だより</title></head><body><nav>トップ | 記事</nav>"
    f"<article><h1>みどり町だより</h1><p>{STORY}</p><p>{STORY}</p></article></body></html>"
).encode("cp932")


def write_warc(path) -> str:
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        w.write_record(w.create_warc_record("", "warcinfo", payload=io.BytesIO(b"software: test\r\n"), warc_content_type="application/warc-fields"))
        _response(w, "http://sjis.example/midori", SJIS_PAGE, "text/html", "2024-03-04T05:06:07Z")  # no charset anywhere
        utf8 = f'<!doctype html><html lang="ja-JP"><head><meta charset="utf-8"><title>町</title></head><body><p>{STORY}</p></body></html>'
        _response(w, "http://utf8.example/", utf8.encode("utf-8"), "text/html; charset=UTF-8", "2024-03-04T05:06:08Z")
        english = "<html lang='en'><head><title>Green Town</title></head><body><p>" + "Morning in town. " * 40 + "</p></body></html>"
        _response(w, "http://en.example/", english.encode(), "text/html", "2024-03-04T05:06:09Z")
        _response(w, "http://img.example/a.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "image/png", "2024-03-04T05:06:10Z")
        _response(w, "http://bin.example/", b'<html lang="ja">' + b"\x00\x01\x02" * 300, "text/html", "2024-03-04T05:06:11Z")
        _response(w, "http://moved.example/", b"<html lang='ja'>moved</html>", "text/html", "2024-03-04T05:06:12Z", status="301 Moved Permanently")
    return str(path)


def write_wet(path) -> str:
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for url, text in [
            ("http://wet.example/ja", "みどり町だより\n" + STORY),
            ("http://wet.example/en", "Green Town news\n" + "Morning in town. " * 20),
            ("http://wet.example/zh", "绿镇新闻\n" + "早上的小镇很安静。" * 10),
        ]:
            rec = w.create_warc_record(
                url, "conversion", payload=io.BytesIO(text.encode("utf-8")), warc_content_type="text/plain",
                warc_headers_dict={"WARC-Date": "2024-03-05T00:00:00Z"},
            )
            w.write_record(rec)
    return str(path)


def pages_of(storage: Storage, stats: dict) -> list[dict]:
    files = partition_files(storage, stats["partition"])
    for f in files:
        assert pq.read_schema(storage.path(f)).equals(RAW_PAGE)
    return storage.read_parquet(files).to_pylist() if files else []


def extract(storage: Storage, stats: dict, out: str = "out") -> tuple[dict, dict]:
    result = extract_partition(storage, partition_files(storage, stats["partition"]), ExtractSettings(), out)
    kept = storage.read_parquet([f"{out}/extracted.parquet"])
    assert kept.schema.equals(EXTRACTED)
    return result, {k["url"]: k for k in kept.to_pylist()}


# -- Wikipedia -----------------------------------------------------------------------


def test_wiki_markup_becomes_prose():
    text = wiki_to_text(ARTICLE)
    assert text.startswith("山田太郎（やまだ たろう、1900年 - 1980年）は、日本の作家である。")
    for gone in ("{{", "}}", "Infobox", "Yamada", "Cite", "出典の本", "脚注の文", "<ref", "隠しコメント", "写真",
                 "ファイル", "Bar.png", "表の中身", "wikitable", "'''", "Category", "日本の小説家", "Taro", "__TOC__",
                 "[[", "]]", "http://", "<span"):
        assert gone not in text, gone
    lines = text.split("\n")
    assert "経歴" in lines and "作品" in lines  # headings are lines of their own
    assert "1900年 東京に生まれる" in lines and "1920年 東京大学を卒業" in lines  # list items as text
    assert "代表作は『みどり町』と『Re:みどり町』で、町の暮らしを描いた。公式サイトもある。" in lines


def test_wikipedia_dump_imports_articles_only(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    dump = write_wikipedia(tmp_path / "jawiki-20240501-pages-articles.xml.bz2")
    stats = import_bulk(storage, "wikipedia", [dump], "jawiki", batch_rows=1)
    assert stats["stored"] == 2 and stats["parts"] == 2
    assert stats["skipped"] == {"namespace": 1, "redirect": 1}
    assert stats["failed"] == {"empty": 1}
    assert stats["encodings"] == {"utf-8 (bulk)": 2}
    assert stats["partition"] in raw_partitions(storage)
    marker = storage.marker(stats["partition"])
    assert marker["source"] == "jawiki" and marker["genre"] == "encyclopedia" and marker["files"] == ["part-00000.parquet", "part-00001.parquet"]

    pages = {p["url"]: p for p in pages_of(storage, stats)}
    url = "https://ja.wikipedia.org/wiki/%E5%B1%B1%E7%94%B0%E5%A4%AA%E9%83%8E"  # 山田太郎
    assert set(pages) == {url, "https://ja.wikipedia.org/wiki/%E3%81%BF%E3%81%A9%E3%82%8A%E7%94%BA_(%E6%9E%B6%E7%A9%BA)"}
    p = pages[url]
    assert p["content_type"] == "text/plain; charset=utf-8" and p["encoding"] == "utf-8" and p["encoding_source"] == "bulk"
    assert p["final_url"] == url and p["http_status"] == 200 and p["depth"] == 0 and p["run_id"] == stats["run_id"]
    assert p["fetched_at"].isoformat() == "2024-05-01T12:34:56+00:00"  # the revision's timestamp
    body = p["body"].decode("utf-8")
    assert body.startswith("山田太郎\n山田太郎（やまだ たろう、") and "表の中身" not in body
    assert p["content_sha1"] == hashlib.sha1(p["body"]).hexdigest()

    result, kept = extract(storage, stats)
    assert result == {"pages": 2, "extracted": 2, "dropped": {}}
    assert kept[url]["title"] == "山田太郎" and kept[url]["lang"] == "ja" and kept[url]["published"] == ""
    assert kept[url]["text"] == body.strip()


def test_wikipedia_import_is_idempotent(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    dump = write_wikipedia(tmp_path / "jawiki.xml.bz2")
    first = import_bulk(storage, "wikipedia", [dump], "jawiki")
    assert first["cached"] is False
    part = storage.path(first["partition"], "part-00000.parquet")
    before = os.stat(part).st_mtime_ns
    again = import_bulk(storage, "wikipedia", [dump], "jawiki")
    assert again == {**first, "cached": True}
    assert os.stat(part).st_mtime_ns == before
    assert len(raw_partitions(storage)) == 1
    # A changed file is a new import.
    os.utime(dump, ns=(before, before + 10**9))
    third = import_bulk(storage, "wikipedia", [dump], "jawiki")
    assert third["cached"] is False and third["run_id"] != first["run_id"]


def test_unfinished_import_is_redone(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    dump = write_wikipedia(tmp_path / "jawiki.xml.bz2")
    first = import_bulk(storage, "wikipedia", [dump], "jawiki", batch_rows=1)
    storage.remove(f"{first['partition']}/_SUCCESS.json")  # as if killed before publishing
    storage.write_bytes(f"{first['partition']}/part-00009.parquet", b"half")
    again = import_bulk(storage, "wikipedia", [dump], "jawiki", batch_rows=1)
    assert again == {**first, "cached": False}
    assert storage.marker(first["partition"])["files"] == ["part-00000.parquet", "part-00001.parquet"]
    assert not storage.exists(f"{first['partition']}/part-00009.parquet")


def test_truncated_dump_keeps_what_was_read(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    dump = write_wikipedia(tmp_path / "jawiki.xml.bz2", pages=[WIKI_PAGES[0], WIKI_PAGES[1], WIKI_PAGES[3]], truncate=True)
    stats = import_bulk(storage, "wikipedia", [dump], "jawiki")
    assert stats["failed"] == {"truncated": 1}
    assert stats["stored"] == 1 and stats["skipped"] == {"redirect": 1}
    assert [p["body"].decode().split("\n")[0] for p in pages_of(storage, stats)] == ["山田太郎"]


def test_broken_xml_is_counted(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    broken = WIKI_HEAD + WIKI_PAGES[0] + "  <page><title>壊れた</title><ns>0</ns></revision>\n"
    path = tmp_path / "broken.xml.bz2"
    path.write_bytes(bz2.compress(broken.encode("utf-8")))
    stats = import_bulk(storage, "wikipedia", [str(path)], "jawiki")
    assert stats["stored"] == 1 and stats["failed"] == {"xml_error": 1}


# -- Aozora Bunko -------------------------------------------------------------------


def test_aozora_header_footer_ruby_and_notes():
    title, author, prose = aozora_to_text(AOZORA_TEXT)
    assert (title, author) == ("みどり町の四季", "髙橋①郎")
    assert prose.split("\n")[0] == "一"
    assert "みどり町の朝は、川霧がゆっくりと晴れていくところから始まります。" in prose.split("\n")  # lines trimmed
    assert "商店街の朝市には、挘という字の看板と、" in prose  # 第3水準1-84-77 is 挘
    assert "呭の看板があり、髙橋さんの店は①番地にあります。" in prose  # U+546D
    for gone in ("《", "》", "｜", "［＃", "※", "テキスト中に現れる記号", "-----", "底本", "架空書房", "入力："):
        assert gone not in prose, gone


def test_aozora_zips_import(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    good = write_aozora(tmp_path / "000001_ruby_1234.zip")
    undecodable = write_aozora(tmp_path / "000002_bad.zip", raw=b"\x81\x20" * 10)  # not cp932
    (tmp_path / "000003_notzip.zip").write_bytes(b"not a zip at all")
    stats = import_bulk(
        storage, "aozora", [good, undecodable, str(tmp_path / "000003_notzip.zip")], "aozora-dump",
        base_url="https://www.aozora.gr.jp/zips/",
    )
    assert stats["stored"] == 1 and stats["failed"] == {"bad_zip": 1, "decode": 1} and stats["skipped"] == {}
    (page,) = pages_of(storage, stats)
    assert page["url"] == "https://www.aozora.gr.jp/zips/000001_ruby_1234.zip"
    assert page["genre"] == "novel" and page["content_type"].startswith("text/plain")
    assert page["fetched_at"].timestamp() == pytest.approx(os.stat(good).st_mtime, abs=1e-3)
    assert page["body"].decode("utf-8").startswith("みどり町の四季\n髙橋①郎\n\n一\n")

    result, kept = extract(storage, stats)
    assert result["extracted"] == 1
    doc = kept[page["url"]]
    assert doc["title"] == "みどり町の四季" and "髙橋さんの店は①番地" in doc["text"]


def test_aozora_default_url_and_bad_arguments(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    zipped = write_aozora(tmp_path / "w.zip")
    stats = import_bulk(storage, "aozora", [zipped], "aozora-dump")
    assert [p["url"] for p in pages_of(storage, stats)] == ["aozora://w.zip"]
    for kind, name, genre in [("pdf", "x", None), ("aozora", "../x", None), ("aozora", "x", "poetry")]:
        with pytest.raises(ValueError):
            import_bulk(storage, kind, [zipped], name, genre)


# -- Common Crawl WARC / WET ----------------------------------------------------------


def test_prefilter():
    assert looks_japanese_html(b'<!doctype html><html class="x" lang="ja-JP"><title>x</title>')
    assert looks_japanese_html(SJIS_PAGE)
    assert looks_japanese_html("<title>ニュース</title>".encode("euc_jp"))
    assert not looks_japanese_html(b"<html lang='jv'><title>Warta</title>")
    assert not looks_japanese_html("<html><title>新闻</title>".encode("utf-8"))  # Chinese: kanji, no kana


def test_warc_import_stores_japanese_html_like_a_crawl(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    warc = write_warc(tmp_path / "CC-MAIN-test.warc.gz")
    stats = import_bulk(storage, "warc", [warc], "cc-test")
    assert stats["records"] == 6 and stats["stored"] == 2
    assert stats["skipped"] == {"http_301": 1, "not_html": 1, "not_japanese": 1}
    assert stats["failed"] == {"decode": 1}
    pages = {p["url"]: p for p in pages_of(storage, stats)}
    sjis = pages["http://sjis.example/midori"]
    assert sjis["body"] == SJIS_PAGE  # the bytes as received
    assert (sjis["encoding"], sjis["encoding_source"], sjis["charset_declared"]) == ("cp932", "detected", "")
    assert sjis["content_type"] == "text/html" and sjis["fetched_at"].isoformat() == "2024-03-04T05:06:07+00:00"
    utf8 = pages["http://utf8.example/"]
    assert utf8["encoding"] == "utf-8" and utf8["charset_declared"] == "header=UTF-8;meta=utf-8"

    result, kept = extract(storage, stats)
    assert result["extracted"] == 2
    assert "パン屋" in kept["http://sjis.example/midori"]["text"] and "トップ" not in kept["http://sjis.example/midori"]["text"]
    assert kept["http://utf8.example/"]["lang"] == "ja-jp"


def test_wet_import_and_truncated_warc(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    wet = write_wet(tmp_path / "CC-MAIN-test.warc.wet.gz")
    stats = import_bulk(storage, "warc", [wet], "cc-wet")
    assert stats["stored"] == 1 and stats["skipped"] == {"not_japanese": 2} and stats["failed"] == {}
    (page,) = pages_of(storage, stats)
    assert page["url"] == "http://wet.example/ja" and page["content_type"] == "text/plain; charset=utf-8"
    assert page["body"].decode("utf-8").startswith("みどり町だより\n")
    result, kept = extract(storage, stats)
    assert kept["http://wet.example/ja"]["title"] == "みどり町だより"

    # A WARC cut in the middle of a record: the records before the cut are kept.
    whole = open(write_warc(tmp_path / "full.warc.gz"), "rb").read()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(whole[: len(whole) * 3 // 4])
    stats = import_bulk(storage, "warc", [str(cut)], "cc-cut")
    assert stats["failed"] == {"truncated": 1} and stats["stored"] == 2
    assert stats["skipped"] == {"not_japanese": 1}


def test_warc_uncompressed_reads_the_same(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    plain = tmp_path / "plain.warc"
    plain.write_bytes(gzip.decompress(open(write_warc(tmp_path / "x.warc.gz"), "rb").read()))  # every member
    stats = import_bulk(storage, "warc", [str(plain)], "cc-plain")
    assert stats["stored"] == 2 and stats["records"] == 6


# -- the CLI verb ---------------------------------------------------------------------


def test_import_cli(tmp_path, capsys):
    from flows.cli import main

    root = tmp_path / "data"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage:\n  root: {root}\nsources:\n  - name: s\n    genre: blog\n    start_urls: ['http://a.example/']\n")
    zipped = write_aozora(tmp_path / "w.zip")
    assert main(["import", "aozora", zipped, "--source", "aozora-dump", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert '"stored": 1' in out and "published" in out
    assert main(["import", "aozora", zipped, "--source", "aozora-dump", "--config", str(cfg)]) == 0
    assert "already imported, nothing done" in capsys.readouterr().out
    # A crawl source's name, or a missing file, is refused.
    assert main(["import", "aozora", zipped, "--source", "s", "--config", str(cfg)]) == 2
    assert main(["import", "warc", str(tmp_path / "nope.warc.gz"), "--source", "x", "--config", str(cfg)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert len(raw_partitions(Storage(str(root)))) == 1
