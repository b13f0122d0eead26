"""The sitemap spider: fetches exactly the pages a site's sitemaps list and
follows no links. A known page whose ``<lastmod>`` is older than its last fetch
is not requested at all, which keeps weekly recrawls of big sites cheap."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import scrapy
from scrapy.utils.gz import gunzip
from scrapy.utils.sitemap import Sitemap

from crawlers.spiders.base import JagptSpider


def sitemap_entries(response, max_size: int):
    """``(loc, lastmod, is_index)`` for each entry of a (possibly gzipped) sitemap."""
    body = response.body
    if body[:2] == b"\x1f\x8b":
        body = gunzip(body, max_size=max_size)  # limited by its decompressed size
    sitemap = Sitemap(body)
    for entry in sitemap:
        loc = (entry.get("loc") or "").strip()
        if loc:
            yield loc, entry.get("lastmod"), sitemap.type == "sitemapindex"


def parse_lastmod(value: str | None) -> datetime | None:
    if not value:
        return None
    value = value.strip().replace("Z", "+00:00")
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        value += "T00:00:00+00:00"
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


class SitemapSpider(JagptSpider):
    name = "sitemap"
    follow_links = False

    async def start(self):
        for url in self.source.sitemaps:
            yield scrapy.Request(url, callback=self.parse_sitemap, errback=self.on_error, meta={"depth": 0})

    def parse_sitemap(self, response):
        for loc, lastmod, is_index in sitemap_entries(response, self.settings.getint("DOWNLOAD_MAXSIZE")):
            if is_index:
                yield scrapy.Request(loc, callback=self.parse_sitemap, errback=self.on_error, meta={"depth": 0})
                continue
            if not self.wanted(loc):
                continue
            prev = self.known.get(loc)
            stamp = parse_lastmod(lastmod)
            if prev and prev["outcome"] not in ("gone", "failed") and stamp and prev["fetched_at"] and stamp <= prev["fetched_at"]:
                self.crawler.stats.inc_value("jagpt/skipped/sitemap_lastmod")
                continue
            req = self.page_request(loc, depth=1)
            if req is not None:
                yield req
