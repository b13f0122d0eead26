"""The crawl stage: run each source's spider in a subprocess and publish its pages.

Each run of a source that found new or changed pages becomes one raw partition,
``raw/source=<name>/run=<run_id>/part-*.parquet``, published with a marker.
Pages whose bytes equal the last stored copy are counted, not stored again, so
recrawling an unchanged site adds no rows.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from urllib.parse import urlsplit

from corpus.storage import MARKER, Storage
from crawlers.config import CrawlSettings, Source
from crawlers.sample import serve_sample_site

log = logging.getLogger(__name__)

RAW = "raw"


@dataclass
class CrawlResult:
    source: str
    run_id: str
    partition: str | None  # relative path, None when nothing new was stored
    stats: dict


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def raw_partitions(storage: Storage, source: str | None = None) -> list[str]:
    """Published raw partitions (relative paths), oldest run first."""
    pattern = f"{RAW}/source={source or '*'}/run=*/{MARKER}"
    return sorted(os.path.dirname(p) for p in storage.glob(pattern))


def partition_files(storage: Storage, partition: str) -> list[str]:
    return [f"{partition}/{n}" for n in storage.listdir(partition) if n.endswith(".parquet")]


def last_seen(storage: Storage, source: str) -> dict[str, str]:
    """URL -> content sha1 of the newest stored copy of each page of ``source``."""
    seen: dict[str, str] = {}
    for part in raw_partitions(storage, source):
        files = partition_files(storage, part)
        if not files:
            continue
        t = storage.read_parquet(files, columns=["url", "content_sha1", "fetched_at"])
        t = t.sort_by([("fetched_at", "ascending")])
        for url, sha in zip(t["url"].to_pylist(), t["content_sha1"].to_pylist()):
            seen[url] = sha
    return seen


def summarize(stats: dict) -> dict:
    """The per-source crawl figures people look at, from Scrapy's stats."""
    failed: dict[str, int] = {}
    for key, value in stats.items():
        if key.startswith("jagpt/failed/"):
            failed[key.removeprefix("jagpt/failed/")] = int(value)
        elif key.startswith("downloader/response_status_count/"):
            code = int(key.rsplit("/", 1)[1])
            if code >= 400:
                failed[f"http_{code}"] = int(value)
        elif key.startswith("downloader/exception_type_count/"):
            name = key.rsplit(".", 1)[-1]
            if name == "IgnoreRequest":
                continue  # robots and refused addresses are counted by name already
            kind = "timeout" if "Timeout" in name else name
            failed[kind] = failed.get(kind, 0) + int(value)
    if stats.get("robotstxt/forbidden"):
        failed["robots"] = int(stats["robotstxt/forbidden"])
    return {
        "fetched": int(stats.get("response_received_count", 0)),
        "new": int(stats.get("jagpt/pages/new", 0)),
        "changed": int(stats.get("jagpt/pages/changed", 0)),
        "unchanged": int(stats.get("jagpt/pages/unchanged", 0)),
        "bytes": int(stats.get("downloader/response_bytes", 0)),
        "failed": dict(sorted(failed.items())),
        "encodings": {
            k.removeprefix("jagpt/encoding/"): int(v) for k, v in stats.items() if k.startswith("jagpt/encoding/")
        },
        "finish_reason": stats.get("finish_reason", "unknown"),
    }


def crawl_source(storage: Storage, source: Source, settings: CrawlSettings, run_id: str | None = None) -> CrawlResult:
    """Crawl one source in a subprocess and publish its new pages as a raw partition."""
    run_id = run_id or new_run_id()
    with ExitStack() as stack:
        if source.serve_sample_site:
            first = urlsplit(source.start_urls[0])
            stack.enter_context(serve_sample_site(first.hostname or "127.0.0.1", first.port or 80))
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"jagpt-crawl-{source.name}-"))
        out_dir = os.path.join(work, "out")
        os.makedirs(out_dir)
        job = {
            "source": source.model_dump(),
            "crawl": settings.model_dump(),
            "run_id": run_id,
            "out_dir": out_dir,
            "seen_file": os.path.join(work, "seen.json"),
            "stats_file": os.path.join(work, "stats.json"),
        }
        with open(job["seen_file"], "w", encoding="utf-8") as f:
            json.dump(last_seen(storage, source.name), f)
        job_file = os.path.join(work, "job.json")
        with open(job_file, "w", encoding="utf-8") as f:
            json.dump(job, f)

        proc = subprocess.Popen(
            [sys.executable, "-m", "crawlers.worker", job_file],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line.startswith("[crawl "):
                log.info("%s", line)
            else:
                tail = (tail + [line])[-40:]
        if proc.wait() != 0 or not os.path.exists(job["stats_file"]):
            raise RuntimeError(f"crawl of {source.name!r} failed (exit {proc.returncode}):\n" + "\n".join(tail))
        with open(job["stats_file"], encoding="utf-8") as f:
            raw_stats = json.load(f)
        stats = summarize(raw_stats)
        log.debug("scrapy stats for %s: %s", source.name, raw_stats)

        parts = sorted(n for n in os.listdir(out_dir) if n.endswith(".parquet"))
        if not parts:
            log.info("crawl %s: nothing new or changed; no raw partition written", source.name)
            return CrawlResult(source.name, run_id, None, stats)
        partition = f"{RAW}/source={source.name}/run={run_id}"
        storage.put_dir(out_dir, partition)
        storage.publish(partition, {"source": source.name, "run_id": run_id, "files": parts, "stats": stats})
        return CrawlResult(source.name, run_id, partition, stats)
