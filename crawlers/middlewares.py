"""Downloader middleware that keeps the crawler out of private networks."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from scrapy.exceptions import IgnoreRequest

class RefusedAddress(IgnoreRequest):
    """A request to a private, loopback, link-local or metadata address."""


_METADATA_HOSTS = {"metadata.google.internal", "metadata"}


def blocked_address(host: str) -> str | None:
    """The first private/loopback/link-local/reserved address ``host`` resolves to, if any."""
    if host.lower() in _METADATA_HOSTS:
        return host
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return None  # the download itself will fail and be counted as a DNS error
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
            return str(ip)
    return None


class PrivateAddressGuard:
    """Refuses every request, redirects included, whose host resolves to a
    non-public address, unless the source lists that host in allow_private_hosts.

    Redirect targets pass through here again because Scrapy schedules them as new
    requests. The check is on the resolved IP, so a public-looking name that
    points at 127.0.0.1 is refused as well.
    """

    def __init__(self, crawler):
        self.stats = crawler.stats
        self.allowed = {h.lower() for h in crawler.settings.getlist("JAGPT_ALLOW_PRIVATE_HOSTS")}

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def process_request(self, request, spider=None):
        host = (urlsplit(request.url).hostname or "").lower()
        if host in self.allowed:
            return None
        addr = blocked_address(host)
        if addr is not None:
            self.stats.inc_value("jagpt/failed/refused_address")
            raise RefusedAddress(f"refused {request.url}: {host} resolves to non-public address {addr}")
        return None
