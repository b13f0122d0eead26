"""Crawl + extract benchmark on a generated local Japanese site.

    .venv/bin/python bench/crawl.py [--pages 1200] [--workers N] [--json FILE]

1. Builds a site of ``--pages`` distinct Japanese article pages (3-8 KB each,
   about 10% of them Shift_JIS) plus category/list index pages, robots.txt and
   sitemap.xml, all pre-encoded in memory.
2. Serves it on 127.0.0.1 (free port) from an asyncio HTTP/1.1 keep-alive
   server in a background thread.
3. Crawls it with the project's real crawler (``crawlers.crawl.crawl_source``,
   a Scrapy subprocess) with politeness off, and times it.
4. Extracts the published raw partition with ``corpus.extract.extract_partition``
   and times that.
5. Prints a table, checks the targets (fetch pages/s over the wall time of
   crawl_source, startup included; extract pages/s per worker), optionally
   writes ``--json FILE``. See docs/performance.md.

Exit status: 0 all targets met, 1 a target missed, 2 the benchmark itself is
invalid (the crawler failed, the crawl did not store every page, or
extraction lost more than 10% of the articles).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import html
import json
import logging
import os
import platform
import random
import re
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import NoReturn

# Runs as a script: make the project importable even without an editable
# install, here and in the crawler subprocess (``python -m crawlers.worker``).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

from corpus.extract import ExtractSettings, extract_partition  # noqa: E402
from corpus.storage import Storage  # noqa: E402
from crawlers.config import CrawlSettings, Source  # noqa: E402
from crawlers.crawl import crawl_source, partition_files  # noqa: E402
from crawlers.sample import sample_sentences as site_sentences  # noqa: E402

TARGET_FETCH_PAGES_S = 150.0
TARGET_EXTRACT_PAGES_S_PER_CORE = 25.0
SITE_NAME = "みどり町アーカイブ"

# --------------------------------------------------------------------------
# Text: sentences from the bundled sample site, recombined, plus sentences
# generated from phrase lists, so every paragraph (and every page) is unique.
# --------------------------------------------------------------------------


TIMES = ["今朝", "昨日の夕方", "先週の日曜日", "この春", "去年の秋", "毎朝", "夜遅く", "昼休みに", "月に一度",
         "年末に", "梅雨の晴れ間に", "連休の初日に", "雪の降った翌日", "夏祭りの前の晩", "朝市の日"]
PLACES = ["駅前の商店街", "町の図書館", "川沿いの遊歩道", "公民館", "小学校の体育館", "港の市場", "山のふもとの畑",
          "古い神社の境内", "駅の待合室", "海辺の公園", "旧道沿いの茶屋", "役場の前の広場", "田んぼのあぜ道",
          "商工会の事務所", "バス停のそば"]
PERSONS = ["近所のおばあさん", "町内会の会長", "若い農家さん", "図書館の司書", "中学生たち", "商店街の店主",
           "隣の家の子ども", "旅行中の夫婦", "役場の職員", "地元の漁師", "郵便局の配達員", "保育園の先生",
           "陶芸教室の先生", "パン屋の主人", "消防団の団員"]
OBJECTS = ["手作りのお菓子", "新しい看板", "季節の野菜", "古い写真", "地域の地図", "桜の苗木", "子ども向けの絵本",
           "大きな鍋", "木製のベンチ", "祭りの提灯", "手ぬぐい", "干し柿", "竹細工のかご", "郷土料理のレシピ",
           "昔の時刻表"]
VERBS = ["並べていました", "配っていました", "運んでいました", "直していました", "見せてくれました",
         "準備していました", "片付けていました", "飾っていました", "持ってきました", "紹介していました"]
COMMENTS = ["とても印象に残りました", "思わず足を止めて見入ってしまいました", "町の人たちも喜んでいるようでした",
            "来年もぜひ続けてほしいと思います", "なんだか懐かしい気持ちになりました", "話を聞くうちに時間を忘れました",
            "写真では伝わらない良さがあります", "次の機会にはもっと詳しく調べてみるつもりです",
            "小さな町ならではの温かさを感じました", "子どもたちの笑い声があちこちから聞こえてきました"]
ORIGINS = ["隣町の工房", "県北の農家", "海沿いの集落", "昔からの取引先", "山あいの温泉地", "遠くの親戚"]
REASONS = ["人手が足りない", "天気が安定しない", "材料が手に入りにくい", "若い人が少ない", "場所が狭い"]
TEMPLATES = [
    "{time}、{place}で{person}が{object}を{verb}。",
    "{place}では{object}が話題になっていて、{comment}。",
    "{person}に聞いたところ、{object}は{origin}から取り寄せたものだそうです。",
    "{time}に{place}を訪ねると、{person}が{object}を{verb}。",
    "{person}によると、{reason}ことが今いちばんの悩みだそうで、{object}の準備も大変なのだとか。",
    "{object}のことを{person}に話すと、「それなら{place}に行ってみるといい」と教えてくれました。",
    "{time}の{place}は人通りも少なく、{comment}。",
]
HEADINGS = ["はじめに", "その日のこと", "町の人に聞いた話", "昔と今", "準備のあれこれ", "ちょっとした発見",
            "次の計画", "振り返って", "おまけの話", "思い出したこと", "まとめ"]
TOPICS = ["朝市", "味噌づくり", "古民家", "図書館", "商店街", "夏祭り", "郷土料理", "渡し船", "田植え",
          "盆踊り", "方言", "路線バス", "公民館講座", "竹細工", "干し柿", "桜並木", "漁港", "温泉", "駄菓子屋",
          "鉄道の歴史"]
TITLE_FORMS = ["{place}で見つけた{topic}の話", "{topic}と{person}", "{time}の{topic}", "{topic}をめぐる小さな旅",
               "{place}の{topic}、その後", "{person}に教わった{topic}のこと"]
CATEGORIES = [("blog", "ブログ"), ("news", "ニュース"), ("qa", "質問箱"), ("dict", "町ことば辞典"),
              ("release", "お知らせ"), ("novel", "連載小説"), ("column", "コラム"), ("local", "地域の話題"),
              ("food", "台所だより"), ("travel", "小さな旅")]
PER_LIST_PAGE = 30
RELATED = 5


def sample_sentences() -> list[str]:
    """The sample site's sentences that also encode as cp932 (usable on the Shift_JIS pages too)."""
    out = []
    for s in site_sentences():
        try:
            s.encode("cp932")
        except UnicodeEncodeError:
            continue
        out.append(s)
    return out


