"""The checkpoint registry: one immutable JSON record per registered checkpoint.

Records live at ``registry/checkpoints/<run_id>-<step>.json``. A record is never
rewritten: registering the same checkpoint twice is a no-op, and two writers
registering different checkpoints never touch the same file.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from corpus.storage import Storage

REGISTRY = "registry/checkpoints"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def register(storage: Storage, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Store ``record`` (needs run_id and step); returns (record, created)."""
    rel = f"{REGISTRY}/{record['run_id']}-{record['step']}.json"
    if storage.exists(rel):
        return storage.read_json(rel), False
    full = {"git_commit": git_commit(), "registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    storage.write_json(rel, full)
    return full, True


def records(storage: Storage) -> list[dict[str, Any]]:
    """Every record, oldest first."""
    out = [storage.read_json(f"{REGISTRY}/{name}") for name in storage.listdir(REGISTRY) if name.endswith(".json")]
    return sorted(out, key=lambda r: (r.get("registered_at", ""), r["run_id"], r["step"]))


def newest(storage: Storage) -> dict[str, Any]:
    found = records(storage)
    if not found:
        raise LookupError(f"no registered checkpoint under {storage.url(REGISTRY)}; run `jagpt pipeline` first")
    return found[-1]


def find(storage: Storage, ref: str) -> dict[str, Any]:
    """A record by ``<run_id>-<step>`` or by run id (its latest step)."""
    matches = [r for r in records(storage) if f"{r['run_id']}-{r['step']}" == ref or r["run_id"] == ref]
    if not matches:
        raise LookupError(f"no registered checkpoint {ref!r}; `jagpt checkpoints` lists them")
    return matches[-1]
