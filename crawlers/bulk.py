"""Bulk sources: dumps and archives read into raw partitions, as if crawled.

Three readers turn files someone downloaded into ``RAW_PAGE`` rows:

* ``wikipedia``: a MediaWiki XML dump (``jawiki-...-pages-articles.xml.bz2``),
  streamed with bz2 and ``xml.etree`` ``iterparse``; main namespace only,
  redirects skipped, the wiki markup stripped to prose (:func:`wiki_to_text`).
* ``aozora``: Aozora Bunko text zips (one Shift_JIS ``.txt`` each), with the
  header, the footer, ruby and the typesetting notes removed (:func:`aozora_to_text`).
* ``warc``: Common Crawl WARC files (HTML responses, stored as a crawl stores a
  page) and WET files (``conversion`` records, plain text). A fast Japanese
  prefilter runs before anything is stored.

:func:`import_bulk` writes what the readers yield to
``raw/source=<name>/run=<run_id>/part-NNNNN.parquet``, each file atomically,
then publishes the run with ``_SUCCESS.json`` like a crawl run. Extract, clean
and dedup then treat it like any crawled partition. The run id is a hash of
the inputs (kind, file names, sizes and modification times, genre, base URL),
so importing the same files again finds the published run and does nothing.

Text sources (Wikipedia, Aozora, WET) are stored as UTF-8 prose with
``content_type = "text/plain; charset=utf-8"`` and ``encoding_source = "bulk"``;
the first line of the body is the title. The extract stage passes such pages
through without trafilatura.

Plain Python, no Prefect and no Scrapy: the readers are generators, so memory
stays bounded by one page plus one batch of rows.
"""

from __future__ import annotations

import bz2
import hashlib
import logging
import os
import re
import time
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import get_args
from urllib.parse import quote

import pyarrow as pa
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

from corpus.schema import RAW_PAGE
from corpus.steps import content_key
from corpus.storage import Storage
from crawlers import charset, state
from crawlers.config import Genre

log = logging.getLogger(__name__)

KINDS = ("wikipedia", "aozora", "warc")
DEFAULT_GENRE = {"wikipedia": "encyclopedia", "aozora": "novel", "warc": "other"}
TEXT_TYPE = "text/plain; charset=utf-8"
HTML_TYPES = {"text/html", "application/xhtml+xml"}  # what the crawler parses, too
WIKIPEDIA_BASE = "https://ja.wikipedia.org/wiki/"
AOZORA_BASE = "aozora://"
MAX_PAGE_BYTES = 10 * 1024 * 1024  # like crawl.max_download_bytes
MIN_KANA_SHARE = 0.1  # WET: kana / non-space characters, below this a page is not Japanese
BATCH_BYTES = 128 * 1024 * 1024  # a part file is written at batch_rows rows or this many body bytes
PROGRESS_EVERY_S = 5.0

# What a reader yields: ("page", RAW_PAGE fields without source/genre/run_id),
# ("skipped", reason) for records that are not wanted (by design), or
# ("failed", reason) for records that are broken.
Outcome = tuple[str, object]


# -- helpers -----------------------------------------------------------------


def _mtime(path: str) -> datetime:
    return datetime.fromtimestamp(os.stat(path).st_mtime, timezone.utc)


def _parse_time(value: str | None, default: datetime) -> datetime:
    if not value:
        return default
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return default
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def text_page(url: str, text: str, fetched_at: datetime) -> dict:
    """A raw page for prose: UTF-8 bytes, ``text/plain``, first line the title."""
    body = text.encode("utf-8")
    return {
        "url": url,
        "final_url": url,
        "fetched_at": fetched_at,
        "http_status": 200,
        "content_type": TEXT_TYPE,
        "encoding": "utf-8",
        "encoding_source": "bulk",
        "charset_declared": "",
        "depth": 0,
        "content_sha1": hashlib.sha1(body).hexdigest(),
        "body": body,
    }


