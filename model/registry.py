"""The checkpoint registry: one immutable JSON record per registered checkpoint.

Records live at ``registry/checkpoints/<run_id>-<step>.json``, one file each, so
two writers registering different checkpoints never touch the same file. A
record is never rewritten: it is created only if absent (locally a hard link
of a finished temporary file, which fails if the name exists; on ``gs://`` an
upload with the precondition ``ifGenerationMatch=0``), so registering the same
checkpoint twice, even from two processes at once, keeps the first record.

``registered_at`` is UTC with microseconds (``2025-01-02T03:04:05.678901Z``),
strictly increasing within a process, so "newest" does not hang on
second-resolution clocks; records registered in the same microsecond by
different processes are ordered by ``run_id`` then ``step``.

The record files are queried with DuckDB (``read_json_objects`` over the
folder, through fsspec for a ``gs://`` root): :func:`records`, :func:`best`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
from datetime import UTC, datetime
from typing import Any

from corpus.storage import Storage

REGISTRY = "registry/checkpoints"

_clock_lock = threading.Lock()
_last_us = 0


def registration_time() -> str:
    """Now in UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``; strictly increasing within this process."""
    global _last_us
    with _clock_lock:
        now = max(time.time_ns() // 1000, _last_us + 1)
        _last_us = now
    seconds, micros = divmod(now, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{micros:06d}Z"


def git_commit() -> str:
    """The code's commit: ``$JAGPT_GIT_COMMIT`` (set in images built without .git), else ``git rev-parse HEAD``."""
    if os.environ.get("JAGPT_GIT_COMMIT"):
        return os.environ["JAGPT_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def bits_per_char(val_loss: float | None, val_tokens: int | None, val_chars: int | None) -> float | None:
    """Validation bits per character from a loss in nats per token and the val split's tokens and characters."""
    if val_loss is None or not val_tokens or not val_chars or not math.isfinite(val_loss):
        return None
    return round(val_loss / math.log(2) * val_tokens / val_chars, 6)


def record_name(run_id: str, step: int) -> str:
    return f"{REGISTRY}/{run_id}-{step}.json"


def register(storage: Storage, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Store ``record`` (needs run_id and step); returns (record, created).

    A checkpoint already registered keeps its record, which is returned with ``created`` False.
    Inside a Prefect flow or task run, a new record is also published as the table artifact
    ``registered-checkpoint``.
    """
    rel = record_name(record["run_id"], record["step"])
    if storage.exists(rel):
        return storage.read_json(rel), False
    full = {"git_commit": git_commit(), **record, "registered_at": registration_time()}
    data = (json.dumps(full, ensure_ascii=False, indent=2, default=str) + "\n").encode("utf-8")
    if not storage.create(rel, data):
        return storage.read_json(rel), False
    prefect_artifact(storage, full)
    return full, True


def prefect_artifact(storage: Storage, record: dict[str, Any]) -> bool:
    """Publish ``record`` as a Prefect table artifact when inside a flow or task run; False elsewhere."""
    try:
        from prefect.artifacts import create_table_artifact
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return False
    if not (FlowRunContext.get() or TaskRunContext.get()):
        return False
    rows = [{"field": k, "value": v if isinstance(v, str | int | float | type(None)) else json.dumps(v)}
            for k, v in record.items()]
    rows.append({"field": "record", "value": storage.url(record_name(record["run_id"], record["step"]))})
    create_table_artifact(rows, key="registered-checkpoint",
                          description=f"jagpt checkpoint registered: {record['run_id']}-{record['step']}")
    return True


# -- queries (DuckDB over the record files) ----------------------------------------------------

# Records of older versions have second-resolution times (...:05Z); as ...:05.000000Z they sort
# among the newer ones by time.
_ORDER = """
    CASE WHEN length(json ->> 'registered_at') = 20
         THEN replace(json ->> 'registered_at', 'Z', '.000000Z') ELSE json ->> 'registered_at' END,
    json ->> 'run_id', TRY_CAST(json ->> 'step' AS BIGINT)"""


def _query(storage: Storage, where: str = "TRUE", order: str = _ORDER) -> list[dict[str, Any]]:
    import duckdb

    if not any(name.endswith(".json") for name in storage.listdir(REGISTRY)):
        return []
    con = duckdb.connect()
    try:
        storage.register_duckdb(con)
        glob = storage.duckdb_url(f"{REGISTRY}/*.json")
        rows = con.execute(
            f"SELECT json FROM read_json_objects(?, format = 'auto') WHERE {where} ORDER BY {order}", [glob]
        ).fetchall()
    finally:
        con.close()
    return [json.loads(r[0]) for r in rows]


def records(storage: Storage) -> list[dict[str, Any]]:
    """Every record, oldest first (by ``registered_at``, then run id and step)."""
    return _query(storage)


def newest(storage: Storage) -> dict[str, Any]:
    found = records(storage)
    if not found:
        raise LookupError(f"no registered checkpoint under {storage.url(REGISTRY)}; run `jagpt pipeline` first")
    return found[-1]


def best(storage: Storage) -> tuple[dict[str, Any] | None, int]:
    """(the record with the lowest ``bits_per_char``, how many records were left out for having none).

    Ties go to the earlier registration. (None, n) when no record has the figure.
    """
    has = "TRY_CAST(json ->> 'bits_per_char' AS DOUBLE) IS NOT NULL"
    ranked = _query(storage, has, f"TRY_CAST(json ->> 'bits_per_char' AS DOUBLE), {_ORDER}")
    without = _query(storage, f"NOT ({has})")
    return (ranked[0] if ranked else None), len(without)


def find(storage: Storage, ref: str) -> dict[str, Any]:
    """A record by ``<run_id>-<step>`` or by run id (its latest step)."""
    matches = [r for r in records(storage) if f"{r['run_id']}-{r['step']}" == ref or r["run_id"] == ref]
    if not matches:
        raise LookupError(f"no registered checkpoint {ref!r}; `jagpt checkpoints` lists them")
    # A run's latest step is its highest, whenever it was registered.
    return max(matches, key=lambda r: (f"{r['run_id']}-{r['step']}" == ref, r["step"]))
