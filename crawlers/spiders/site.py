"""The link-following site spider (it also reads the source's sitemaps)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import scrapy
from scrapy.http import HtmlResponse
from scrapy.linkextractors import LinkExtractor
from scrapy.utils.sitemap import Sitemap

from crawlers import charset
from crawlers.config import Source

HTML_TYPES = {"text/html", "application/xhtml+xml"}


class SiteSpider(scrapy.Spider):
    name = "site"

    def __init__(self, job: dict, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = Source(**job["source"])
        self.run_id = job["run_id"]
        self.allowed_domains = self.source.domains()
        self.pages = 0
        # Domains are enforced by Scrapy's offsite middleware (allowed_domains);
        # LinkExtractor's allow_domains compares host:port and so misses ported URLs.
        self.links = LinkExtractor(allow=self.source.allow, deny=self.source.deny)

    async def start(self):
        for url in self.source.start_urls:
            yield scrapy.Request(url, callback=self.parse)
        for url in self.source.sitemaps:
            yield scrapy.Request(url, callback=self.parse_sitemap)

    def parse_sitemap(self, response):
        sitemap = Sitemap(response.body)
        for entry in sitemap:
            loc = entry.get("loc")
            if not loc:
                continue
            if sitemap.type == "sitemapindex":
                yield scrapy.Request(loc, callback=self.parse_sitemap)
            else:
                yield scrapy.Request(loc, callback=self.parse)

    def parse(self, response):
        stats = self.crawler.stats
        content_type = response.headers.get(b"Content-Type", b"").decode("latin-1")
        mime = content_type.split(";")[0].strip().lower()
        if mime not in HTML_TYPES:
            stats.inc_value("jagpt/failed/content_type")
            return
        # CLOSESPIDER_PAGECOUNT stops the engine, but responses already in flight
        # still arrive; the page limit is a promise, so they are not stored.
        self.pages += 1
        if self.pages > self.source.max_pages:
            stats.inc_value("jagpt/skipped/page_limit")
            return
        encoding, where = charset.decide(response.body, content_type)
        if where == "fallback":
            stats.inc_value("jagpt/failed/decode")
            return
        stats.inc_value(f"jagpt/encoding/{encoding}")
        yield {
            "url": response.request.meta.get("redirect_urls", [response.url])[0],
            "final_url": response.url,
            "source": self.source.name,
            "genre": self.source.genre,
            "run_id": self.run_id,
            "fetched_at": datetime.now(timezone.utc),
            "http_status": response.status,
            "content_type": content_type,
            "encoding": encoding,
            "encoding_source": where,
            "depth": response.meta.get("depth", 0),
            "content_sha1": hashlib.sha1(response.body).hexdigest(),
            "body": response.body,
        }
        text = response.body.decode(encoding)
        decoded = HtmlResponse(url=response.url, body=text.encode("utf-8"), encoding="utf-8")
        for link in self.links.extract_links(decoded):
            yield scrapy.Request(link.url, callback=self.parse)