def _tidy(text: str) -> str:
    """Trim each line, drop trailing blanks, keep at most one blank line in a row."""
    lines = [line.strip() for line in text.split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


# -- Wikipedia -----------------------------------------------------------------

# Links to these namespaces are media or categories, not prose.
_DROP_LINK_NAMESPACES = {"file", "image", "media", "category", "ファイル", "画像", "メディア", "カテゴリ"}
# Tags whose contents are not prose (footnotes, maths, galleries, tables, code, ...).
_DROP_TAGS = {
    "ref", "references", "table", "gallery", "math", "chem", "ce", "score", "hiero", "timeline",
    "graph", "imagemap", "inputbox", "categorytree", "templatedata", "syntaxhighlight", "source",
    "mapframe", "maplink", "indicator", "noinclude", "includeonly", "templatestyles",
}
# [[en:Foo]]: a link to another language. Written in lower case, so that
# [[Re:ゼロから始める異世界生活]] (an article title) stays a link.
_INTERWIKI = re.compile(r"^(?:[a-z]{2,3}(?:-[a-z]+)*|simple)$")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"（[、，,\s]*）|\([、，,\s]+\)")  # not "()", which code samples use
_OPEN_COMMA = re.compile(r"（[、，]\s*")
_DOUBLE_COMMA = re.compile(r"([、，])(?:\s*[、，])+")
# Lines that are leftovers of unbalanced tables or templates, never prose.
_MARKUP_LINE = re.compile(r"^\s*(?:\{\||\|\}|\|-|\||!|\{\{|\}\})")


def _link_namespace(title: str) -> str | None:
    """The prefix before ``:`` as written, or None (``[[:Category:X]]`` is a visible link)."""
    if ":" not in title or title.startswith(":"):
        return None
    return title.split(":", 1)[0].strip()


def _wiki_text(code) -> str:
    """Readable text of parsed wikicode: templates, refs, tables and media gone."""
    from mwparserfromhell import nodes

    out: list[str] = []
    for node in code.nodes:
        if isinstance(node, nodes.Text):
            out.append(node.value)
        elif isinstance(node, nodes.Wikilink):
            ns = _link_namespace(str(node.title))
            if ns is not None and (ns.lower() in _DROP_LINK_NAMESPACES or _INTERWIKI.match(ns)):
                continue
            out.append(_wiki_text(node.text) if node.text is not None else _wiki_text(node.title).lstrip(":"))
        elif isinstance(node, nodes.ExternalLink):
            out.append(_wiki_text(node.title) if node.title is not None else (str(node.url) if not node.brackets else ""))
        elif isinstance(node, nodes.Heading):
            out.append("\n" + _wiki_text(node.title).strip() + "\n")
        elif isinstance(node, nodes.Tag):
            name = str(node.tag).strip().lower()
            if name in _DROP_TAGS:
                continue
            if name == "br":
                out.append("\n")
            elif name == "dd":
                out.append(" ")
            elif node.contents is not None and not node.self_closing:
                out.append(_wiki_text(node.contents))
        elif isinstance(node, nodes.HTMLEntity):
            out.append(node.normalize())
        # Template, Comment, Argument: nothing visible in prose
    return "".join(out)


def wiki_to_text(markup: str) -> str:
    """Wiki markup to prose.

    Templates (nested too), tables, ``<ref>``s, comments, media and category
    links, interlanguage links and HTML tags go; ``[[link|text]]`` becomes
    ``text``, bold and italic quotes go, headings stay as lines of their own and
    list items as lines of text. Parsed with mwparserfromhell, which handles
    nesting and unbalanced markup the way MediaWiki does.
    """
    import mwparserfromhell

    text = _wiki_text(mwparserfromhell.parse(markup))
    text = _MAGIC_WORD.sub("", text.replace("\xa0", " "))
    text = _EMPTY_PARENS.sub("", text)  # what a removed {{lang|..}} or date template leaves
    text = _OPEN_COMMA.sub("（", text)
    text = _DOUBLE_COMMA.sub(r"\1", text)
    text = "\n".join(line for line in text.split("\n") if not _MARKUP_LINE.match(line))
    return _tidy(text)


def wikipedia_url(base: str, title: str) -> str:
    """The article's URL as MediaWiki writes it (spaces as underscores, UTF-8 percent-encoded)."""
    return base + quote(title.replace(" ", "_"), safe=";@$!*(),/~:")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _wiki_page(page: ET.Element, ns: str, base: str, default_time: datetime) -> Outcome:
    title = (page.findtext(f"{ns}title") or "").strip()
    if (page.findtext(f"{ns}ns") or "0").strip() != "0":
        return "skipped", "namespace"
    if page.find(f"{ns}redirect") is not None:
        return "skipped", "redirect"
    rev = page.find(f"{ns}revision")
    markup = (rev.findtext(f"{ns}text") if rev is not None else None) or ""
    if re.match(r"\s*#(redirect|転送)", markup, re.I):
        return "skipped", "redirect"
    if not title or not markup.strip():
        return "failed", "empty"
    try:
        prose = wiki_to_text(markup)
    except Exception as e:  # the parser gives up on some hostile markup; one page, never the dump
        log.debug("wikipedia: %s: %s", title, e)
        return "failed", "markup_error"
    if not prose:
        return "failed", "empty"
    fetched = _parse_time(rev.findtext(f"{ns}timestamp") if rev is not None else None, default_time)
    return "page", text_page(wikipedia_url(base, title), f"{title}\n{prose}\n", fetched)


