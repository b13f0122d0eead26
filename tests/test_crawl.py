"""The crawler against real local HTTP servers: charsets, politeness, safety, recrawls."""

import gzip
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from corpus.schema import RAW_PAGE
from corpus.storage import Storage
from crawlers import state
from crawlers.config import CrawlSettings, Source
from crawlers.crawl import crawl_source, crawl_sources, domain_groups, partition_files, raw_partitions
from crawlers.middlewares import blocked_address
from tests.conftest import free_port
from tests.sites import Page, Site, japanese_page

FAST = CrawlSettings(download_delay=0, concurrent_requests_per_domain=8)

PROSE = "今日は朝から雨が降っていたので、図書館で本を読みました。静かな部屋で過ごす時間はとても贅沢です。"
CP932_ONLY = "㈱髙橋文具店は①番地にあります。"  # Python's shift_jis codec fails on each of these

# -- the bundled sample site ----------------------------------------------------


def sample_source(port: int, **kw) -> Source:
    base = f"http://127.0.0.1:{port}/"
    return Source(
        name="sample", start_urls=[base], sitemaps=[base + "sitemap.xml"], allow_private_hosts=["127.0.0.1"],
        serve_sample_site=True, **kw,
    )


@pytest.fixture(scope="module")
def crawled(tmp_path_factory):
    storage = Storage(str(tmp_path_factory.mktemp("crawl") / "data"))
    source = sample_source(free_port())
    first = crawl_source(storage, source, FAST)
    second = crawl_source(storage, source, FAST)
    return storage, first, second


def test_crawl_stores_every_page_once_with_the_raw_schema(crawled):
    storage, first, _ = crawled
    files = partition_files(storage, first.partition)
    table = storage.read_parquet(files)
    assert table.schema.equals(RAW_PAGE)
    with storage.fs.open(storage.path(files[0]), "rb") as f:
        assert pq.ParquetFile(f).metadata.row_group(0).column(0).compression == "ZSTD"
    urls = table["url"].to_pylist()
    assert len(urls) == len(set(urls)) == first.stats["new"] == 36
    assert storage.marker(first.partition)["stats"]["new"] == 36


def test_sample_site_comes_back_without_mojibake(crawled):
    storage, first, _ = crawled
    rows = storage.read_parquet(partition_files(storage, first.partition)).to_pylist()
    (sjis,) = [r for r in rows if r["url"].endswith("/column/shiftjis.html")]
    assert (sjis["encoding"], sjis["encoding_source"]) == ("cp932", "meta")
    assert "㈱髙橋文具店" in sjis["body"].decode(sjis["encoding"])
    for r in rows:
        text = r["body"].decode(r["encoding"])
        assert "\ufffd" not in text and "縺" not in text, r["url"]


def test_second_crawl_of_an_unchanged_site_stores_nothing(crawled):
    storage, first, second = crawled
    assert second.partition is None
    assert second.stats["new"] == 0 and second.stats["unchanged"] == 36
    assert raw_partitions(storage, "sample") == [first.partition]
    snapshot, runs = state.load(storage, "sample")
    assert runs == sorted([first.run_id, second.run_id])
    assert snapshot.num_rows == len(set(snapshot["url"].to_pylist()))


