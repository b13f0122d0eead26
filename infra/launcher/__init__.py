"""Launch a training run somewhere else and watch it: a Cloud TPU VM, or a local subprocess.

``launch(params, cfg, shards)`` (what the ``train`` flow calls for ``target: tpu``)
runs ``jagpt train`` on a :class:`Backend`, re-queues it after a preemption (the
run resumes from its newest checkpoint), shows its progress as a Prefect
progress artifact, and always deletes what it created. :func:`cleanup` deletes
what a crashed or cancelled flow run left (the flow's on_crashed and
on_cancellation hooks call it).

Backends: :class:`infra.launcher.tpu.TpuVmBackend` (google-cloud-tpu; queued
resources for Spot and best-effort capacity) and
:class:`infra.launcher.local.LocalBackend`. docs/architecture.md ("The launcher")
says how to add another, e.g. GKE with xpk.
"""

from infra.launcher.core import (
    Backend, Handle, Job, LaunchCancelled, LaunchError, Polled, Status, Watch, cleanup, launch, read_records, run_dir_for,
)
from infra.launcher.local import LocalBackend
from infra.launcher.tpu import GENERATIONS, TpuOptions, TpuVmBackend, accelerator

__all__ = [
    "GENERATIONS", "Backend", "Handle", "Job", "LaunchCancelled", "LaunchError", "LocalBackend", "Polled", "Status",
    "TpuOptions", "TpuVmBackend", "Watch", "accelerator", "cleanup", "launch", "read_records", "run_dir_for",
]
