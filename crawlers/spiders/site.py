"""The link-following site spider: from the start URLs (and sitemaps, as extra
seeds) it follows every allowed link, within the source's depth and page limits."""

from __future__ import annotations

import scrapy

from crawlers.spiders.base import JagptSpider
from crawlers.spiders.sitemap import sitemap_entries


class SiteSpider(JagptSpider):
    name = "site"
    follow_links = True

    async def start(self):
        for req in self.resumed_links():
            yield req
        for url in self.source.start_urls:
            req = self.page_request(url, depth=0)
            if req is not None:
                yield req
        for url in self.source.sitemaps:
            yield scrapy.Request(url, callback=self.parse_sitemap, errback=self.on_error, meta={"depth": 0})
        for req in self.rechecks():
            yield req

    def parse_sitemap(self, response):
        for loc, _lastmod, is_index in sitemap_entries(response, self.settings.getint("DOWNLOAD_MAXSIZE")):
            if is_index:
                yield scrapy.Request(loc, callback=self.parse_sitemap, errback=self.on_error, meta={"depth": 0})
            else:
                req = self.page_request(loc, depth=1)
                if req is not None:
                    yield req
