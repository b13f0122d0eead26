"""One crawl of one source, run as its own process: ``python -m crawlers.worker JOB.json``.

Scrapy's Twisted reactor cannot be restarted inside a process, so every crawl
gets a fresh interpreter. The worker writes pages and fetch logs straight
under the storage root; the parent (:mod:`crawlers.crawl`) publishes the run
once the worker has exited cleanly.
"""

from __future__ import annotations

import gc
import json
import sys

from scrapy.crawler import CrawlerProcess
from scrapy.settings import Settings as ScrapySettings

from crawlers.config import CrawlSettings, Source
from crawlers.spiders.site import SiteSpider
from crawlers.spiders.sitemap import SitemapSpider

SPIDERS = {"site": SiteSpider, "sitemap": SitemapSpider}


def scrapy_settings(job: dict) -> ScrapySettings:
    source = Source(**job["source"])
    crawl = CrawlSettings(**job["crawl"])
    delay = crawl.download_delay if source.download_delay is None else source.download_delay
    settings = ScrapySettings()
    settings.setmodule("crawlers.settings", priority="project")
    settings.setdict(
        {
            "USER_AGENT": crawl.agent(),
            "DOWNLOAD_DELAY": delay,
            "AUTOTHROTTLE_ENABLED": crawl.autothrottle,
            "AUTOTHROTTLE_START_DELAY": max(delay, 0.1),
            "CONCURRENT_REQUESTS_PER_DOMAIN": crawl.concurrent_requests_per_domain,
            "DOWNLOAD_TIMEOUT": crawl.download_timeout,
            "DOWNLOAD_MAXSIZE": crawl.max_download_bytes,
            "DOWNLOAD_WARNSIZE": 0,
            "RETRY_TIMES": crawl.retries,
            "DEPTH_LIMIT": source.max_depth,
            "CLOSESPIDER_TIMEOUT": source.max_minutes * 60,
            "JAGPT_ALLOW_PRIVATE_HOSTS": source.allow_private_hosts,
            "JAGPT_BATCH_ROWS": crawl.batch_rows,
            "JAGPT_JOB": job,
        },
        priority="cmdline",
    )
    return settings


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)
    process = CrawlerProcess(scrapy_settings(job), install_root_handler=True)
    crawler = process.create_crawler(SPIDERS[job["source"]["spider"]])
    process.crawl(crawler, job=job)
    process.start()
    with open(job["stats_file"], "w", encoding="utf-8") as f:
        json.dump(crawler.stats.get_stats(), f, default=str)
    gc.collect()  # Arrow objects must not reach the final teardown (apache/arrow#34314)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