class _Read1:
    """Hands the XML parser what has been decompressed so far (``read1``).

    A plain ``read(n)`` waits for ``n`` bytes, so when the file ends early the
    text decompressed just before is lost with the exception.
    """

    def __init__(self, f):
        self.f = f

    def read(self, size: int = -1) -> bytes:
        return self.f.read1(size if size and size > 0 else 1 << 16)


def read_wikipedia(path: str) -> Iterator[Outcome]:
    """Articles of a MediaWiki XML dump (``.bz2``, multistream too, or plain ``.xml``).

    Memory stays bounded: each ``<page>`` is cleared from the tree once read. A
    truncated or corrupt file, or broken XML, ends the file with one ``failed``
    outcome (``truncated``, ``corrupt``, ``xml_error``); the pages before it are kept.
    """
    default_time = _mtime(path)
    base = WIKIPEDIA_BASE
    opener = bz2.open if path.endswith(".bz2") else open
    with opener(path, "rb") as f:
        root = None
        ns = ""
        try:
            for event, elem in ET.iterparse(_Read1(f), events=("start", "end")):
                if root is None:
                    root = elem
                    ns = elem.tag[: elem.tag.index("}") + 1] if elem.tag.startswith("{") else ""
                    continue
                if event != "end":
                    continue
                tag = _local(elem.tag)
                if tag == "base" and elem.text and "/wiki/" in elem.text:
                    base = elem.text.strip().split("/wiki/", 1)[0] + "/wiki/"  # from <siteinfo>
                elif tag == "page":
                    yield _wiki_page(elem, ns, base, default_time)
                    root.clear()  # the page (and anything before it) leaves memory
        except ET.ParseError as e:
            log.warning("wikipedia %s: broken XML, stopping this file: %s", path, e)
            yield "failed", "xml_error"
        except EOFError as e:
            log.warning("wikipedia %s: file ends early, keeping what was read: %s", path, e)
            yield "failed", "truncated"
        except OSError as e:  # bz2: "Invalid data stream"
            log.warning("wikipedia %s: corrupt, keeping what was read: %s", path, e)
            yield "failed", "corrupt"


# -- Aozora Bunko ----------------------------------------------------------------

_DASHES = re.compile(r"^-{10,}$")
_GAIJI = re.compile(r"※［＃([^］]*)］")
_NOTE = re.compile(r"［＃[^］]*］")
_RUBY = re.compile(r"《[^》]*》")
_UCS = re.compile(r"U\+([0-9A-Fa-f]{4,6})")
_MEN_KU_TEN = re.compile(r"(?<![\d-])([12])-(\d{1,2})-(\d{1,2})(?![\d-])")


def _gaiji(note: str) -> str:
    """The character an Aozora gaiji note describes (by U+ code or JIS X 0213 面-区-点), or ""."""
    m = _UCS.search(note)
    if m:
        try:
            return chr(int(m.group(1), 16))
        except (ValueError, OverflowError):
            return ""
    m = _MEN_KU_TEN.search(note)
    if m:
        men, ku, ten = (int(g) for g in m.groups())
        if 1 <= ku <= 94 and 1 <= ten <= 94:
            raw = (b"\x8f" if men == 2 else b"") + bytes([0xA0 + ku, 0xA0 + ten])
            try:
                return raw.decode("euc_jis_2004")
            except UnicodeDecodeError:
                return ""
    return ""


def aozora_markup_to_text(text: str) -> str:
    """Remove ruby (``｜漢字《かんじ》``, ``漢字《かんじ》``: the base text stays) and ``［＃…］`` notes.

    A ``※［＃…］`` gaiji note becomes the character it names when it gives a
    Unicode or JIS X 0213 code, and disappears otherwise.
    """
    text = _GAIJI.sub(lambda m: _gaiji(m.group(1)), text)
    text = _NOTE.sub("", text)
    text = _RUBY.sub("", text)
    return text.replace("｜", "")


