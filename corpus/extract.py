"""The extract stage: raw HTML pages -> main text, with trafilatura set for Japanese.

Plain-text pages (``text/plain``, written by the bulk readers in ``crawlers.bulk``)
are passed through as they are, without trafilatura.

Runs per raw partition, in worker processes (:func:`corpus.pool.robust_map`), so
it uses every core and can be rerun without crawling again. A page with no main
text, one that trafilatura raises on, one that runs longer than
``page_timeout_s``, and one that crashes its worker process are each dropped
with their reason, never fatal.

Batches smaller than ``pool_min_pages`` are extracted in this process, which
saves starting the workers but has no such guard: there, a page that hangs
hangs the stage, and one that crashes the interpreter ends it. Exceptions are
still caught per page.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from functools import lru_cache, partial

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from corpus.pool import CRASH, OK, TIMEOUT, describe, robust_map
from corpus.schema import DROPPED, EXTRACTED
from corpus.settings import Settings
from corpus.storage import Storage

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 5.0  # at most one progress log line this often
CHUNK_PAGES = 16  # pages sent to a worker at a time

_HTML_LANG = re.compile(r"<html[^>]*?\blang\s*=\s*[\"']?([A-Za-z]{2,3}(?:-[A-Za-z0-9]+)*)", re.I)


class ExtractSettings(Settings):
    # trafilatura counts characters, and 250 Japanese characters are a lot of
    # text (about 600 English ones), so the defaults are lowered for Japanese.
    min_extracted_chars: int = Field(default=100, ge=0)
    min_output_chars: int = Field(default=50, ge=0)
    include_tables: bool = True
    workers: int = Field(default=0, ge=0, description="processes; 0 means one per core")
    pool_min_pages: int = Field(default=64, ge=1, description="below this, extract in-process")
    batch_pages: int = Field(default=5000, gt=0, description="pages read and extracted at a time (bounds memory)")
    # In the step key: it decides which pages are dropped as extract_timeout.
    page_timeout_s: float = Field(default=30.0, gt=0, description="a page still running after this is dropped")


@lru_cache(maxsize=4)
def _trafilatura_config(min_extracted: int, min_output: int):
    from trafilatura.settings import use_config

    cfg = use_config()
    cfg.set("DEFAULT", "MIN_EXTRACTED_SIZE", str(min_extracted))
    cfg.set("DEFAULT", "MIN_OUTPUT_SIZE", str(min_output))
    cfg.set("DEFAULT", "EXTRACTION_TIMEOUT", "0")
    # htmldate's extensive search runs dateparser over ~200 locales (80% of the
    # extraction time) and still reads 2026年1月18日 as 2026-01-01; its fast
    # paths (meta tags, <time>, ISO dates) stay on, and japanese_date() does the rest.
    cfg.set("DEFAULT", "EXTENSIVE_DATE_SEARCH", "off")
    return cfg


_JA_DATE = re.compile(
    r"(?:(?P<era>令和|平成|昭和)\s*(?P<era_year>元|\d{1,2})|(?P<year>(?:19|20)\d{2}))\s*年\s*(?P<month>\d{1,2})\s*月\s*(?P<day>\d{1,2})\s*日"
    r"|(?P<y>(?:19|20)\d{2})[/.](?P<m>\d{1,2})[/.](?P<d>\d{1,2})(?!\d)"
)
_ERA_START = {"令和": 2018, "平成": 1988, "昭和": 1925}  # year 1 of the era is start + 1
_BODY = re.compile(r"<body[^>]*>", re.I)


def japanese_date(html: str) -> str | None:
    """The first full date in the page body (2026年1月18日, 令和8年1月18日, 2026/1/18), as YYYY-MM-DD."""
    start = _BODY.search(html)
    for m in _JA_DATE.finditer(html, start.end() if start else 0):
        if m["era"]:
            year = _ERA_START[m["era"]] + (1 if m["era_year"] == "元" else int(m["era_year"]))
            month, day = int(m["month"]), int(m["day"])
        elif m["year"]:
            year, month, day = int(m["year"]), int(m["month"]), int(m["day"])
        else:
            year, month, day = int(m["y"]), int(m["m"]), int(m["d"])
        if 1 <= month <= 12 and 1 <= day <= 31:
            return f"{year:04d}-{month:02d}-{day:02d}"
    return None


def extract_html(html: str, url: str, settings: ExtractSettings) -> dict | None:
    """Main text and metadata of one page, or None if it has no main text."""
    import trafilatura
    from trafilatura.deduplication import LRU_TEST

    # deduplicate=True remembers text segments in a process-wide cache; cleared
    # per page, it drops repeats within the page, and the result no longer
    # depends on which pages the same worker process saw before.
    LRU_TEST.clear()
    doc = trafilatura.bare_extraction(
        html,
        url=url,
        with_metadata=True,
        include_comments=False,
        include_tables=settings.include_tables,
        deduplicate=True,
        config=_trafilatura_config(settings.min_extracted_chars, settings.min_output_chars),
    )
    if doc is None or not (doc.text or "").strip():
        return None
    m = _HTML_LANG.search(html[:4096])
    return {
        "title": doc.title or "",
        "published": doc.date or japanese_date(html) or "",
        "lang": m.group(1).lower() if m else "",
        "text": doc.text,
    }


def extract_plain(text: str) -> dict | None:
    """A ``text/plain`` page (stored by ``crawlers.bulk``): already prose, kept as it is.

    Its first line is the title. Bulk text sources are Japanese by construction.
    """
    text = text.strip()
    if not text:
        return None
    return {"title": text.split("\n", 1)[0].strip(), "published": "", "lang": "ja", "text": text}


def _extract_row(settings: ExtractSettings, row: dict) -> tuple[str, dict | str]:
    """("kept", extracted fields) or ("dropped", "reason: detail") for one raw row."""
    try:
        html = row["body"].decode(row["encoding"])
    except (UnicodeDecodeError, LookupError) as e:
        return "dropped", f"decode_error: {e}"
    try:
        if (row.get("content_type") or "").lower().startswith("text/plain"):
            result = extract_plain(html)
        else:
            result = extract_html(html, row["url"], settings)
    except Exception as e:  # trafilatura and lxml raise many kinds on hostile HTML
        return "dropped", f"extract_error: {describe(e)}"
    if result is None:
        return "dropped", "no_text"
    return "kept", result


def _import_trafilatura() -> None:
    """Worker initializer: the import takes a while and must not count against a page's timeout."""
    import trafilatura  # noqa: F401


