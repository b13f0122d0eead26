"""The VM side of the launcher: the startup script (``startup.sh``) reports through this.

``python -m infra.launcher.vm report --config CONFIG --prefix launches/<id>/attempt-<n> --worker W --event started``
writes ``<prefix>/worker-W.started.json``; ``--event finished --rc N --log FILE`` writes the
log (its last 2 MB) as ``<prefix>/worker-W.log``, then ``<prefix>/worker-W.json`` with the exit
status, under the config's storage root. The launcher reads them (:func:`read_reports`) to tell
a VM that is still installing from one that trains, and one that finished from one that failed.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import re
import socket
import sys
import time
from typing import Any

from corpus.storage import Storage

LOG_TAIL_BYTES = 2 * 2**20
_REPORT = re.compile(r"^worker-(\d+)(\.started)?\.json$")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_report(storage: Storage, prefix: str, worker: int, event: str, rc: int | None = None,
                 log_path: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"worker": worker, "event": event, "at": _now(), "host": socket.gethostname()}
    if event == "started":
        storage.write_json(posixpath.join(prefix, f"worker-{worker}.started.json"), body)
        return body
    body["rc"] = rc
    if log_path and os.path.exists(log_path):
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - LOG_TAIL_BYTES))
            storage.write_bytes(posixpath.join(prefix, f"worker-{worker}.log"), f.read())
    # The status last: a reader that sees it finds the log too.
    storage.write_json(posixpath.join(prefix, f"worker-{worker}.json"), body)
    return body


def read_reports(storage: Storage, prefix: str) -> tuple[set[int], dict[int, dict[str, Any]]]:
    """(workers that started, worker -> its finished report) under ``prefix``."""
    started, finished = set(), {}
    for name in storage.listdir(prefix):
        m = _REPORT.match(name)
        if not m:
            continue
        worker = int(m.group(1))
        if m.group(2):
            started.add(worker)
        else:
            finished[worker] = storage.read_json(posixpath.join(prefix, name))
    return started, finished


def read_log(storage: Storage, prefix: str, worker: int, lines: int = 40) -> str:
    """The last ``lines`` lines of a worker's uploaded log ("" when there is none)."""
    rel = posixpath.join(prefix, f"worker-{worker}.log")
    if not storage.exists(rel):
        return ""
    return "\n".join(storage.read_text(rel).splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    from flows.config import load_config

    parser = argparse.ArgumentParser(prog="python -m infra.launcher.vm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("report", help="report a worker's start or end under the storage root")
    p.add_argument("--config", required=True)
    p.add_argument("--prefix", required=True, help="launches/<id>/attempt-<n>")
    p.add_argument("--worker", type=int, required=True)
    p.add_argument("--event", choices=["started", "finished"], required=True)
    p.add_argument("--rc", type=int)
    p.add_argument("--log")
    args = parser.parse_args(argv)
    storage = load_config(args.config).storage_root()
    body = write_report(storage, args.prefix, args.worker, args.event, args.rc, args.log)
    print(f"reported {body} to {storage.url(args.prefix)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
