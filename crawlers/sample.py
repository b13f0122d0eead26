"""The bundled sample site, served by a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import html
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources


def site_dir() -> str:
    return str(resources.files("crawlers") / "sample-site")


class _SampleSiteHandler(SimpleHTTPRequestHandler):
    """Serves the files as they are, except that ``{{origin}}`` in robots.txt and
    sitemap.xml becomes this server's own origin (both need absolute URLs)."""

    templated = {"/robots.txt": "text/plain; charset=utf-8", "/sitemap.xml": "application/xml"}

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path not in self.templated:
            return super().do_GET()
        host, port = self.server.server_address[:2]
        with open(self.translate_path(path), encoding="utf-8") as f:
            body = f.read().replace("{{origin}}", f"http://{host}:{port}").encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", self.templated[path])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


@contextmanager
def serve_sample_site(host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve the sample site; yields its base URL (``http://host:port/``)."""
    handler = functools.partial(_SampleSiteHandler, directory=site_dir())
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise RuntimeError(
            f"cannot serve the sample site on {host}:{port} ({e.strerror}); "
            "change the port of the sample source's start URL in the config"
        ) from None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


_PARAGRAPH = re.compile(r"<p(?:\s[^>]*)?>(.*?)</p>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")
_SENTENCE = re.compile(r"[^。！？]+[。！？]")


def sample_sentences(min_chars: int = 12) -> list[str]:
    """Every sentence of the sample site's Japanese paragraphs (for benchmarks that need real prose)."""
    out: set[str] = set()
    for dirpath, _, names in os.walk(site_dir()):
        if os.path.basename(dirpath) == "private":
            continue
        for name in names:
            if not name.endswith(".html") or name == "english.html":
                continue
            with open(os.path.join(dirpath, name), "rb") as f:
                raw = f.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp932")
            for p in _PARAGRAPH.findall(text):
                out.update(s.strip() for s in _SENTENCE.findall(html.unescape(_TAG.sub("", p))) if len(s.strip()) >= min_chars)
    return sorted(out)
