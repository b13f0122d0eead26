"""Per-source crawl state: what every URL looked like when last fetched.

Every crawl run writes a fetch log next to its pages, one row per URL it
tried (``raw/source=<s>/run=<r>/fetch-*.parquet``). The state is those logs
folded, latest fetch winning; a snapshot of it is kept at
``state/source=<s>/pages.parquet`` and names, in its Parquet metadata, the
runs it already folded. Reading the state is the snapshot plus the logs of
any run it has not folded yet, finished or not, so a crash between writing a
log and writing the snapshot loses nothing.
"""

from __future__ import annotations

import json
import os
import posixpath

import duckdb
import pyarrow as pa

from corpus.schema import TS
from corpus.storage import Storage

RAW = "raw"

# Outcomes: new, changed, unchanged (304 or same bytes), gone (404/410 of a
# known page), failed (``reason`` says why).
FETCH = pa.schema(
    [
        ("url", pa.string()),
        ("final_url", pa.string()),
        ("depth", pa.int32()),
        ("first_seen", TS),
        ("fetched_at", TS),
        ("status", pa.int32()),  # HTTP status; 0 when no response came
        ("outcome", pa.string()),
        ("reason", pa.string()),
        ("etag", pa.string()),
        ("last_modified", pa.string()),
        ("content_sha1", pa.string()),  # of the newest stored copy
        ("last_changed", TS),
        ("bytes", pa.int64()),
    ]
)

_RUNS_KEY = b"jagpt_runs"


def run_dir(source: str, run_id: str) -> str:
    return f"{RAW}/source={source}/run={run_id}"


def run_ids(storage: Storage, source: str) -> list[str]:
    """Every run of ``source`` that wrote anything, finished or not, oldest first."""
    dirs = {os.path.dirname(p) for p in storage.glob(f"{RAW}/source={source}/run=*/*.parquet")}
    return sorted(d.rsplit("run=", 1)[1] for d in dirs)


def run_files(storage: Storage, source: str, run_id: str, kind: str) -> list[str]:
    """The ``part`` (pages) or ``fetch`` (log) files of one run, in order."""
    d = run_dir(source, run_id)
    if not storage.exists(d):
        return []
    return [f"{d}/{n}" for n in sorted(storage.listdir(d)) if n.startswith(f"{kind}-") and n.endswith(".parquet")]


def state_path(source: str) -> str:
    return f"state/source={source}/pages.parquet"


def fold(tables: list[pa.Table]) -> pa.Table:
    """One row per URL: its latest fetch, with its earliest first_seen and latest change."""
    tables = [t.select(FETCH.names).cast(FETCH) for t in tables if t.num_rows]
    if not tables:
        return FETCH.empty_table()
    events = pa.concat_tables(tables)
    # Its own connection: crawls of several sources fold their state from threads at once,
    # and DuckDB's default connection refuses a second caller rather than waiting.
    with duckdb.connect() as con:
        con.register("events", events)
        folded = con.sql(
            """
            SELECT * REPLACE (
                min(first_seen) OVER w AS first_seen,
                max(last_changed) OVER w AS last_changed)
            FROM events
            WINDOW w AS (PARTITION BY url)
            QUALIFY row_number() OVER (PARTITION BY url ORDER BY fetched_at DESC) = 1
            ORDER BY url
            """
        ).to_arrow_table()
    return folded.select(FETCH.names).cast(FETCH)


def load(storage: Storage, source: str) -> tuple[pa.Table, list[str]]:
    """The state of ``source`` and the runs folded into it."""
    tables, folded_runs = [], []
    if storage.exists(state_path(source)):
        snapshot = storage.read_parquet([state_path(source)])
        meta = snapshot.schema.metadata or {}
        folded_runs = json.loads(meta.get(_RUNS_KEY, b"[]"))
        tables.append(snapshot)
    pending = [r for r in run_ids(storage, source) if r not in folded_runs]
    for run_id in pending:
        files = run_files(storage, source, run_id, "fetch")
        if files:
            tables.append(storage.read_parquet(files))
    return fold(tables), folded_runs + pending


def save(storage: Storage, source: str) -> int:
    """Fold every run of ``source`` into its snapshot; returns the number of URLs."""
    state, runs = load(storage, source)
    meta = dict(state.schema.metadata or {})
    meta[_RUNS_KEY] = json.dumps(runs).encode()
    storage.write_parquet(state_path(source), state.replace_schema_metadata(meta))
    return state.num_rows


def repair_run(storage: Storage, source: str, run_id: str) -> int:
    """Write the fetch log of any page file a killed run left without one.

    The pipeline writes ``part-N`` before ``fetch-N``; a kill in between leaves
    stored pages that no log row describes. Their rows are rebuilt from the
    pages (without validators, so the next run compares bytes instead).
    Returns the number of rows written.
    """
    logged = {posixpath.basename(f).split("-", 1)[1] for f in run_files(storage, source, run_id, "fetch")}
    orphans = [f for f in run_files(storage, source, run_id, "part") if posixpath.basename(f).split("-", 1)[1] not in logged]
    if not orphans:
        return 0
    before, _ = load(storage, source)
    known = dict(zip(before["url"].to_pylist(), before["content_sha1"].to_pylist()))
    written = 0
    for f in orphans:
        pages = storage.read_parquet([f]).to_pylist()
        rows = [
            {
                "url": p["url"],
                "final_url": p["final_url"],
                "depth": p["depth"],
                "first_seen": p["fetched_at"],
                "fetched_at": p["fetched_at"],
                "status": p["http_status"],
                "outcome": "changed" if known.get(p["url"]) else "new",
                "reason": "",
                "etag": None,
                "last_modified": None,
                "content_sha1": p["content_sha1"],
                "last_changed": p["fetched_at"],
                "bytes": len(p["body"]),
            }
            for p in pages
        ]
        storage.write_parquet(f.replace("/part-", "/fetch-"), pa.Table.from_pylist(rows, schema=FETCH))
        written += len(rows)
    return written
