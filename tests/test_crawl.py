import pyarrow.parquet as pq
import pytest

from corpus.schema import RAW_PAGE
from corpus.storage import Storage
from crawlers.config import CrawlSettings, Source
from crawlers.crawl import crawl_source, partition_files
from crawlers.middlewares import blocked_address
from tests.conftest import free_port

FAST = CrawlSettings(download_delay=0, concurrent_requests_per_domain=8)


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


def test_robots_txt_is_obeyed(crawled):
    storage, first, _ = crawled
    urls = storage.read_parquet(partition_files(storage, first.partition))["url"].to_pylist()
    assert not [u for u in urls if "/private/" in u]
    assert first.stats["failed"]["robots"] == 1


def test_shift_jis_page_is_decoded_as_cp932(crawled):
    storage, first, _ = crawled
    rows = storage.read_parquet(partition_files(storage, first.partition)).to_pylist()
    (sjis,) = [r for r in rows if r["url"].endswith("/column/shiftjis.html")]
    assert (sjis["encoding"], sjis["encoding_source"]) == ("cp932", "meta")
    html = sjis["body"].decode(sjis["encoding"])
    assert "㈱髙橋文具店" in html and "①" in html


def test_second_crawl_of_an_unchanged_site_stores_nothing(crawled):
    storage, _, second = crawled
    assert second.partition is None
    assert second.stats["new"] == 0 and second.stats["unchanged"] == 36
    assert len(storage.glob("raw/source=sample/run=*/_SUCCESS.json")) == 1


def test_page_limit_stops_the_crawl(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    result = crawl_source(storage, sample_source(free_port(), max_pages=5), FAST)
    assert result.stats["new"] == 5
    assert result.stats["finish_reason"] == "closespider_pagecount"


def test_loopback_is_refused_unless_the_source_allows_it(tmp_path):
    storage = Storage(str(tmp_path / "data"))
    port = free_port()
    source = Source(name="sneaky", start_urls=[f"http://localhost:{port}/"], allow_private_hosts=["127.0.0.1"],
                    serve_sample_site=False)
    from crawlers.sample import serve_sample_site

    with serve_sample_site("127.0.0.1", port):
        result = crawl_source(storage, source, FAST)
    assert result.partition is None and result.stats["fetched"] == 0
    assert result.stats["failed"]["refused_address"] >= 1


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "metadata.google.internal"])
def test_blocked_addresses(host):
    assert blocked_address(host) is not None
