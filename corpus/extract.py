"""The extract stage: raw HTML pages -> main text, with trafilatura set for Japanese.

Runs per raw partition, in a process pool, so it uses every core and can be
rerun without crawling again. A page with no main text, or one that trafilatura
chokes on, is dropped with its reason, never fatal.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache

import pyarrow as pa
from pydantic import Field

from corpus.schema import DROPPED, EXTRACTED
from corpus.settings import Settings
from corpus.storage import Storage

log = logging.getLogger(__name__)

_HTML_LANG = re.compile(r"<html[^>]*?\blang\s*=\s*[\"']?([A-Za-z]{2,3}(?:-[A-Za-z0-9]+)*)", re.I)


class ExtractSettings(Settings):
    # trafilatura counts characters, and 250 Japanese characters are a lot of
    # text (about 600 English ones), so the defaults are lowered for Japanese.
    min_extracted_chars: int = Field(default=100, ge=0)
    min_output_chars: int = Field(default=50, ge=0)
    include_tables: bool = True
    workers: int = Field(default=0, ge=0, description="processes; 0 means one per core")
    pool_min_pages: int = Field(default=64, ge=1, description="below this, extract in-process")


@lru_cache(maxsize=4)
def _trafilatura_config(min_extracted: int, min_output: int):
    from trafilatura.settings import use_config

    cfg = use_config()
    cfg.set("DEFAULT", "MIN_EXTRACTED_SIZE", str(min_extracted))
    cfg.set("DEFAULT", "MIN_OUTPUT_SIZE", str(min_output))
    cfg.set("DEFAULT", "EXTRACTION_TIMEOUT", "0")
    return cfg


def extract_html(html: str, url: str, settings: ExtractSettings) -> dict | None:
    """Main text and metadata of one page, or None if it has no main text."""
    import trafilatura

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
        "published": doc.date or "",
        "lang": m.group(1).lower() if m else "",
        "text": doc.text,
    }


def _extract_row(args: tuple[dict, dict]) -> tuple[str, dict | str]:
    row, settings_dict = args
    settings = ExtractSettings(**settings_dict)
    try:
        html = row["body"].decode(row["encoding"])
    except (UnicodeDecodeError, LookupError) as e:
        return "dropped", f"decode_error: {e}"
    try:
        result = extract_html(html, row["url"], settings)
    except Exception as e:  # trafilatura and lxml raise many kinds on hostile HTML
        return "dropped", f"extract_error: {type(e).__name__}: {e}"
    if result is None:
        return "dropped", "no_text"
    return "kept", result


def extract_partition(storage: Storage, files: list[str], settings: ExtractSettings, out: str) -> dict:
    """Extract every page of one raw partition into ``out``; returns counts."""
    raw = storage.read_parquet(files)
    rows = raw.to_pylist()
    jobs = [(r, settings.model_dump()) for r in rows]
    workers = settings.workers or os.cpu_count() or 1
    if len(rows) >= settings.pool_min_pages and workers > 1:
        # spawn, not fork: the parent may hold JAX or Prefect threads.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            results = list(pool.map(_extract_row, jobs, chunksize=16))
    else:
        results = [_extract_row(j) for j in jobs]

    kept, dropped = [], []
    for row, (status, value) in zip(rows, results):
        base = {k: row[k] for k in ("url", "source", "genre", "fetched_at")}
        if status == "kept":
            kept.append({**base, "content_sha1": row["content_sha1"], **value})
        else:
            reason = value.split(":", 1)[0]
            dropped.append(
                {**base, "stage": "extract", "reasons": [reason], "detail": value, "doc_id": None, "n_chars": 0}
            )
    storage.write_parquet(f"{out}/extracted.parquet", pa.Table.from_pylist(kept, schema=EXTRACTED))
    storage.write_parquet(f"{out}/dropped.parquet", pa.Table.from_pylist(dropped, schema=DROPPED))
    reasons: dict[str, int] = {}
    for d in dropped:
        reasons[d["reasons"][0]] = reasons.get(d["reasons"][0], 0) + 1
    return {"pages": len(rows), "extracted": len(kept), "dropped": reasons}
