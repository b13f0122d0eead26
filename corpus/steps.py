"""Steps whose outputs are addressed by their inputs.

A step's output folder is ``<stage>/<key>``, where ``key`` hashes the stage name,
its code version, the ids of its inputs and its settings. The folder counts as
done only once its ``_SUCCESS.json`` marker exists, and the marker carries the
step's stats. So:

* a rerun with the same inputs and settings finds the marker and does nothing;
* a changed setting gives a new key, and only the stages downstream of it rerun;
* a crash mid-step leaves a folder without a marker, which is cleared and redone;
* ``force=True`` redoes a step even though it finished (``jagpt reextract``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corpus.storage import MARKER, Storage

log = logging.getLogger(__name__)


def content_key(*parts: Any, length: int = 16) -> str:
    """A short stable hash of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]


@dataclass
class StepResult:
    stage: str
    key: str
    path: str  # relative to the storage root
    stats: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.key}"


def run_step(
    storage: Storage,
    stage: str,
    version: int,
    inputs: dict[str, Any],
    settings: dict[str, Any],
    fn: Callable[[str], dict[str, Any]],
    key_prefix: str = "",
    force: bool = False,
    resumable: bool = False,
) -> StepResult:
    """Run ``fn(out_path)`` unless an identical step already finished.

    ``fn`` writes its files under ``out_path`` and returns JSON-able stats.
    With ``force``, a finished step is unpublished, removed and run again.
    ``resumable``: what an unfinished attempt left is kept for ``fn`` to resume
    from (training's checkpoints) instead of being cleared.
    """
    key = key_prefix + content_key(stage, version, inputs, settings)
    out = f"{stage}/{key}"
    if force and storage.is_published(out):
        log.info("%s: recomputing %s (forced)", stage, storage.url(out))
        # The marker goes first, so no reader trusts a half-removed folder.
        storage.remove(f"{out}/{MARKER}")
    elif storage.is_published(out):
        marker = storage.marker(out)
        log.info("%s: inputs and settings unchanged, reusing %s", stage, storage.url(out))
        return StepResult(stage, key, out, marker.get("stats", {}), cached=True)
    if resumable and not force and storage.exists(out):
        log.info("%s: resuming the unfinished attempt in %s", stage, storage.url(out))
    else:
        storage.remove(out)  # leftovers of a crashed attempt are never trusted
    start = time.monotonic()
    stats = fn(out)
    seconds = round(time.monotonic() - start, 3)
    storage.publish(
        out,
        {
            "stage": stage,
            "key": key,
            "version": version,
            "inputs": inputs,
            "settings": settings,
            "stats": stats,
            "seconds": seconds,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return StepResult(stage, key, out, stats, cached=False, seconds=seconds)
