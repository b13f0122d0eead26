"""The local backend: ``jagpt train`` as a subprocess on this machine (its CPU or GPU, whatever JAX finds).

The same launch loop as a TPU VM: the config goes to a file, each attempt runs
``python -m flows.cli train --config <it> --shards shards/<key>`` in its own process
group, exit status 75 (SIGTERM: checkpoint saved) counts as a preemption and
the next attempt resumes, deleting an attempt sends SIGTERM (then SIGKILL after
``grace_s``). Useful to try a launch end to end without a cloud, and on a GPU box.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any

from corpus.storage import Storage
from infra.launcher.core import LAUNCHES, Handle, Job, Polled, Status, Watch


class LocalBackend:
    kind = "local"

    def __init__(self, storage: Storage, workdir: str | None = None, env: dict[str, str] | None = None,
                 python: str = sys.executable, grace_s: float = 60.0, poll_s: float = 2.0,
                 max_preemptions: int = 20, timeout_s: float | None = None):
        self.storage, self.workdir, self.env, self.python, self.grace_s = storage, workdir, env, python, grace_s
        self.watch = Watch(poll_s=poll_s, max_preemptions=max_preemptions, timeout_s=timeout_s)
        self.config_path = ""

    @classmethod
    def from_description(cls, storage: Storage, described: dict[str, Any]) -> LocalBackend:
        return cls(storage, described.get("workdir"))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "host": socket.gethostname(), "workdir": self.workdir}

    def prepare(self, launch_id: str, config_yaml: str) -> None:
        self.workdir = self.workdir or tempfile.mkdtemp(prefix=f"{launch_id}-")
        os.makedirs(self.workdir, exist_ok=True)
        self.config_path = os.path.join(self.workdir, "config.yaml")
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(config_yaml)
        self.storage.write_text(f"{LAUNCHES}/{launch_id}/config.yaml", config_yaml)

    def names(self, job: Job) -> dict[str, Any]:
        return {"host": socket.gethostname(), "workdir": self.workdir, "pid": None,
                "log": os.path.join(self.workdir or "", f"attempt-{job.attempt}.log")}

    def submit(self, job: Job) -> Handle:
        names = self.names(job)
        out = open(names["log"], "wb")
        proc = subprocess.Popen(
            [self.python, "-m", "flows.cli", "train", "--config", self.config_path, "--shards", job.shards],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=None if self.env is None else {**os.environ, **self.env},
        )
        out.close()
        return Handle(job.attempt, {**names, "pid": proc.pid}, runtime={"process": proc})

    def poll(self, handle: Handle) -> Polled:
        proc = (handle.runtime or {}).get("process")
        if proc is None:
            return Polled(Status.RUNNING if self._alive(handle) else Status.FAILED, "a process of another launcher")
        rc = proc.poll()
        if rc is None:
            return Polled(Status.RUNNING, f"pid {proc.pid}")
        if rc == 0:
            return Polled(Status.SUCCEEDED, "exit status 0")
        if rc == 75:
            return Polled(Status.PREEMPTED, "SIGTERM: checkpoint saved, exit status 75")
        return Polled(Status.FAILED, f"jagpt train exited with status {rc}")

    def _alive(self, handle: Handle) -> bool:
        """Whether the recorded pid on this host is still our jagpt train (not a reused pid)."""
        pid = handle.names.get("pid")
        if not pid or handle.names.get("host") != socket.gethostname():
            return False
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return self.workdir is not None and self.workdir.encode() in f.read()
        except OSError:
            return False

    def delete(self, handle: Handle) -> None:
        proc = (handle.runtime or {}).get("process")
        if proc is not None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.grace_s)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
            return
        if self._alive(handle):
            os.killpg(handle.names["pid"], signal.SIGTERM)

    def log_tail(self, handle: Handle) -> str:
        try:
            with open(handle.names["log"], encoding="utf-8", errors="replace") as f:
                return "\n".join(f.read().splitlines()[-40:])
        except (OSError, KeyError):
            return ""