def test_page_limit_stops_the_crawl(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    result = crawl_source(storage, sample_source(free_port(), max_pages=5), FAST)
    assert result.stats["new"] == 5
    assert result.stats["finish_reason"] == "page_limit"


# -- a zoo of hostile and legacy pages, crawled once ------------------------------

ZOO_LINKS = [
    "/sjis-undeclared.html", "/cp932-header.html", "/euc-jp.html", "/iso-2022-jp.html", "/meta-only.html",
    "/wrong-header.html", "/gzip.html", "/hop1", "/to-loopback", "/private/secret.html", "/missing.html",
    "/error.html", "/busy.html", "/slow.html", "/huge.html", "/bomb.html", "/binary.html", "/photo",
    "/cal/2026/1",
]


def build_zoo(site: Site) -> None:
    site.html("/", japanese_page("目次", PROSE, ZOO_LINKS))
    site.html("/robots.txt", "User-agent: *\nDisallow: /private/\n", content_type="text/plain")
    site.html("/private/secret.html", japanese_page("秘密", PROSE))
    site.html("/sjis-undeclared.html", japanese_page("シフトJIS", PROSE + CP932_ONLY), "cp932")
    site.html("/cp932-header.html", japanese_page("機種依存文字", PROSE + CP932_ONLY), "cp932",
              "text/html; charset=Shift_JIS")
    site.html("/euc-jp.html", japanese_page("EUC-JP", PROSE), "euc_jp")
    site.html("/iso-2022-jp.html", japanese_page("JIS", PROSE), "iso2022_jp")
    site.html("/meta-only.html", japanese_page("メタ", PROSE, meta='<meta http-equiv="Content-Type" content="text/html; charset=EUC-JP">'), "euc_jp")
    site.html("/wrong-header.html", japanese_page("嘘の宣言", PROSE + CP932_ONLY), "cp932", "text/html; charset=UTF-8")
    site.html("/gzip.html", japanese_page("圧縮", PROSE), content_type="text/html; charset=utf-8", gzip=True)
    site.pages["/hop1"] = Page(status=301, location="/hop2")
    site.pages["/hop2"] = Page(status=302, location="/landed.html")
    site.html("/landed.html", japanese_page("到着", PROSE))
    # Reached from "localhost", which the source allows, but lands on 127.0.0.1, which it does not.
    site.pages["/to-loopback"] = Page(status=302, location="{origin}/inside.html")
    site.html("/inside.html", japanese_page("内部", PROSE))
    site.pages["/error.html"] = Page(b"oops", "text/plain", status=500)
    site.html("/busy.html", japanese_page("混雑", PROSE), fail_first=1)
    site.html("/slow.html", japanese_page("遅い", PROSE), delay=4)
    site.html("/huge.html", japanese_page("巨大", PROSE * 3000))
    site.pages["/bomb.html"] = Page(b"<html>" + b" " * 5_000_000 + b"</html>", "text/html", gzip=True)
    site.pages["/binary.html"] = Page(bytes(range(256)) * 64, "text/html")
    site.pages["/photo"] = Page(b"\x89PNG\r\n\x1a\n" + bytes(500), "image/png")
    for year in (2026, 2027, 2028):
        for month in range(1, 13):
            nxt = f"/cal/{year + (month == 12)}/{month % 12 + 1}"
            site.html(f"/cal/{year}/{month}", japanese_page(f"{year}年{month}月", "予定はありません。", [nxt]))


def zoo_source(site: Site, **kw) -> Source:
    base = f"http://localhost:{site.port}/"
    return Source(
        name="zoo", start_urls=[base], allowed_domains=["localhost", "127.0.0.1"], allow_private_hosts=["localhost"],
        max_depth=4, **kw,
    )


ZOO_CRAWL = CrawlSettings(download_delay=0, concurrent_requests_per_domain=8, download_timeout=2, retries=1,
                          max_download_bytes=200_000, batch_rows=4)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    storage = Storage(str(tmp_path_factory.mktemp("zoo") / "data"))
    with Site() as site:
        build_zoo(site)
        first = crawl_source(storage, zoo_source(site), ZOO_CRAWL)
        log_first = list(site.log)
        # A week later: one page changed, one removed, one added (linked from a changed index).
        site.html("/euc-jp.html", japanese_page("EUC-JP", PROSE + "追記しました。"), "euc_jp")
        del site.pages["/meta-only.html"]
        site.html("/new.html", japanese_page("新着", PROSE))
        site.html("/", japanese_page("目次", PROSE, ZOO_LINKS + ["/new.html"]))
        site.log.clear()
        second = crawl_source(storage, zoo_source(site), ZOO_CRAWL)
        log_second = list(site.log)
    return storage, first, second, log_first, log_second


def pages_by_path(storage, result) -> dict[str, dict]:
    rows = storage.read_parquet(partition_files(storage, result.partition)).to_pylist()
    return {r["url"].split(":", 2)[2].split("/", 1)[1]: r for r in rows}


def fetches_by_path(storage, result) -> dict[str, dict]:
    rows = storage.read_parquet(state.run_files(storage, "zoo", result.run_id, "fetch")).to_pylist()
    return {"/" + r["url"].split(":", 2)[2].split("/", 1)[1]: r for r in rows}


def text_of(row) -> str:
    return row["body"].decode(row["encoding"])


@pytest.mark.parametrize(
    "path,encoding,where,expected",
    [
        ("sjis-undeclared.html", "cp932", "detected", CP932_ONLY),
        ("cp932-header.html", "cp932", "header", CP932_ONLY),
        ("euc-jp.html", "euc_jis_2004", "detected", PROSE),
        ("iso-2022-jp.html", "iso2022_jp_ext", "detected", PROSE),
        ("meta-only.html", "euc_jis_2004", "meta", PROSE),
        ("wrong-header.html", "cp932", "detected", CP932_ONLY),
        ("gzip.html", "utf-8", "header", PROSE),
    ],
)
def test_every_japanese_charset_decodes_right(zoo, path, encoding, where, expected):
    storage, first, *_ = zoo
    row = pages_by_path(storage, first)[path]
    assert (row["encoding"], row["encoding_source"]) == (encoding, where)
    assert expected in text_of(row)


def test_declared_charset_is_recorded(zoo):
    storage, first, *_ = zoo
    row = pages_by_path(storage, first)["wrong-header.html"]
    assert row["charset_declared"] == "header=UTF-8"


def test_redirect_chain_is_followed_and_recorded(zoo):
    storage, first, *_ = zoo
    row = pages_by_path(storage, first)["hop1"]
    assert row["final_url"].endswith("/landed.html") and "到着" in text_of(row)


def test_redirect_into_a_disallowed_private_address_is_refused(zoo):
    storage, first, _, log_first, _ = zoo
    fetch = fetches_by_path(storage, first)["/to-loopback"]
    assert (fetch["outcome"], fetch["reason"]) == ("failed", "refused_address")
    assert "/inside.html" not in [p for p, _ in log_first]


def test_robots_disallow_is_obeyed(zoo):
    storage, first, _, log_first, _ = zoo
    assert fetches_by_path(storage, first)["/private/secret.html"]["reason"] == "robots"
    assert "/private/secret.html" not in [p for p, _ in log_first]


@pytest.mark.parametrize(
    "path,reason",
    [
        ("/missing.html", "http_404"),
        ("/error.html", "http_500"),
        ("/slow.html", "timeout"),
        ("/huge.html", "size"),
        ("/bomb.html", "size"),
        ("/binary.html", "decode"),
        ("/photo", "type"),
    ],
)
def test_failures_are_recorded_with_their_reason(zoo, path, reason):
    storage, first, *_ = zoo
    assert (fetches_by_path(storage, first)[path]["outcome"], fetches_by_path(storage, first)[path]["reason"]) == ("failed", reason)
    assert first.stats["failed"][reason] >= 1


def test_errors_are_retried(zoo):
    storage, first, _, log_first, _ = zoo
    paths = [p for p, _ in log_first]
    assert paths.count("/busy.html") == 2  # a 429, then the page
    assert "busy.html" in pages_by_path(storage, first)
    assert paths.count("/error.html") == 1 + ZOO_CRAWL.retries


def test_user_agent_carries_the_contact_url(zoo):
    *_, log_first, _ = zoo
    agent = log_first[0][1]["User-Agent"]
    assert agent.startswith("jagpt-crawler/") and ZOO_CRAWL.contact_url in agent


def test_calendar_trap_is_stopped_by_the_depth_limit(zoo):
    storage, first, *_ = zoo
    calendar = [p for p in pages_by_path(storage, first) if p.startswith("cal/")]
    assert 0 < len(calendar) <= 4


def test_second_crawl_sends_conditional_requests_and_stores_only_changes(zoo):
    storage, first, second, _, log_second = zoo
    assert second.stats["new"] == 1 and second.stats["changed"] == 2  # new.html; euc-jp.html and the index
    assert second.stats["gone"] == 1
    assert second.stats["unchanged"] >= 8
    assert sorted(pages_by_path(storage, second)) == ["", "euc-jp.html", "new.html"]
    conditional = [p for p, h in log_second if "If-None-Match" in h]
    assert "/sjis-undeclared.html" in conditional
    snapshot, _ = state.load(storage, "zoo")
    rows = {r["url"].rsplit("/", 1)[1]: r for r in snapshot.to_pylist()}
    assert rows["meta-only.html"]["outcome"] == "gone"
    assert rows["sjis-undeclared.html"]["outcome"] == "unchanged"
    assert rows["euc-jp.html"]["last_changed"] > rows["sjis-undeclared.html"]["last_changed"]


def test_loopback_is_refused_unless_the_source_allows_it(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    with Site() as site:
        site.html("/", japanese_page("目次", PROSE))
        source = Source(name="sneaky", start_urls=[f"http://localhost:{site.port}/"], allow_private_hosts=["127.0.0.1"])
        result = crawl_source(storage, source, FAST)
        assert site.log == []
    assert result.partition is None and result.stats["fetched"] == 0
    assert result.stats["failed"]["refused_address"] >= 1


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "metadata.google.internal"])
def test_blocked_addresses(host):
    assert blocked_address(host) is not None