def aozora_to_text(text: str) -> tuple[str, str, str]:
    """``(title, author, prose)`` of an Aozora Bunko text file (already decoded).

    The header is the title and author lines (and any more lines up to the
    first blank line), then the 【テキスト中に現れる記号について】 block between
    two lines of dashes, if there is one. The footer starts at the line that
    starts with 底本：.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff").split("\n")
    title = lines[0].strip() if lines else ""
    author = lines[1].strip() if len(lines) > 1 else ""
    dashes = [i for i, line in enumerate(lines[:200]) if _DASHES.match(line.strip())]
    if len(dashes) >= 2 and any("テキスト中に現れる記号" in line for line in lines[dashes[0] : dashes[1]]):
        start = dashes[1] + 1
    else:
        start = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("底本：")), len(lines))
    prose = _tidy(aozora_markup_to_text("\n".join(lines[start:end])))
    return title, author, prose


def read_aozora(path: str, base_url: str | None = None, max_bytes: int = MAX_PAGE_BYTES) -> Iterator[Outcome]:
    """The works in one Aozora Bunko zip: each ``.txt`` in it, read as cp932."""
    name = os.path.basename(path)
    base = base_url if base_url is not None else AOZORA_BASE
    fetched = _mtime(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if m.filename.lower().endswith(".txt") and not m.is_dir()]
            if not members:
                yield "failed", "no_txt"
                return
            for m in members:
                if m.file_size > max_bytes:
                    yield "failed", "size"
                    continue
                try:
                    raw = zf.read(m)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError):
                    yield "failed", "bad_zip"
                    continue
                try:
                    text = raw.decode("cp932")
                except UnicodeDecodeError:
                    yield "failed", "decode"
                    continue
                title, author, prose = aozora_to_text(text)
                if not prose:
                    yield "failed", "empty"
                    continue
                url = base + name if len(members) == 1 else f"{base}{name}/{os.path.basename(m.filename)}"
                yield "page", text_page(url, f"{title}\n{author}\n\n{prose}\n", fetched)
    except (zipfile.BadZipFile, OSError):
        yield "failed", "bad_zip"


# -- Common Crawl WARC / WET -----------------------------------------------------

PREFILTER_BYTES = 8192  # where <html lang> and <title> are looked for
_HTML_LANG_JA = re.compile(rb"<html\b[^>]*?\blang\s*=\s*[\"']?ja(?![a-z])", re.I)
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title", re.I | re.S)
_KANA = re.compile("[\u3041-\u3096\u30a1-\u30fa]")  # hiragana and katakana letters, not ・ or ー


def looks_japanese_html(body: bytes) -> bool:
    """Fast prefilter: ``<html lang="ja...">`` near the top, or kana in the ``<title>``.

    The title's bytes are tried as UTF-8, cp932, EUC-JP and ISO-2022-JP; no
    full decode of the page. Pages that pass still go through
    :func:`crawlers.charset.decide` and the clean stage's Japanese ratios.
    """
    head = body[:PREFILTER_BYTES]
    if _HTML_LANG_JA.search(head):
        return True
    m = _TITLE.search(head)
    if not m or m.group(1).isascii() and b"\x1b$" not in m.group(1):
        return False
    for enc in ("utf-8", "cp932", "euc_jis_2004", "iso2022_jp_ext"):
        try:
            if _KANA.search(m.group(1).decode(enc)):
                return True
        except UnicodeDecodeError:
            continue
    return False


def kana_share(text: str) -> float:
    """Kana / non-space characters (0.0 for empty text)."""
    chars = sum(1 for c in text if not c.isspace())
    return len(_KANA.findall(text)) / chars if chars else 0.0


def _warc_response(record, default_time: datetime, max_bytes: int) -> Outcome:
    http = record.http_headers
    status = http.get_statuscode() if http is not None else ""
    if not status or not status.isdigit():
        return "failed", "no_http"
    if int(status) != 200:
        return "skipped", f"http_{status}"
    content_type = http.get_header("Content-Type") or ""
    mime = (content_type or record.rec_headers.get_header("WARC-Identified-Payload-Type") or "").split(";")[0].strip().lower()
    if mime not in HTML_TYPES:
        return "skipped", "not_html"
    try:
        body = record.content_stream().read(max_bytes + 1)
    except Exception:  # broken chunking or content encoding
        return "failed", "decode"
    if len(body) > max_bytes:
        return "failed", "size"
    if not looks_japanese_html(body):
        return "skipped", "not_japanese"
    if charset.looks_binary(body):
        return "failed", "decode"
    encoding, where = charset.decide(body, content_type)
    if where == "fallback":
        return "failed", "decode"
    url = record.rec_headers.get_header("WARC-Target-URI") or ""
    return "page", {
        "url": url,
        "final_url": url,
        "fetched_at": _parse_time(record.rec_headers.get_header("WARC-Date"), default_time),
        "http_status": 200,
        "content_type": content_type,
        "encoding": encoding,
        "encoding_source": where,
        "charset_declared": charset.declared(body, content_type),
        "depth": 0,
        "content_sha1": hashlib.sha1(body).hexdigest(),
        "body": body,
    }


def _wet_conversion(record, default_time: datetime, max_bytes: int, min_kana_share: float) -> Outcome:
    raw = record.content_stream().read(max_bytes + 1)
    if len(raw) > max_bytes:
        return "failed", "size"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "failed", "decode"
    text = _tidy(text.replace("\r\n", "\n"))
    if not text:
        return "failed", "empty"
    if kana_share(text) < min_kana_share:
        return "skipped", "not_japanese"
    url = record.rec_headers.get_header("WARC-Target-URI") or ""
    return "page", text_page(url, text + "\n", _parse_time(record.rec_headers.get_header("WARC-Date"), default_time))


class _CheckedArchiveIterator(ArchiveIterator):
    """warcio's iterator, noticing the truncation it passes over in silence.

    warcio ends the iteration quietly when a file stops in the middle of a
    record or of a gzip member. ``record_complete`` tells whether the record
    just read had all the bytes its Content-Length promised; ``complete``
    whether the file ended where a record (and gzip member) ended.
    """

    complete = True
    record_complete = True

    def read_to_end(self, record=None):
        done_before = self.member_info is not None
        result = super().read_to_end(record)
        raw = getattr(self.record, "raw_stream", None) if self.record is not None else None
        if not done_before and raw is not None and getattr(raw, "limit", 0) > 0:
            self.record_complete = self.complete = False
        return result

    def close(self):
        decompressor = self.reader.decompressor if self.reader is not None else None
        if decompressor is not None and not getattr(decompressor, "eof", True):
            self.complete = False
        super().close()


def read_warc(path: str, max_bytes: int = MAX_PAGE_BYTES, min_kana_share: float = MIN_KANA_SHARE) -> Iterator[Outcome]:
    """Pages of a WARC or WET file (gzipped or not): ``response`` and ``conversion`` records.

    Other record types (``request``, ``metadata``, ``warcinfo``, ``revisit``)
    are not pages and are not counted. A record cut short by the end of the
    file is ``failed: truncated`` and not stored; a file that cannot be read
    on ends with one ``failed: corrupt`` (or ``truncated``). The records
    before either are kept.
    """
    default_time = _mtime(path)
    with open(path, "rb") as f:
        it = _CheckedArchiveIterator(f)
        counted = False
        try:
            for record in it:
                if record.rec_type not in ("response", "conversion"):
                    continue
                try:
                    if record.rec_type == "response":
                        outcome = _warc_response(record, default_time, max_bytes)
                    else:
                        outcome = _wet_conversion(record, default_time, max_bytes, min_kana_share)
                except (ArchiveLoadFailed, EOFError, zlib.error):
                    raise
                except Exception as e:  # one odd record, never the file
                    log.debug("warc %s: record failed: %s", path, e)
                    outcome = ("failed", "record_error")
                it.read_to_end()  # so a record cut short is known before it is stored
                if not it.record_complete:
                    log.warning("warc %s: the file ends inside a record; keeping the records before it", path)
                    outcome, counted = ("failed", "truncated"), True
                yield outcome
        except Exception as e:  # warcio and zlib raise many kinds on damaged files
            log.warning("warc %s: unreadable from here on, keeping what was read: %s: %s", path, type(e).__name__, e)
            yield "failed", "corrupt"
            return
        if not it.complete and not counted:
            log.warning("warc %s: the file ends early; keeping what was read", path)
            yield "failed", "truncated"


# -- the import -------------------------------------------------------------------


def input_key(kind: str, paths: Iterable[str], genre: str, base_url: str | None) -> tuple[list[dict], str]:
    """What identifies an import: the inputs' names, sizes and mtimes; and its hash."""
    inputs = []
    for p in paths:
        st = os.stat(p)
        inputs.append({"name": os.path.basename(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return inputs, content_key("bulk", kind, inputs, genre, base_url)


def _records(kind: str, paths: list[str], base_url: str | None, max_bytes: int, min_kana_share: float) -> Iterator[Outcome]:
    for p in paths:
        log.info("import %s: reading %s", kind, p)
        if kind == "wikipedia":
            yield from read_wikipedia(p)
        elif kind == "aozora":
            yield from read_aozora(p, base_url, max_bytes)
        else:
            yield from read_warc(p, max_bytes, min_kana_share)


def import_bulk(
    storage: Storage,
    kind: str,
    paths: list[str],
    source_name: str,
    genre: str | None = None,
    run_id: str | None = None,
    batch_rows: int = 1000,
    *,
    base_url: str | None = None,
    max_bytes: int = MAX_PAGE_BYTES,
    min_kana_share: float = MIN_KANA_SHARE,
) -> dict:
    """Import dump/archive files as one published raw run of ``source_name``; returns its stats.

    Idempotent: the run id hashes the inputs (see :func:`input_key`), and a
    run that is already published is returned as it is (``cached: true``). A
    run left unpublished by a killed import is removed and done again. Bad
    records are counted under ``failed`` by reason, unwanted ones under
    ``skipped``; neither is fatal.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown bulk kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not paths:
        raise ValueError("no input files given")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"no such file: {', '.join(missing)}")
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", source_name):
        raise ValueError(f"source name {source_name!r} must match [a-z0-9][a-z0-9_-]* (as in the config)")
    genre = genre or DEFAULT_GENRE[kind]
    if genre not in get_args(Genre):
        raise ValueError(f"unknown genre {genre!r}; one of {', '.join(get_args(Genre))}")
    paths = sorted(paths, key=lambda p: (os.path.basename(p), p))
    inputs, key = input_key(kind, paths, genre, base_url)
    run_id = run_id or f"bulk-{kind}-{key}"
    run = state.run_dir(source_name, run_id)
    if storage.is_published(run):
        marker = storage.marker(run)
        log.info("import %s: these files are already imported as %s", source_name, storage.url(run))
        return {**marker.get("stats", {}), "cached": True}
    if storage.exists(run):
        log.info("import %s: removing the unfinished import %s and starting again", source_name, storage.url(run))
        storage.remove(run)

    stats: dict = {"kind": kind, "run_id": run_id, "partition": run, "records": 0, "stored": 0, "bytes": 0}
    skipped: Counter = Counter()
    failed: Counter = Counter()
    encodings: Counter = Counter()
    files: list[str] = []
    batch: list[dict] = []
    batch_bytes = 0
    last_log = time.monotonic()

    def flush() -> None:
        nonlocal batch, batch_bytes
        if batch:
            name = f"part-{len(files):05d}.parquet"
            storage.write_parquet(f"{run}/{name}", pa.Table.from_pylist(batch, schema=RAW_PAGE))
            files.append(name)
        batch, batch_bytes = [], 0

    for outcome, value in _records(kind, paths, base_url, max_bytes, min_kana_share):
        stats["records"] += 1
        if outcome == "page":
            page = {**value, "source": source_name, "genre": genre, "run_id": run_id}  # type: ignore[dict-item]
            batch.append(page)
            batch_bytes += len(page["body"])
            stats["stored"] += 1
            stats["bytes"] += len(page["body"])
            encodings[f"{page['encoding']} ({page['encoding_source']})"] += 1
            if len(batch) >= batch_rows or batch_bytes >= BATCH_BYTES:
                flush()
        elif outcome == "skipped":
            skipped[str(value)] += 1
        else:
            failed[str(value)] += 1
        if time.monotonic() - last_log >= PROGRESS_EVERY_S:
            last_log = time.monotonic()
            log.info(
                "import %s: %d records, %d stored, %d skipped, %d failed",
                source_name, stats["records"], stats["stored"], sum(skipped.values()), sum(failed.values()),
            )
    flush()
    stats["skipped"] = dict(sorted(skipped.items()))
    stats["failed"] = dict(sorted(failed.items()))
    stats["encodings"] = dict(sorted(encodings.items()))
    stats["parts"] = len(files)
    storage.publish(
        run,
        {
            "source": source_name,
            "genre": genre,
            "run_id": run_id,
            "bulk": kind,
            "inputs": inputs,
            "base_url": base_url,
            "files": files,
            "stats": stats,
        },
    )
    log.info("import %s: run %s published (%d pages in %d files)", source_name, run_id, stats["stored"], len(files))
    return {**stats, "cached": False}

