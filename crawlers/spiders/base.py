"""What every jagpt spider does with a response: decide its charset, compare it
with the source's state, and yield the page and its fetch-log row.

A spider yields items ``{"fetch": row}`` for every URL it tried, and
``{"fetch": row, "page": page}`` for each new or changed page; the pipeline
writes them. Subclasses decide where URLs come from.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone

import scrapy
from scrapy.exceptions import (
    CannotResolveHostError,
    CloseSpider,
    DownloadCancelledError,
    DownloadConnectionRefusedError,
    DownloadTimeoutError,
    IgnoreRequest,
    ResponseDataLossError,
)
from scrapy.http import HtmlResponse
from scrapy.linkextractors import LinkExtractor
from scrapy.spidermiddlewares.httperror import HttpError
from twisted.internet.error import TimeoutError as TwistedTimeoutError

from corpus.storage import Storage
from crawlers import charset, state
from crawlers.config import Source
from crawlers.middlewares import RefusedAddress

HTML_TYPES = {"text/html", "application/xhtml+xml"}
GONE_STATUSES = {404, 410}


def failure_reason(failure) -> tuple[str, int]:
    """``(reason, http_status)`` for a failed request, in the words of the stats table."""
    exc = failure.value
    if isinstance(exc, HttpError):
        return f"http_{exc.response.status}", exc.response.status
    if isinstance(exc, RefusedAddress):
        return "refused_address", 0
    if isinstance(exc, IgnoreRequest):
        text = str(exc)
        if "robots.txt" in text:
            return "robots", 0
        if "DOWNLOAD_MAXSIZE" in text:
            return "size", 0  # decompressed body over the limit
        if "offsite" in text.lower():
            return "offsite", 0
        return "ignored", 0
    if isinstance(exc, DownloadCancelledError):
        return "size", 0
    if isinstance(exc, (DownloadTimeoutError, TwistedTimeoutError)):
        return "timeout", 0
    if isinstance(exc, CannotResolveHostError):
        return "dns", 0
    if isinstance(exc, DownloadConnectionRefusedError):
        return "connection", 0
    if isinstance(exc, ResponseDataLossError):
        return "data_loss", 0
    return type(exc).__name__, 0


class JagptSpider(scrapy.Spider):
    follow_links = False
    # 304 answers a conditional request; it is "unchanged", not an error.
    custom_settings = {"HTTPERROR_ALLOWED_CODES": [304]}

    def __init__(self, job: dict, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = Source(**job["source"])
        self.run_id = job["run_id"]
        self.allowed_domains = self.source.domains()
        self.storage = Storage(job["storage"]["root"], job["storage"]["options"])
        # Domains are enforced by Scrapy's offsite middleware (allowed_domains);
        # LinkExtractor's allow_domains compares host:port and so misses ported URLs.
        self.links = LinkExtractor(allow=self.source.allow, deny=self.source.deny)
        table, _ = state.load(self.storage, self.source.name)
        self.known: dict[str, dict] = {r["url"]: r for r in table.to_pylist()}
        self.done: set[str] = set()  # URLs this run already settled, before a crash included
        for f in state.run_files(self.storage, self.source.name, self.run_id, "fetch"):
            self.done.update(self.storage.read_parquet([f], columns=["url"])["url"].to_pylist())
        self.stored = 0
        for f in state.run_files(self.storage, self.source.name, self.run_id, "part"):
            urls = self.storage.read_parquet([f], columns=["url"])["url"].to_pylist()
            self.done.update(urls)
            self.stored += len(urls)
        self.resumed = bool(self.done)
        self.requested: set[str] = set()

    # -- where requests come from -------------------------------------------

    def page_request(self, url: str, depth: int | None = None, priority: int = 0) -> scrapy.Request | None:
        # Menus repeat the same links on every page: skipping URLs already
        # requested here saves building Requests the dupefilter would drop.
        if url in self.done or url in self.requested:
            return None
        self.requested.add(url)
        headers = {}
        prev = self.known.get(url)
        if prev and prev["outcome"] != "gone" and prev["content_sha1"]:
            if prev["etag"]:
                headers["If-None-Match"] = prev["etag"]
            if prev["last_modified"]:
                headers["If-Modified-Since"] = prev["last_modified"]
        meta = {} if depth is None else {"depth": depth}
        return scrapy.Request(
            url, callback=self.parse_page, errback=self.on_error, headers=headers, meta=meta, priority=priority
        )

    def rechecks(self):
        """Known pages not yet settled this run, so changed and gone pages are noticed."""
        for url, row in self.known.items():
            if row["outcome"] != "gone" and row["content_sha1"] and self.wanted(url):
                req = self.page_request(url, depth=row["depth"], priority=-1)
                if req is not None:
                    yield req

    def wanted(self, url: str) -> bool:
        """The source's allow and deny patterns (links are filtered by the link extractor already)."""
        if self.source.deny and any(re.search(p, url) for p in self.source.deny):
            return False
        return not self.source.allow or any(re.search(p, url) for p in self.source.allow)

    def resumed_links(self):
        """After a crash: the links of pages this run already stored, read from storage, not refetched."""
        if not (self.follow_links and self.resumed):
            return
        for f in state.run_files(self.storage, self.source.name, self.run_id, "part"):
            t = self.storage.read_parquet([f], columns=["final_url", "body", "encoding", "depth"])
            for row in t.to_pylist():
                page = HtmlResponse(url=row["final_url"], body=row["body"], encoding=row["encoding"])
                yield from self.follow(page, row["depth"] + 1)

    def follow(self, page: HtmlResponse, depth: int | None = None):
        """Requests for the page's links; ``page`` carries the encoding jagpt decided, not Scrapy's guess."""
        if depth is not None and self.source.max_depth and depth > self.source.max_depth:
            return
        for link in self.links.extract_links(page):
            req = self.page_request(link.url, depth)
            if req is not None:
                yield req

    # -- what a response becomes ------------------------------------------------

    def fetch_row(self, url: str, final_url: str, depth: int, status: int, outcome: str, reason: str = "", **kw) -> dict:
        now = datetime.now(timezone.utc)
        prev = self.known.get(url) or {}
        row = {
            "url": url,
            "final_url": final_url,
            "depth": depth,
            "first_seen": prev.get("first_seen") or now,
            "fetched_at": now,
            "status": status,
            "outcome": outcome,
            "reason": reason,
            "etag": prev.get("etag"),
            "last_modified": prev.get("last_modified"),
            "content_sha1": prev.get("content_sha1"),
            "last_changed": now if outcome in ("new", "changed") else prev.get("last_changed"),
            "bytes": 0,
        }
        row.update(kw)
        self.done.add(url)
        self.crawler.stats.inc_value(f"jagpt/pages/{outcome}" if outcome != "failed" else f"jagpt/failed/{reason}")
        return row

    def parse_page(self, response):
        url = response.request.meta.get("redirect_urls", [response.url])[0]
        depth = response.meta.get("depth", 0)
        validators = {
            "etag": _header(response, b"ETag"),
            "last_modified": _header(response, b"Last-Modified"),
        }
        validators = {k: v for k, v in validators.items() if v}
        if response.status == 304:
            yield {"fetch": self.fetch_row(url, response.url, depth, 304, "unchanged", "not_modified", **validators)}
            return
        content_type = _header(response, b"Content-Type") or ""
        mime = content_type.split(";")[0].strip().lower()
        size = {"bytes": len(response.body)}
        if mime not in HTML_TYPES:
            yield {"fetch": self.fetch_row(url, response.url, depth, response.status, "failed", "type", **size)}
            return
        if charset.looks_binary(response.body):
            yield {"fetch": self.fetch_row(url, response.url, depth, response.status, "failed", "decode", **size)}
            return
        encoding, where = charset.decide(response.body, content_type)
        if where == "fallback":
            yield {"fetch": self.fetch_row(url, response.url, depth, response.status, "failed", "decode", **size)}
            return
        sha1 = hashlib.sha1(response.body).hexdigest()
        prev = self.known.get(url)
        if prev and prev["content_sha1"] == sha1 and prev["outcome"] != "gone":
            yield {"fetch": self.fetch_row(url, response.url, depth, response.status, "unchanged", "same_bytes", **validators, **size)}
        else:
            if self.stored >= self.source.max_pages:
                self.crawler.stats.inc_value("jagpt/skipped/page_limit")
                raise CloseSpider("page_limit")
            outcome = "new" if prev is None else "changed"
            self.crawler.stats.inc_value(f"jagpt/encoding/{encoding}/{where}")
            fetch = self.fetch_row(
                url, response.url, depth, response.status, outcome, "",
                content_sha1=sha1, etag=validators.get("etag"), last_modified=validators.get("last_modified"), **size,
            )
            self.stored += 1
            yield {
                "fetch": fetch,
                "page": {
                    "url": url,
                    "final_url": response.url,
                    "source": self.source.name,
                    "genre": self.source.genre,
                    "run_id": self.run_id,
                    "fetched_at": fetch["fetched_at"],
                    "http_status": response.status,
                    "content_type": content_type,
                    "encoding": encoding,
                    "encoding_source": where,
                    "charset_declared": charset.declared(response.body, content_type),
                    "depth": depth,
                    "content_sha1": sha1,
                    "body": response.body,
                },
            }
        if self.follow_links:
            yield from self.follow(HtmlResponse(url=response.url, body=response.body, encoding=encoding))

    def on_error(self, failure):
        request = failure.request
        url = request.meta.get("redirect_urls", [request.url])[0]
        depth = request.meta.get("depth", 0)
        reason, status = failure_reason(failure)
        if reason == "offsite":
            return  # an offsite redirect; not this source's page
        prev = self.known.get(url)
        if status in GONE_STATUSES and prev and prev["content_sha1"]:
            yield {"fetch": self.fetch_row(url, request.url, depth, status, "gone", f"http_{status}")}
        else:
            yield {"fetch": self.fetch_row(url, request.url, depth, status, "failed", reason)}


def _header(response, name: bytes) -> str | None:
    value = response.headers.get(name)
    return value.decode("latin-1") if value else None
