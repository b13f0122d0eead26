"""A real HTTP server on 127.0.0.1 whose pages tests define and change between crawls.

Each route is a :class:`Page`: bytes, headers, status, a delay, or a redirect.
Pages carry an ETag, so conditional requests get a 304 when nothing changed,
and every request is logged so tests can count what the crawler fetched.
"""

from __future__ import annotations

import gzip
import hashlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Page:
    body: bytes = b""
    content_type: str = "text/html"
    status: int = 200
    delay: float = 0.0
    location: str | None = None  # redirect target
    gzip: bool = False
    etag: bool = True
    fail_first: int = 0  # answer 429 to this many requests first
    headers: dict[str, str] = field(default_factory=dict)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the crawler hanging up early (size limit, timeout) is part of the tests


class Site:
    def __init__(self):
        self.pages: dict[str, Page] = {}
        self.log: list[tuple[str, dict[str, str]]] = []
        self.hits: Counter = Counter()
        self._lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                with site._lock:
                    site.log.append((self.path, dict(self.headers)))
                    site.hits[self.path] += 1
                    hits = site.hits[self.path]
                page = site.pages.get(self.path)
                if page is None:
                    return self._send(404, b"not found", {"Content-Type": "text/plain"})
                if page.delay:
                    time.sleep(page.delay)
                if hits <= page.fail_first:
                    return self._send(429, b"slow down", {"Content-Type": "text/plain", "Retry-After": "0"})
                if page.location:
                    return self._send(page.status, b"", {"Location": page.location.format(origin=site.origin)})
                body = page.body.replace(b"{origin}", site.origin.encode())
                headers = {"Content-Type": page.content_type, **page.headers}
                if page.etag and page.status == 200:
                    tag = '"' + hashlib.sha1(body).hexdigest()[:16] + '"'
                    headers["ETag"] = tag
                    if self.headers.get("If-None-Match") == tag:
                        return self._send(304, b"", {"ETag": tag})
                if page.gzip:
                    body = gzip.compress(body)
                    headers["Content-Encoding"] = "gzip"
                self._send(page.status, body, headers)

            def _send(self, status, body, headers):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the crawler gave up on this response (size limit, timeout)

            def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Site:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def html(self, path: str, body: str, encoding: str = "utf-8", content_type: str | None = None, **kw) -> None:
        ct = content_type if content_type is not None else "text/html"
        self.pages[path] = Page(body.encode(encoding), ct, **kw)

    def requests_for(self, path: str) -> int:
        return sum(1 for p, _ in self.log if p == path)


def japanese_page(title: str, prose: str, links: list[str] = (), meta: str = "", lang: str = "ja") -> str:
    anchors = "".join(f'<li><a href="{href}">{href}</a></li>' for href in links)
    return (
        f'<!DOCTYPE html><html lang="{lang}"><head>{meta}<title>{title}</title></head>'
        f"<body><header>サイト名</header><article><h1>{title}</h1><p>{prose}</p></article>"
        f"<nav><ul>{anchors}</ul></nav><footer>お問い合わせ</footer></body></html>"
    )
