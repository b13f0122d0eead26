"""The crawl stage: run each source's spider in a subprocess and publish its run.

A run of a source lives in ``raw/source=<name>/run=<run_id>/``: ``part-*.parquet``
holds the new and changed pages, ``fetch-*.parquet`` one row per URL tried. The
worker writes both in batches, each file atomically; the run is published
(``_SUCCESS.json``) only once the worker exits cleanly, and the source's state
snapshot is then refreshed. A run that was killed has files but no marker: the
next crawl of the source resumes it under the same run id, without refetching
what it stored, and publishes it whole.
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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from urllib.parse import urlsplit

from corpus.storage import MARKER, Storage
from crawlers import state
from crawlers.config import CrawlSettings, Source
from crawlers.sample import serve_sample_site

log = logging.getLogger(__name__)

RAW = state.RAW


@dataclass
class CrawlResult:
    source: str
    run_id: str
    partition: str | None  # relative path of the run, None when it stored no page
    stats: dict
    resumed: bool = False


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def raw_partitions(storage: Storage, source: str | None = None) -> list[str]:
    """Published runs that stored pages (relative paths), oldest run first."""
    pattern = f"{RAW}/source={source or '*'}/run=*/{MARKER}"
    runs = sorted(os.path.dirname(p) for p in storage.glob(pattern))
    return [r for r in runs if storage.marker(r).get("files")]


def partition_files(storage: Storage, partition: str) -> list[str]:
    return [f"{partition}/{n}" for n in sorted(storage.listdir(partition)) if n.startswith("part-") and n.endswith(".parquet")]


def unfinished_run(storage: Storage, source: str) -> str | None:
    """The newest run of ``source`` that was killed before it was published."""
    pending = [r for r in state.run_ids(storage, source) if not storage.is_published(state.run_dir(source, r))]
    return pending[-1] if pending else None


def run_summary(storage: Storage, source: str, run_id: str) -> dict:
    """The run's figures, from what it stored (so a resumed run counts both attempts)."""
    outcomes: Counter = Counter()
    failed: Counter = Counter()
    fetched = bytes_ = 0
    for f in state.run_files(storage, source, run_id, "fetch"):
        t = storage.read_parquet([f], columns=["outcome", "reason", "status", "bytes"])
        for outcome, reason, status, size in zip(*(t[c].to_pylist() for c in ("outcome", "reason", "status", "bytes"))):
            outcomes[outcome] += 1
            if outcome == "failed":
                failed[reason] += 1
            fetched += status > 0
            bytes_ += size or 0
    encodings: Counter = Counter()
    for f in state.run_files(storage, source, run_id, "part"):
        t = storage.read_parquet([f], columns=["encoding", "encoding_source"])
        encodings.update(f"{e} ({w})" for e, w in zip(t["encoding"].to_pylist(), t["encoding_source"].to_pylist()))
    return {
        "fetched": fetched,
        "new": outcomes["new"],
        "changed": outcomes["changed"],
        "unchanged": outcomes["unchanged"],
        "gone": outcomes["gone"],
        "failed": dict(sorted(failed.items())),
        "bytes": bytes_,
        "encodings": dict(sorted(encodings.items())),
    }


def crawl_source(storage: Storage, source: Source, settings: CrawlSettings, run_id: str | None = None) -> CrawlResult:
    """Crawl one source in a subprocess (resuming its killed run, if any) and publish the run."""
    resumed_id = unfinished_run(storage, source.name)
    run_id = run_id or resumed_id or new_run_id()
    if resumed_id == run_id:
        repaired = state.repair_run(storage, source.name, run_id)
        log.info("crawl %s: resuming run %s, which was interrupted (%d log rows rebuilt)", source.name, run_id, repaired)
    run = state.run_dir(source.name, run_id)
    existing = [n for n in (storage.listdir(run) if storage.exists(run) else []) if n.endswith(".parquet")]
    first_part = 1 + max((int(n.split("-")[1].split(".")[0]) for n in existing), default=-1)
    with ExitStack() as stack:
        if source.serve_sample_site:
            first = urlsplit(source.start_urls[0])
            stack.enter_context(serve_sample_site(first.hostname or "127.0.0.1", first.port or 80))
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"jagpt-crawl-{source.name}-"))
        job = {
            "source": source.model_dump(),
            "crawl": settings.model_dump(),
            "run_id": run_id,
            "storage": {"root": os.path.abspath(storage.root) if storage.is_local else storage.root, "options": storage.options},
            "first_part": first_part,
            "stats_file": os.path.join(work, "stats.json"),
        }
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
            raise RuntimeError(
                f"crawl of {source.name!r} failed (exit {proc.returncode}); what it stored stays in "
                f"{storage.url(run)} and the next crawl resumes it:\n" + "\n".join(tail)
            )
        with open(job["stats_file"], encoding="utf-8") as f:
            scrapy_stats = json.load(f)
    log.debug("scrapy stats for %s: %s", source.name, scrapy_stats)

    stats = run_summary(storage, source.name, run_id)
    stats["finish_reason"] = scrapy_stats.get("finish_reason", "unknown")
    stats["skipped"] = {k.removeprefix("jagpt/skipped/"): v for k, v in scrapy_stats.items() if k.startswith("jagpt/skipped/")}
    if resumed_id == run_id:
        stats["resumed"] = True
    pages = [n for n in storage.listdir(run) if n.startswith("part-")] if storage.exists(run) else []
    storage.publish(run, {"source": source.name, "genre": source.genre, "run_id": run_id, "files": sorted(pages), "stats": stats})
    urls = state.save(storage, source.name)
    log.info("crawl %s: run %s published; state knows %d URLs", source.name, run_id, urls)
    return CrawlResult(source.name, run_id, run if pages else None, stats, resumed=resumed_id == run_id)


def domain_groups(sources: list[Source]) -> list[list[Source]]:
    """Sources that share a domain, together; each group runs one source at a time."""
    groups: list[tuple[set[str], list[Source]]] = []
    for source in sources:
        domains = set(source.domains())
        touching = [g for g in groups if g[0] & domains]
        merged = (domains.union(*(g[0] for g in touching)), [s for g in touching for s in g[1]] + [source])
        groups = [g for g in groups if not any(g is t for t in touching)] + [merged]
    return [g[1] for g in groups]


def crawl_sources(storage: Storage, sources: list[Source], settings: CrawlSettings) -> list[CrawlResult]:
    """Crawl several sources at once, ``settings.parallel_sources`` at a time.

    A failing source does not stop the others: their runs are published, then
    the failures are raised together.
    """
    results: dict[str, CrawlResult] = {}
    errors: dict[str, str] = {}

    def run_group(group: list[Source]) -> None:
        for source in group:
            try:
                results[source.name] = crawl_source(storage, source, settings)
            except Exception as e:  # reported below, after the other sources finished
                log.error("crawl %s failed: %s", source.name, e)
                errors[source.name] = str(e)

    with ThreadPoolExecutor(max_workers=settings.parallel_sources, thread_name_prefix="crawl") as pool:
        list(pool.map(run_group, domain_groups(sources)))
    if errors:
        raise RuntimeError("crawl failed for " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    return [results[s.name] for s in sources]