# -- sitemaps, several sources at once -------------------------------------------


def test_sitemap_spider_reads_gzipped_sitemap_indexes_and_skips_by_lastmod(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    with Site() as site:
        for i in range(5):
            site.html(f"/a/{i}.html", japanese_page(f"記事{i}", PROSE, ["/not-in-sitemap.html"]))
        site.html("/not-in-sitemap.html", japanese_page("外", PROSE))
        urls = "".join(f"<url><loc>{site.origin}/a/{i}.html</loc><lastmod>2020-01-01</lastmod></url>" for i in range(5))
        sitemap = f'<?xml version="1.0"?><urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{urls}</urlset>'
        site.pages["/sitemap-1.xml.gz"] = Page(gzip.compress(sitemap.encode()), "application/octet-stream", etag=False)
        index = (f'<?xml version="1.0"?><sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">'
                 f"<sitemap><loc>{site.origin}/sitemap-1.xml.gz</loc></sitemap></sitemapindex>")
        site.html("/sitemap.xml", index, content_type="application/xml")
        source = Source(name="maps", spider="sitemap", sitemaps=[f"{site.origin}/sitemap.xml"], allow_private_hosts=["127.0.0.1"])
        first = crawl_source(storage, source, FAST)
        site.log.clear()
        second = crawl_source(storage, source, FAST)
        assert not [p for p, _ in site.log if p.startswith("/a/")]
    assert first.stats["new"] == 5
    assert "/not-in-sitemap.html" not in [r.rsplit(":", 1)[1] for r in storage.read_parquet(partition_files(storage, first.partition))["url"].to_pylist()]
    assert second.stats["skipped"]["sitemap_lastmod"] == 5 and second.partition is None


def test_state_folds_from_many_threads_at_once():
    from concurrent.futures import ThreadPoolExecutor
    from datetime import datetime, timezone

    import pyarrow as pa

    when = [datetime(2026, 11, d, tzinfo=timezone.utc) for d in (1, 8)]
    rows = [
        {"url": f"http://x.example/{i % 500}", "fetched_at": when[i // 500], "first_seen": when[i // 500], "status": 200}
        for i in range(1000)
    ]
    events = pa.Table.from_pylist(rows, schema=state.FETCH)
    with ThreadPoolExecutor(4) as pool:
        folded = list(pool.map(lambda _: state.fold([events]), range(16)))
    assert all(t.num_rows == 500 for t in folded)
    assert folded[0].column("first_seen").to_pylist()[0] == when[0]
    assert folded[0].column("fetched_at").to_pylist()[0] == when[1]


def test_sources_crawl_at_once_and_sources_sharing_a_domain_take_turns(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    with Site() as one, Site() as two:
        for site in (one, two):
            site.html("/", japanese_page("目次", PROSE, ["/x.html"]))
            site.html("/x.html", japanese_page("記事", PROSE), delay=1.0)
        a = Source(name="one", start_urls=[f"{one.origin}/"], allowed_domains=["one.test"], allow_private_hosts=["127.0.0.1"])
        b = Source(name="two", start_urls=[f"{two.origin}/"], allowed_domains=["two.test"], allow_private_hosts=["127.0.0.1"])
        c = Source(name="three", start_urls=[f"{two.origin}/x.html"], allowed_domains=["two.test"], allow_private_hosts=["127.0.0.1"])
        assert [[s.name for s in g] for g in domain_groups([a, b, c])] == [["one"], ["two", "three"]]
        # Different host names, so different domains, although both serve from 127.0.0.1.
        a = a.model_copy(update={"allowed_domains": [], "start_urls": [f"http://localhost:{one.port}/"],
                                 "allow_private_hosts": ["localhost"]})
        b = b.model_copy(update={"allowed_domains": []})
        results = crawl_sources(storage, [a, b], FAST.model_copy(update={"parallel_sources": 2}))
    assert [(r.source, r.stats["new"]) for r in results] == [("one", 2), ("two", 2)]
    spans = []
    for r in results:
        times = storage.read_parquet(state.run_files(storage, r.source, r.run_id, "fetch"))["fetched_at"].to_pylist()
        spans.append((min(times), max(times)))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], "the two crawls did not overlap"


# -- killed mid-crawl ---------------------------------------------------------------

KILL_PAGES = 60

CRAWL_SCRIPT = """
import sys
from corpus.storage import Storage
from crawlers.config import CrawlSettings, Source
from crawlers.crawl import crawl_source
port, root = int(sys.argv[1]), sys.argv[2]
source = Source(name="slow", start_urls=[f"http://127.0.0.1:{port}/"], allow_private_hosts=["127.0.0.1"], max_pages=500)
crawl_source(Storage(root), source, CrawlSettings(download_delay=0, concurrent_requests_per_domain=2, batch_rows=5))
"""


def test_a_crawl_killed_with_sigkill_resumes_without_refetching_or_duplicates(tmp_path):
    root = str(tmp_path / "data")
    storage = Storage(root)
    with Site() as site:
        links = [f"/p/{i}.html" for i in range(KILL_PAGES)]
        site.html("/", japanese_page("目次", PROSE, links))
        for i, link in enumerate(links):
            site.html(link, japanese_page(f"記事{i}", PROSE * 2 + str(i)), delay=0.1)
        proc = subprocess.Popen([sys.executable, "-c", CRAWL_SCRIPT, str(site.port), root], start_new_session=True,
                                cwd=os.path.dirname(os.path.dirname(__file__)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(storage.glob("raw/source=slow/run=*/part-*.parquet")) >= 3:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        stored_before = storage.read_parquet(storage.glob("raw/source=slow/run=*/part-*.parquet"))["url"].to_pylist()
        assert 0 < len(stored_before) < KILL_PAGES + 1
        assert not storage.glob("raw/source=slow/run=*/_SUCCESS.json")

        result = crawl_source(storage, Source(name="slow", start_urls=[f"{site.origin}/"], allow_private_hosts=["127.0.0.1"],
                                              max_pages=500), CrawlSettings(download_delay=0, concurrent_requests_per_domain=8))
        for url in stored_before:
            path = "/" + url.split("/", 3)[3]
            assert site.requests_for(path) == 1, path
    assert result.resumed
    urls = storage.read_parquet(partition_files(storage, result.partition))["url"].to_pylist()
    assert len(urls) == len(set(urls)) == KILL_PAGES + 1
    assert result.stats["new"] == KILL_PAGES + 1
    assert len(storage.glob("raw/source=slow/run=*/_SUCCESS.json")) == 1


def test_a_kill_between_the_page_file_and_its_log_loses_nothing(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    with Site() as site:
        site.html("/", japanese_page("目次", PROSE, [f"/p/{i}.html" for i in range(6)]))
        for i in range(6):
            site.html(f"/p/{i}.html", japanese_page(f"記事{i}", PROSE + str(i)))
        source = Source(name="cut", start_urls=[f"{site.origin}/"], allow_private_hosts=["127.0.0.1"])
        settings = CrawlSettings(download_delay=0, batch_rows=2)
        first = crawl_source(storage, source, settings)
        # As if killed after part-00001 was written, before fetch-00001, the marker and the state.
        storage.remove(f"{first.partition}/_SUCCESS.json")
        storage.remove(state.state_path("cut"))
        storage.remove(f"{first.partition}/fetch-00001.parquet")
        site.log.clear()
        again = crawl_source(storage, source, settings)
        assert [p for p, _ in site.log if p.startswith("/p/")] == []
    assert again.resumed and again.run_id == first.run_id
    assert again.stats["new"] == first.stats["new"] == 7
