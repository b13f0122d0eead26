"""What to crawl (sources) and how politely (crawl settings)."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from corpus.settings import Settings

Genre = Literal["blog", "qa", "dictionary", "news", "release", "novel", "encyclopedia", "other"]


class Source(Settings):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    genre: Genre = "other"
    enabled: bool = True
    # site: follow links from the start URLs (sitemaps are extra seeds);
    # sitemap: fetch exactly what the sitemaps list, following no links.
    spider: Literal["site", "sitemap"] = "site"
    start_urls: list[str] = []
    sitemaps: list[str] = []
    allowed_domains: list[str] = []
    allow: list[str] = []  # URL regexes a followed link must match (empty: all)
    deny: list[str] = []  # URL regexes never followed
    max_pages: int = Field(default=500, gt=0)  # new or changed pages stored per run
    max_depth: int = Field(default=5, ge=0)
    max_minutes: float = Field(default=30, gt=0)
    # Seconds between requests to this source's domains; unset: crawl.download_delay.
    download_delay: float | None = Field(default=None, ge=0)
    # Hosts (names, as written in URLs) that may resolve to private or loopback
    # addresses. Empty for every real site; the sample site needs 127.0.0.1.
    allow_private_hosts: list[str] = []
    # Serve the bundled sample site on the host and port of the first start URL
    # while this source is crawled (the embedded demo).
    serve_sample_site: bool = False
    license: str = ""

    @field_validator("start_urls", "sitemaps")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for u in urls:
            if urlsplit(u).scheme not in ("http", "https"):
                raise ValueError(f"not an http(s) URL: {u!r}")
        return urls

    @field_validator("allow", "deny")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"bad regex {p!r}: {e}") from None
        return patterns

    @model_validator(mode="after")
    def _has_seeds(self) -> Source:
        if not self.start_urls and not self.sitemaps:
            raise ValueError(f"source {self.name!r} has neither start_urls nor sitemaps")
        if self.spider == "sitemap" and not self.sitemaps:
            raise ValueError(f"source {self.name!r} uses the sitemap spider but lists no sitemaps")
        if self.serve_sample_site and not self.start_urls:
            raise ValueError("serve_sample_site needs a start URL giving host and port")
        return self

    def domains(self) -> list[str]:
        if self.allowed_domains:
            return self.allowed_domains
        return sorted({urlsplit(u).hostname or "" for u in self.start_urls + self.sitemaps})


class CrawlSettings(Settings):
    user_agent: str = "jagpt-crawler/0.1 (+{contact_url})"
    contact_url: str = "https://github.com/jagpt/jagpt"
    download_delay: float = Field(default=0.5, ge=0)
    # AutoThrottle adapts each domain's delay to its latency; turn it off only
    # for loopback benchmarks, never for real sites.
    autothrottle: bool = True
    concurrent_requests_per_domain: int = Field(default=4, gt=0)
    download_timeout: float = Field(default=30, gt=0)
    max_download_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    retries: int = Field(default=2, ge=0)  # for 429, 5xx and timeouts
    batch_rows: int = Field(default=200, gt=0)
    # Sources crawled at once. Sources that share a domain never run together,
    # so concurrent_requests_per_domain and the delay hold per domain.
    parallel_sources: int = Field(default=2, gt=0)

    def agent(self) -> str:
        return self.user_agent.format(contact_url=self.contact_url)