def gen_sentence(rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(
        time=rng.choice(TIMES), place=rng.choice(PLACES), person=rng.choice(PERSONS), object=rng.choice(OBJECTS),
        verb=rng.choice(VERBS), comment=rng.choice(COMMENTS), origin=rng.choice(ORIGINS), reason=rng.choice(REASONS),
    )


# --------------------------------------------------------------------------
# The site
# --------------------------------------------------------------------------


@dataclass
class Article:
    idx: int
    cat: str
    path: str
    title: str
    sjis: bool
    date: str
    related: list[int] = field(default_factory=list)


def _chrome_top(title: str, charset: str, crumbs: list[tuple[str, str]]) -> str:
    nav = "".join(f'<li><a href="/{slug}/">{label}</a></li>' for slug, label in CATEGORIES)
    crumb = " &gt; ".join(f'<a href="{href}">{label}</a>' for href, label in crumbs)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="ja">\n<head>\n'
        f'<meta charset="{charset}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)} | {SITE_NAME}</title>\n"
        "</head>\n<body>\n"
        f'<header class="site-header"><div class="logo"><a href="/">{SITE_NAME}</a></div>'
        '<form class="search" action="/search"><input type="text" name="q" placeholder="サイト内検索"></form>\n'
        f'<nav class="global"><ul><li><a href="/">トップ</a></li>{nav}</ul></nav></header>\n'
        f'<div class="breadcrumb">{crumb}</div>\n'
    )