def _outcomes(rows: list[dict], settings: ExtractSettings) -> Iterator[tuple[str, dict | str]]:
    """("kept" | "dropped", value) per row, in order, from the pool or in-process."""
    extract = partial(_extract_row, settings)
    if len(rows) < settings.pool_min_pages:
        yield from map(extract, rows)
        return
    workers = settings.workers or os.cpu_count() or 1
    timeout = settings.page_timeout_s
    for row, (status, value) in zip(
        rows, robust_map(extract, rows, workers, timeout, CHUNK_PAGES, initializer=_import_trafilatura)
    ):
        if status == OK:
            yield value
        elif status == TIMEOUT:
            log.warning("extract: %s ran longer than %ss; dropped", row["url"], timeout)
            yield "dropped", f"extract_timeout: no result after {timeout}s"
        elif status == CRASH:
            log.warning("extract: %s crashed its worker (exit code %s); dropped", row["url"], value)
            yield "dropped", f"extract_crash: the worker process died (exit code {value})"
        else:  # the worker could not run it or send its result back
            yield "dropped", f"extract_error: {value}"


def extract_partition(
    storage: Storage, files: list[str], settings: ExtractSettings, out: str, name: str | None = None
) -> dict:
    """Extract every page of one raw partition into ``out``; returns counts.

    Streams ``batch_pages`` pages at a time (each batch gets its own worker
    pool), so memory stays bounded whatever the partition's size; both
    output files are written as they go and appear whole at the end.
    ``name`` labels the progress log lines (default: the folder of the first file).
    """
    name = name or (posixpath.dirname(files[0]) if files else out)
    total = sum(storage.parquet_rows(f) for f in files)
    done = extracted = 0
    reasons: dict[str, int] = {}
    last_log = time.monotonic()
    with ExitStack() as stack:
        kept_out = pq.ParquetWriter(stack.enter_context(storage.open_atomic(f"{out}/extracted.parquet")), EXTRACTED, compression="zstd")
        stack.callback(kept_out.close)
        dropped_out = pq.ParquetWriter(stack.enter_context(storage.open_atomic(f"{out}/dropped.parquet")), DROPPED, compression="zstd")
        stack.callback(dropped_out.close)
        for batch in storage.iter_parquet(files, batch_size=settings.batch_pages):
            rows = batch.to_pylist()
            kept, dropped = [], []
            for row, (status, value) in zip(rows, _outcomes(rows, settings)):
                done += 1
                if time.monotonic() - last_log >= PROGRESS_EVERY_S:
                    log.info("extract %s: %d/%d pages", name, done, total)
                    last_log = time.monotonic()
                base = {k: row[k] for k in ("url", "source", "genre", "fetched_at")}
                if status == "kept":
                    kept.append({**base, "content_sha1": row["content_sha1"], **value})
                else:
                    reason = value.split(":", 1)[0]
                    reasons[reason] = reasons.get(reason, 0) + 1
                    dropped.append(
                        {**base, "stage": "extract", "reasons": [reason], "detail": value, "doc_id": None, "n_chars": 0}
                    )
            extracted += len(kept)
            kept_out.write_table(pa.Table.from_pylist(kept, schema=EXTRACTED))
            dropped_out.write_table(pa.Table.from_pylist(dropped, schema=DROPPED))
    return {"pages": done, "extracted": extracted, "dropped": reasons}
