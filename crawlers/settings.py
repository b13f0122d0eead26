"""Scrapy settings shared by every jagpt crawl (the Scrapy project template's
settings module). Per-source and per-run values are layered on top in
:func:`crawlers.worker.scrapy_settings`."""

BOT_NAME = "jagpt"
SPIDER_MODULES = ["crawlers.spiders"]

ROBOTSTXT_OBEY = True
AUTOTHROTTLE_ENABLED = True
AUTOTHROTTLE_TARGET_CONCURRENCY = 2.0
RETRY_ENABLED = True
RETRY_TIMES = 2
RETRY_HTTP_CODES = [429, 500, 502, 503, 504, 522, 524, 408]
COOKIES_ENABLED = False
TELNETCONSOLE_ENABLED = False
LOG_LEVEL = "WARNING"

DOWNLOADER_MIDDLEWARES = {
    # Before robots.txt and everything else: a refused address is never contacted.
    "crawlers.middlewares.PrivateAddressGuard": 10,
}
ITEM_PIPELINES = {
    "crawlers.pipelines.ParquetPagePipeline": 300,
}