_FOOTER = (
    '<footer class="site-footer"><nav><a href="/">トップページ</a> | '
    + " | ".join(f'<a href="/{slug}/">{label}</a>' for slug, label in CATEGORIES[:5])
    + "</nav>\n<p>このサイトの文章は、みどり町アーカイブ編集部が町の皆さんの協力を得て書いたものです。"
    "無断転載はご遠慮ください。ご意見・ご感想は編集部までお寄せください。</p>\n"
    f"<p>&copy; 2026 {SITE_NAME}編集部</p></footer>\n</body>\n</html>\n"
)


def build_site(n_pages: int, seed: int = 20261129) -> tuple[dict[str, tuple[str, str]], list[Article], int]:
    """Path -> (content type, text) for every page; the article list; number of HTML pages."""
    rng = random.Random(seed)
    pool = sample_sentences()
    articles: list[Article] = []
    titles: set[str] = set()
    per_cat: dict[str, list[int]] = {slug: [] for slug, _ in CATEGORIES}
    for i in range(n_pages):
        cat = CATEGORIES[i % len(CATEGORIES)][0]
        n_in_cat = len(per_cat[cat]) + 1
        while True:
            title = rng.choice(TITLE_FORMS).format(
                place=rng.choice(PLACES), topic=rng.choice(TOPICS), person=rng.choice(PERSONS), time=rng.choice(TIMES))
            if title not in titles:
                break
            title = f"{title}（{n_in_cat}）"
            if title not in titles:
                break
        titles.add(title)
        date = f"20{rng.randint(18, 26)}年{rng.randint(1, 12)}月{rng.randint(1, 28)}日"
        a = Article(i, cat, f"/{cat}/{n_in_cat:04d}.html", title, sjis=rng.random() < 0.10, date=date)
        articles.append(a)
        per_cat[cat].append(i)
    for a in articles:
        same = per_cat[a.cat]
        k = same.index(a.idx)
        rel: list[int] = []
        for j in (same[(k + 1) % len(same)], same[(k - 1) % len(same)]):
            if j != a.idx and j not in rel:
                rel.append(j)
        while len(rel) < min(RELATED, n_pages - 1):
            j = rng.randrange(n_pages)
            if j != a.idx and j not in rel:
                rel.append(j)
        a.related = rel

    pages: dict[str, tuple[str, str]] = {}
    label = dict(CATEGORIES)
    for a in articles:
        charset = "Shift_JIS" if a.sjis else "utf-8"
        target = rng.randint(3000, 8000)  # bytes of the finished page, roughly
        out = [_chrome_top(a.title, charset, [("/", "トップ"), (f"/{a.cat}/", label[a.cat])])]
        out.append(f'<main>\n<article>\n<h1>{html.escape(a.title)}</h1>\n<p class="date">{a.date} 公開</p>\n')
        related = "".join(f'<li><a href="{articles[j].path}">{html.escape(articles[j].title)}</a></li>'
                          for j in a.related)
        tail = (f'</article>\n<aside class="related"><h3>関連記事</h3><ul>{related}</ul></aside>\n</main>\n'
                + _FOOTER)
        size = sum(len(s.encode("utf-8")) for s in out) + len(tail.encode("utf-8"))  # close enough
        enc = "cp932" if a.sjis else "utf-8"
        n_par = 0
        while size < target or n_par < 3:
            if n_par and n_par % 3 == 0:
                h = f"<h2>{rng.choice(HEADINGS)}</h2>\n"
                out.append(h)
                size += len(h.encode(enc))
            sents = [rng.choice(pool) if rng.random() < 0.6 else gen_sentence(rng) for _ in range(rng.randint(3, 7))]
            p = f"<p>{html.escape(''.join(sents))}</p>\n"
            out.append(p)
            size += len(p.encode(enc))
            n_par += 1
        out.append(tail)
        pages[a.path] = (f"text/html; charset={charset}", "".join(out))

    # Category index (depth 1) -> list pages (depth 2) -> articles (depth <= 3).
    for slug, name in CATEGORIES:
        ids = per_cat[slug]
        chunks = [ids[k:k + PER_LIST_PAGE] for k in range(0, len(ids), PER_LIST_PAGE)] or [[]]
        list_paths = [f"/{slug}/" if n == 0 else f"/{slug}/list-{n + 1}.html" for n in range(len(chunks))]
        for n, (chunk, lp) in enumerate(zip(chunks, list_paths)):
            items = "".join(
                f'<li><a href="{articles[j].path}">{html.escape(articles[j].title)}</a> '
                f'<span class="date">{articles[j].date}</span></li>' for j in chunk)
            pager = " ".join(f'<a href="{p}">{m + 1}</a>' for m, p in enumerate(list_paths))
            body = (_chrome_top(f"{name}（{n + 1}ページ目）", "utf-8", [("/", "トップ"), (f"/{slug}/", name)])
                    + f"<main>\n<h1>{name}の記事一覧（{n + 1}ページ目）</h1>\n"
                    f"<p>{name}の記事を新しい順に並べています。全{len(ids)}件のうち{len(chunk)}件を表示しています。</p>\n"
                    f'<ul class="list">{items}</ul>\n<p class="pager">{pager}</p>\n</main>\n' + _FOOTER)
            pages[lp] = ("text/html; charset=utf-8", body)
    cats = "".join(
        f'<li><a href="/{slug}/">{name}</a>（{len(per_cat[slug])}件）</li>' for slug, name in CATEGORIES)
    latest = "".join(f'<li><a href="{a.path}">{html.escape(a.title)}</a></li>' for a in articles[-20:])
    pages["/"] = ("text/html; charset=utf-8", _chrome_top("トップ", "utf-8", [("/", "トップ")])
                  + f"<main>\n<h1>{SITE_NAME}へようこそ</h1>\n"
                  "<p>小さな町の暮らしや行事、町の人たちの話を集めたサイトです。カテゴリーから記事をお選びください。</p>\n"
                  f'<h2>カテゴリー</h2><ul>{cats}</ul>\n<h2>新着記事</h2><ul>{latest}</ul>\n</main>\n' + _FOOTER)
    n_html = len(pages)
    return pages, articles, n_html


# --------------------------------------------------------------------------
# The server: asyncio, HTTP/1.1 keep-alive, every response pre-encoded.
# --------------------------------------------------------------------------


class SiteServer:
    """Serves pre-encoded responses from a background thread; counts requests and
    measures its own CPU time, so a slow server would show up in the report."""

    def __init__(self, pages: dict[str, tuple[str, str]]):
        self.raw_pages = pages
        self.responses: dict[bytes, bytes] = {}
        self.bodies: dict[bytes, tuple[bytes, bytes]] = {}  # path -> (headers w/o Connection, body)
        self.requests = 0
        self.bytes_sent = 0
        self.first: float | None = None
        self.last: float | None = None
        self.cpu_s = 0.0
        self.port = 0
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def _encode(self, origin: str) -> None:
        def put(path: str, ctype: str, body: bytes) -> None:
            head = (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Server: jagpt-bench\r\n").encode("ascii")
            self.bodies[path.encode("ascii")] = (head, body)
            self.responses[path.encode("ascii")] = head + b"Connection: keep-alive\r\n\r\n" + body

        for path, (ctype, text) in self.raw_pages.items():
            enc = "cp932" if "Shift_JIS" in ctype else "utf-8"
            put(path, ctype, text.encode(enc))
        put("/robots.txt", "text/plain; charset=utf-8",
            f"User-agent: *\nAllow: /\n\nSitemap: {origin}/sitemap.xml\n".encode())
        locs = "".join(f"  <url><loc>{origin}{p}</loc></url>\n" for p in self.raw_pages)
        put("/sitemap.xml", "application/xml",
            ('<?xml version="1.0" encoding="UTF-8"?>\n'
             f'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">\n{locs}</urlset>\n').encode())
        nf = "<html><body><h1>404 Not Found</h1></body></html>".encode()
        self.not_found = (b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html; charset=utf-8\r\n"
                          + f"Content-Length: {len(nf)}\r\n".encode() + b"Connection: keep-alive\r\n\r\n" + nf)

    def start(self) -> SiteServer:
        self._thread = threading.Thread(target=self._run, name="bench-site", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("benchmark site server did not start")
        return self

    def _run(self) -> None:
        t0 = resource.getrusage(resource.RUSAGE_THREAD)
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()
            t1 = resource.getrusage(resource.RUSAGE_THREAD)
            self.cpu_s = (t1.ru_utime - t0.ru_utime) + (t1.ru_stime - t0.ru_stime)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", 0, backlog=1024, reuse_address=True)
        self.port = server.sockets[0].getsockname()[1]
        self._encode(f"http://127.0.0.1:{self.port}")
        self._ready.set()
        async with server:
            await self._stop.wait()

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(30)

    def respond(self, head: bytes) -> tuple[bytes, bool]:
        """The full response to one request head, and whether to close afterwards."""
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.requests += 1
        line, _, rest = head.partition(b"\r\n")
        parts = line.split(b" ")
        method = parts[0] if parts else b""
        target = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b"/"
        if target.startswith(b"http://"):  # absolute form
            target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
        if target == b"/index.html":
            target = b"/"
        low = rest.lower()
        close = b"connection: close" in low or (parts[-1] == b"HTTP/1.0" and b"keep-alive" not in low)
        if target in self.bodies:
            head_bytes, body = self.bodies[target]
            if close or method == b"HEAD":
                resp = head_bytes + (b"Connection: close\r\n\r\n" if close else b"Connection: keep-alive\r\n\r\n")
                if method != b"HEAD":
                    resp += body
            else:
                resp = self.responses[target]
        else:
            resp = self.not_found
        self.bytes_sent += len(resp)
        return resp, close


class _Conn(asyncio.Protocol):
    def __init__(self, site: SiteServer):
        self.site = site
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.transport.close()
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            resp, close = self.site.respond(head)
            self.transport.write(resp)
            if close:
                self.transport.close()
                return


# --------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------


class _ScrapyStats(logging.Handler):
    """Picks up the raw Scrapy stats that crawl_source logs at DEBUG level
    (start/finish time, elapsed seconds); optional, the benchmark works without."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.raw: dict | None = None

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        for a in args:
            if isinstance(a, dict) and "response_received_count" in a:
                self.raw = a


def cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def machine_busy_s() -> float | None:
    """CPU seconds all processes on the machine have used since boot (Linux), for
    telling how much of a phase's CPU went to processes outside this benchmark."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...; guest time is inside user,
    # and steal is time the hypervisor gave to other machines, so it is left out.
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    return busy / os.sysconf("SC_CLK_TCK")


def others_cpu_s(busy0: float | None, busy1: float | None, ours: float) -> float | None:
    if busy0 is None or busy1 is None:
        return None
    return max(0.0, busy1 - busy0 - ours)


def maxrss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return None


def run(args: argparse.Namespace) -> tuple[dict, int]:
    workers = args.workers or os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    if args.pages < 1000:
        log("note: with under 1,000 pages, start-up costs dominate and the figures say little")

    t = time.perf_counter()
    pages, articles, n_html = build_site(args.pages, seed=args.seed)
    build_s = time.perf_counter() - t
    server = SiteServer(pages).start()
    sizes = [len(server.bodies[p.encode()][1]) for p in pages]
    art_sizes = [len(server.bodies[a.path.encode()][1]) for a in articles]
    digests = {hashlib.sha1(server.bodies[p.encode()][1]).digest() for p in pages}
    n_sjis = sum(a.sjis for a in articles)
    if len(digests) != len(pages):
        invalid(f"the site generator produced {len(pages) - len(digests)} duplicate pages")
    log(f"site: {n_html} HTML pages ({len(articles)} articles, {n_sjis} Shift_JIS, "
        f"{n_html - len(articles)} index pages), {sum(sizes) / 1e6:.1f} MB, article size "
        f"{min(art_sizes)}-{max(art_sizes)} B (mean {sum(art_sizes) // len(art_sizes)}), built in {build_s:.1f}s, "
        f"serving on 127.0.0.1:{server.port}")

    work = tempfile.mkdtemp(prefix="jagpt-bench-") if args.keep else None
    tmp = tempfile.TemporaryDirectory(prefix="jagpt-bench-") if not args.keep else None
    root = work or tmp.name  # type: ignore[union-attr]
    try:
        storage = Storage(os.path.join(root, "data"))
        base = f"http://127.0.0.1:{server.port}/"
        source = Source(
            name="bench", start_urls=[base], sitemaps=[base + "sitemap.xml"], allow_private_hosts=["127.0.0.1"],
            max_pages=n_html + 50, max_depth=10, max_minutes=10,
        )
        settings = CrawlSettings(download_delay=0, autothrottle=False, concurrent_requests_per_domain=args.concurrency)

        grab = _ScrapyStats()
        progress = logging.StreamHandler(sys.stderr)
        progress.setLevel(logging.INFO)
        progress.setFormatter(logging.Formatter("[bench] %(message)s"))
        clog = logging.getLogger("crawlers.crawl")
        old_level, old_propagate = clog.level, clog.propagate
        clog.setLevel(logging.DEBUG)
        clog.propagate = False
        clog.addHandler(grab)
        clog.addHandler(progress)
        log(f"crawling with crawl_source (concurrent_requests_per_domain={args.concurrency}) ...")
        c0, s0, b0 = cpu_s(resource.RUSAGE_CHILDREN), cpu_s(resource.RUSAGE_SELF), machine_busy_s()
        t0 = time.perf_counter()
        try:
            result = crawl_source(storage, source, settings)
        except RuntimeError as e:  # the crawler process failed
            invalid(str(e))
        finally:
            t1 = time.perf_counter()
            clog.removeHandler(grab)
            clog.removeHandler(progress)
            clog.setLevel(old_level)
            clog.propagate = old_propagate
            server.stop()
        crawl_wall = t1 - t0
        crawl_child_cpu = cpu_s(resource.RUSAGE_CHILDREN) - c0
        crawl_self_cpu = cpu_s(resource.RUSAGE_SELF) - s0  # includes the site server thread
        crawl_others = others_cpu_s(b0, machine_busy_s(), crawl_child_cpu + crawl_self_cpu)
        rss_after_crawl = maxrss_mib(resource.RUSAGE_CHILDREN)
        st = result.stats
        stored = int(st.get("new", 0)) + int(st.get("changed", 0)) + int(st.get("unchanged", 0))
        first_req = (server.first - t0) if server.first else None
        window = (server.last - server.first) if server.first and server.last else None
        scrapy_elapsed = None
        if grab.raw is not None:
            try:
                scrapy_elapsed = float(grab.raw.get("elapsed_time_seconds"))
            except (TypeError, ValueError):
                scrapy_elapsed = None
        brief = {k: st.get(k) for k in ("fetched", "new", "bytes", "failed", "finish_reason")}
        log(f"crawl: {crawl_wall:.2f}s wall, stats {json.dumps(brief, ensure_ascii=False)}")

        if not result.partition:
            invalid("the crawl stored nothing; cannot benchmark extraction")
        files = partition_files(storage, result.partition)
        log(f"extracting {stored} pages with {workers} worker(s) ...")
        c1, s1, b1 = cpu_s(resource.RUSAGE_CHILDREN), cpu_s(resource.RUSAGE_SELF), machine_busy_s()
        e0 = time.perf_counter()
        counts = extract_partition(storage, files, ExtractSettings(workers=workers), "extract/bench")
        extract_wall = time.perf_counter() - e0
        extract_cpu = (cpu_s(resource.RUSAGE_CHILDREN) - c1) + (cpu_s(resource.RUSAGE_SELF) - s1)
        extract_others = others_cpu_s(b1, machine_busy_s(), extract_cpu)
        rss_children = maxrss_mib(resource.RUSAGE_CHILDREN)
        rss_self = maxrss_mib(resource.RUSAGE_SELF)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if work:
        log(f"kept work dir {work}")

    fetch_pps = stored / crawl_wall
    extract_pps = counts["pages"] / extract_wall
    fig = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "mem_gib": mem_total_gib(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]},
        "site": {"html_pages": n_html, "articles": len(articles), "shift_jis": n_sjis,
                 "index_pages": n_html - len(articles), "mbytes": sum(sizes) / 1e6,
                 "article_bytes_min": min(art_sizes), "article_bytes_max": max(art_sizes),
                 "article_bytes_mean": sum(art_sizes) / len(art_sizes)},
        "fetch": {
            "wall_s": crawl_wall,
            "pages_stored": stored,
            "responses": st.get("fetched"),
            "bytes": st.get("bytes"),
            "failed": st.get("failed"),
            "encodings": st.get("encodings"),
            "finish_reason": st.get("finish_reason"),
            "pages_per_s": fetch_pps,
            "mbytes_per_s": (st.get("bytes") or 0) / crawl_wall / 1e6,
            "startup_s": first_req,  # crawl_source start -> first request at the server
            "server_window_s": window,  # first -> last request at the server
            "pages_per_s_excl_startup": stored / window if window else None,
            "scrapy_elapsed_s": scrapy_elapsed,
            "pages_per_s_scrapy_elapsed": stored / scrapy_elapsed if scrapy_elapsed else None,
            "scrapy_stats": grab.raw,  # Scrapy's own counters, when crawl_source logged them
            "concurrent_requests_per_domain": args.concurrency,
            "crawler_cpu_s": crawl_child_cpu,  # the Scrapy subprocess
            "parent_cpu_s": crawl_self_cpu,  # this process: site server + publishing
            "others_cpu_s": crawl_others,  # CPU other processes on the machine used meanwhile
            "server": {"requests": server.requests, "cpu_s": server.cpu_s,
                       "cpu_us_per_request": server.cpu_s / server.requests * 1e6 if server.requests else None,
                       "cpu_share_of_window": server.cpu_s / window if window else None},
        },
        "extract": {
            "wall_s": extract_wall,
            "workers": workers,
            "pages": counts["pages"],
            "extracted": counts["extracted"],
            "dropped": counts["dropped"],
            "pages_per_s": extract_pps,
            "pages_per_s_per_core": extract_pps / workers,
            "cpu_s": extract_cpu,  # pool workers + this process
            "cpu_ms_per_page": extract_cpu / counts["pages"] * 1000 if counts["pages"] else None,
            "others_cpu_s": extract_others,
        },
        "memory": {"max_rss_child_crawler_mib": rss_after_crawl,
                   "max_rss_child_any_mib": rss_children,
                   "max_rss_parent_mib": rss_self},
        "targets": {"fetch_pages_per_s": TARGET_FETCH_PAGES_S,
                    "extract_pages_per_s_per_core": TARGET_EXTRACT_PAGES_S_PER_CORE},
    }
    fig["pass"] = {
        "fetch": fetch_pps >= TARGET_FETCH_PAGES_S,
        "extract": extract_pps / workers >= TARGET_EXTRACT_PAGES_S_PER_CORE,
    }
    fig["valid"] = {
        "all_pages_stored": stored == n_html,
        "most_pages_extracted": counts["extracted"] >= 0.9 * len(articles),
    }
    if not all(fig["valid"].values()):
        status = 2
    elif not all(fig["pass"].values()):
        status = 1
    else:
        status = 0
    return fig, status


def invalid(msg: str) -> NoReturn:
    """The benchmark could not measure what it should: exit status 2."""
    log(f"error: {msg}")
    sys.exit(2)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def report(fig: dict) -> str:
    f, e, m, s = fig["fetch"], fig["extract"], fig["memory"], fig["site"]

    def num(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    ok = lambda b: "PASS" if b else "MISS"  # noqa: E731
    rows = [
        ("site", f"{s['html_pages']} HTML pages ({s['articles']} articles, {s['shift_jis']} Shift_JIS), "
                 f"{s['mbytes']:.1f} MB", ""),
        ("fetch: wall (crawl_source)", f"{f['wall_s']:.2f} s", ""),
        ("fetch: pages stored / fetched", f"{f['pages_stored']} / {f['responses']}",
         f"{f['server']['requests']} requests at the server (robots.txt, sitemap.xml included)"),
        ("fetch: pages/s (wall)", f"{f['pages_per_s']:.1f}",
         f">= {fig['targets']['fetch_pages_per_s']:.0f}  {ok(fig['pass']['fetch'])}"),
        ("fetch: MB/s (wall)", f"{f['mbytes_per_s']:.2f}", ""),
        ("fetch: startup (to 1st request)", f"{num(f['startup_s'], '{:.2f}')} s", ""),
        ("fetch: pages/s excl. startup", num(f["pages_per_s_excl_startup"]), "first->last request at server"),
        ("fetch: pages/s (Scrapy elapsed)", num(f["pages_per_s_scrapy_elapsed"]),
         f"elapsed {num(f['scrapy_elapsed_s'], '{:.2f}')} s"),
        ("fetch: crawler process CPU", f"{f['crawler_cpu_s']:.2f} s",
         f"{f['crawler_cpu_s'] / f['wall_s'] * 100:.0f}% of the wall time"),
        ("fetch: other processes' CPU", f"{num(f['others_cpu_s'], '{:.2f}')} s",
         "elsewhere on the machine; ~0 on an idle one"),
        ("fetch: server CPU per request", f"{num(f['server']['cpu_us_per_request'], '{:.0f}')} us",
         f"{num((f['server']['cpu_share_of_window'] or 0) * 100, '{:.0f}')}% of one core"),
        ("extract: wall", f"{e['wall_s']:.2f} s", f"{e['workers']} worker(s)"),
        ("extract: pages / extracted", f"{e['pages']} / {e['extracted']}",
         f"dropped {json.dumps(e['dropped'], ensure_ascii=False)}"),
        ("extract: pages/s", f"{e['pages_per_s']:.1f}", ""),
        ("extract: CPU per page", f"{num(e['cpu_ms_per_page'], '{:.1f}')} ms",
         f"{e['cpu_s'] / (e['wall_s'] * e['workers']) * 100:.0f}% of {e['workers']} core(s), incl. worker start-up"),
        ("extract: other processes' CPU", f"{num(e['others_cpu_s'], '{:.2f}')} s",
         "elsewhere on the machine; ~0 on an idle one"),
        ("extract: pages/s per core", f"{e['pages_per_s_per_core']:.1f}",
         f">= {fig['targets']['extract_pages_per_s_per_core']:.0f}  {ok(fig['pass']['extract'])}"),
        ("peak RSS: crawler child", f"{m['max_rss_child_crawler_mib']:.0f} MiB", ""),
        ("peak RSS: any child", f"{m['max_rss_child_any_mib']:.0f} MiB", "crawler or extract worker"),
        ("peak RSS: this process", f"{m['max_rss_parent_mib']:.0f} MiB", "incl. the in-memory site"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"jagpt crawl/extract benchmark  {fig['date']}  {fig['machine']['cpus']} CPU "
             f"({fig['machine']['cpu_model']})", "-" * (w0 + w1 + 30)]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows]
    for phase in ("fetch", "extract"):
        ph = fig[phase]
        cores = (ph["others_cpu_s"] or 0) / ph["wall_s"]
        if cores > 0.2:
            lines.append(f"NOTE: other processes used {cores:.1f} core(s) on average during {phase}; "
                         "its figures are lower than on an idle machine")
    for k, v in fig["valid"].items():
        if not v:
            lines.append(f"INVALID: {k.replace('_', ' ')} is false")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=1200, help="article pages to generate (>= 1000 for a real run)")
    ap.add_argument("--workers", type=int, default=0, help="extract processes (default: one per CPU)")
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent_requests_per_domain for the crawl")
    ap.add_argument("--seed", type=int, default=20261129)
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary storage root")
    args = ap.parse_args(argv)
    if args.pages < 10:
        ap.error("--pages must be at least 10")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fig, status = run(args)
    print(report(fig))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(fig, f, ensure_ascii=False, indent=2, default=str)
            f.write("\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
