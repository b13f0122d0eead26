"""The launch loop, shared by every backend: submit, watch, re-queue after preemption, always delete.

:func:`launch` trains one run (``runs/run-<key>`` of :mod:`flows.stages`, the
same key ``jagpt train`` computes) on a :class:`Backend`:

1. works out the shard set and the run's folder, and returns the registered
   checkpoint at once if that run is already finished and registered;
2. writes ``launches/<id>/launch.json`` under the storage root, naming the
   backend and each attempt's resources *before* they are created, so that
   :func:`cleanup` (the flow's on_cancellation/on_crashed hooks) can delete
   them even when this process is gone;
3. ``backend.prepare``: uploads what the hosts need (the config, the wheel);
4. ``backend.submit`` an attempt, then ``backend.poll`` it every ``poll_s``
   seconds, reading ``metrics.jsonl`` of the run into a Prefect progress
   artifact; PREEMPTED: delete the attempt and submit the next one (``jagpt
   train`` resumes from the newest checkpoint by itself); FAILED: raise with
   the log's tail; SUCCEEDED: read the registry record ``jagpt train`` wrote;
5. in a ``finally``: delete every attempt's resources not yet deleted, and
   record the outcome (succeeded, failed, cancelled).
"""

from __future__ import annotations

import atexit
import logging
import secrets
import threading
import time
import traceback
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import yaml

from corpus.steps import StepResult, content_key
from corpus.storage import Storage
from model import registry
from model.metrics import read_metrics

log = logging.getLogger(__name__)

LAUNCHES = "launches"


class Status(str, Enum):
    QUEUED = "QUEUED"              # waiting for capacity
    PROVISIONING = "PROVISIONING"  # capacity granted; the hosts boot and install
    RUNNING = "RUNNING"            # jagpt train runs
    PREEMPTED = "PREEMPTED"        # the hosts were taken back (or got SIGTERM): submit again to resume
    SUCCEEDED = "SUCCEEDED"        # jagpt train exited 0 on every host (the checkpoint is registered)
    FAILED = "FAILED"


@dataclass(frozen=True)
class Job:
    """One attempt of one launch: what a backend runs."""

    launch_id: str
    attempt: int
    config_yaml: str  # the run's whole config (storage root, train settings, ...)
    shards: str       # shards/<key>, passed as `jagpt train --shards`
    run_dir: str      # runs/run-<key>, where the metrics and checkpoints go
    steps: int

    @property
    def prefix(self) -> str:
        """Where the hosts report, relative to the storage root."""
        return f"{LAUNCHES}/{self.launch_id}/attempt-{self.attempt}"


@dataclass
class Handle:
    """What a backend created for an attempt. ``names`` is JSON and goes to launch.json."""

    attempt: int
    names: dict[str, Any]
    runtime: Any = field(default=None, repr=False, compare=False)  # in-process extras (a Popen, an operation)


@dataclass(frozen=True)
class Polled:
    status: Status
    detail: str = ""


@dataclass(frozen=True)
class Watch:
    """How :func:`launch` watches a backend's attempts."""

    poll_s: float = 30.0
    max_preemptions: int = 20
    timeout_s: float | None = None  # queueing included; None: no limit


class Backend(Protocol):
    """Where attempts run. docs/architecture.md ("The launcher") says how to add one (GKE/xpk)."""

    kind: str  # "local", "tpu-vm", ...
    watch: Watch

    def describe(self) -> dict[str, Any]:
        """JSON that :func:`backend_from_record` turns back into an equivalent backend (no secrets)."""
        ...

    def prepare(self, launch_id: str, config_yaml: str) -> None:
        """Once per launch, before the first attempt: stage what the hosts need."""
        ...

    def names(self, job: Job) -> dict[str, Any]:
        """The resources ``submit(job)`` will create, named before they exist (recorded first)."""
        ...

    def submit(self, job: Job) -> Handle:
        ...

    def poll(self, handle: Handle) -> Polled:
        ...

    def delete(self, handle: Handle) -> None:
        """Delete the attempt's resources and wait until they are gone; a no-op for ones already gone."""
        ...

    def log_tail(self, handle: Handle) -> str:
        """The last lines of the attempt's training log, for errors ("" if none)."""
        ...


class LaunchError(RuntimeError):
    pass


class LaunchCancelled(LaunchError):
    pass


# -- the run's identity ------------------------------------------------------------------------------


def run_dir_for(cfg, shards: StepResult) -> str:
    """``runs/run-<key>``: the folder ``jagpt train --shards`` trains into with this config (flows.stages.train_step)."""
    from flows.stages import RUNTIME_ONLY, VERSIONS

    return "runs/run-" + content_key("runs", VERSIONS["train"], {"shards": shards.id},
                                     cfg.train.model_dump(exclude=RUNTIME_ONLY))


def current_shards(cfg) -> StepResult:
    """The current corpus's shard set, made here if missing (what `jagpt train` without --shards would use)."""
    from flows import stages

    storage = cfg.storage_root()
    corpus = stages.current_corpus(storage)
    return stages.shards_step(storage, cfg, stages.encoder_step(storage, cfg, corpus), corpus)


def dump_config(cfg) -> str:
    """The config as YAML that loads back to the same config (checked: the run key depends on it)."""
    from flows.config import parse_config

    text = yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True, sort_keys=False)
    if parse_config(text, "launcher") != cfg:
        raise LaunchError("the config does not survive a YAML round trip; the hosts would train another run")
    return text


def new_launch_id(flow_run_id: str | None = None) -> str:
    """``jagpt-<8 hex>``: a valid TPU node name (lower case, digits, dashes), from the flow run's id when there is one."""
    tail = flow_run_id.replace("-", "")[:8] if flow_run_id else secrets.token_hex(4)
    return f"jagpt-{tail}-{secrets.token_hex(2)}"


# -- the launch record ---------------------------------------------------------------------------------


def record_path(launch_id: str) -> str:
    return f"{LAUNCHES}/{launch_id}/launch.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_records(storage: Storage) -> list[dict[str, Any]]:
    out = []
    for name in storage.listdir(LAUNCHES):
        if storage.exists(record_path(name)):
            out.append(storage.read_json(record_path(name)))
    return out


def backend_from_record(storage: Storage, described: dict[str, Any]) -> Backend:
    kind = described.get("kind")
    if kind == "tpu-vm":
        from infra.launcher.tpu import TpuVmBackend

        return TpuVmBackend.from_description(storage, described)
    if kind == "local":
        from infra.launcher.local import LocalBackend

        return LocalBackend.from_description(storage, described)
    raise LaunchError(f"unknown launcher backend {kind!r} in a launch record")


def _delete_attempts(storage: Storage, backend: Backend, record: dict[str, Any], logger) -> list[str]:
    """Delete every attempt of ``record`` not marked deleted; marks them. Returns what was deleted."""
    done = []
    for attempt in record["attempts"]:
        if attempt.get("deleted_at"):
            continue
        handle = Handle(attempt["attempt"], attempt["names"], attempt.get("_runtime"))
        try:
            backend.delete(handle)
        except Exception as e:  # keep going: the other attempts, and the record says what is left
            logger.error("could not delete %s: %s", attempt["names"], e)
            attempt["delete_error"] = repr(e)
            continue
        attempt["deleted_at"] = _now()
        done.append(", ".join(f"{k} {v}" for k, v in attempt["names"].items() if k in ("node", "queued_resource", "pid")))
    _write_record(storage, record)
    return done


def _write_record(storage: Storage, record: dict[str, Any]) -> None:
    storage.write_json(record_path(record["launch_id"]), {k: v for k, v in record.items() if not k.startswith("_")}
                       | {"attempts": [{k: v for k, v in a.items() if not k.startswith("_")} for a in record["attempts"]]})


def cleanup(storage: Storage, flow_run_id: str | None = None, launch_id: str | None = None, reason: str = "cleanup") -> list[str]:
    """Delete the resources of the unfinished launches of a flow run (or one launch); what was deleted.

    The flow's on_cancellation and on_crashed hooks call this (the Prefect worker
    runs them after the flow's process is gone); deleting what is gone already is a
    no-op. A launch with no outcome, or "interrupted" (its process was stopped),
    gets ``reason`` as its outcome.
    """
    deleted = []
    for record in read_records(storage):
        if launch_id and record["launch_id"] != launch_id:
            continue
        if flow_run_id and record.get("flow_run_id") != flow_run_id:
            continue
        if not (launch_id or flow_run_id):
            continue
        if not all(a.get("deleted_at") for a in record["attempts"]):
            backend = backend_from_record(storage, record["backend"])
            deleted += _delete_attempts(storage, backend, record, log)
        if record.get("outcome") in (None, "interrupted"):
            record.update(outcome=reason, finished_at=record.get("finished_at") or _now())
            _write_record(storage, record)
    return deleted


# -- progress ------------------------------------------------------------------------------------------


def _run_context():
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return None
    return TaskRunContext.get() or FlowRunContext.get()


def current_flow_run_id() -> str | None:
    try:
        from prefect.context import FlowRunContext
    except ImportError:
        return None
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def _logger():
    if _run_context() is not None:
        from prefect import get_run_logger

        return get_run_logger()
    return log


class Progress:
    """The run's progress from its ``metrics.jsonl``, as a Prefect progress artifact (inside a flow or task run only)."""

    def __init__(self, storage: Storage, run_dir: str, steps: int, title: str, logger):
        self.storage, self.run_dir, self.steps, self.title, self.logger = storage, run_dir, steps, title, logger
        self.artifact = None
        self.step = -1
        self.in_run = _run_context() is not None

    def update(self, note: str = "") -> int | None:
        """Read the metrics; publish when the step moved. The newest step (None if no row yet)."""
        try:
            rows = read_metrics(self.storage, self.run_dir)
        except (OSError, ValueError) as e:  # a half-visible object store listing: next time
            self.logger.warning("could not read the metrics yet: %s", e)
            return None
        if not rows:
            step, last = 0, {}
        else:
            last = rows[-1]
            step = int(last["step"])
        if step == self.step:
            return step
        self.step = step
        figures = ", ".join(f"{k} {last[k]:.4f}" for k in ("train_loss", "val_loss") if isinstance(last.get(k), float))
        description = f"{self.title}: step {step}/{self.steps}" + (f", {figures}" if figures else "") + (f" ({note})" if note else "")
        self.logger.info(description)
        self._publish(100.0 * min(step, self.steps) / self.steps, description)
        return step

    def done(self) -> None:
        self._publish(100.0, f"{self.title}: finished, {self.steps} steps")

    def _publish(self, progress: float, description: str) -> None:
        if not self.in_run:
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        try:
            if self.artifact is None:
                self.artifact = create_progress_artifact(progress, key="train-progress", description=description)
            else:
                update_progress_artifact(self.artifact, progress, description=description)
        except Exception as e:  # the UI's view is not worth failing a training run
            self.logger.warning("could not update the progress artifact: %s", e)


# -- launching --------------------------------------------------------------------------------------------

# Resources of launches in flight in this process: deleted at interpreter exit if a launch
# could not run its own finally (a daemon thread cut short, say).
_live: dict[str, tuple[Storage, Backend, dict[str, Any]]] = {}
_live_lock = threading.Lock()


@atexit.register
def _delete_live_at_exit() -> None:
    with _live_lock:
        pending = list(_live.values())
        _live.clear()
    for storage, backend, record in pending:
        try:
            _delete_attempts(storage, backend, record, log)
        except Exception:  # at exit: nothing left to tell
            log.error("could not delete the resources of launch %s at exit", record["launch_id"], exc_info=True)


def launch(
    params,
    cfg,
    shards: StepResult | None = None,
    *,
    backend: Backend | None = None,
    options=None,
    cancel: threading.Event | None = None,
    launch_id: str | None = None,
    flow_run_id: str | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` (with ``params`` applied, see flows.jobs.with_params) on a backend; the registered checkpoint record.

    ``backend`` defaults to a Cloud TPU VM (:class:`infra.launcher.tpu.TpuVmBackend`) made from
    ``params`` (tpu_type, zone, spot) and ``options`` (:class:`infra.launcher.tpu.TpuOptions`,
    default: from the environment). ``cancel``: set it to stop the launch (its resources are
    deleted, and :class:`LaunchCancelled` is raised).
    """
    logger = _logger()
    storage = cfg.storage_root()
    shards = shards or current_shards(cfg)
    run_dir = run_dir_for(cfg, shards)
    run_key = run_dir.rsplit("/", 1)[1]
    steps = cfg.train.steps
    registered = registry.record_name(run_key, steps)
    if storage.is_published(run_dir) and storage.exists(registered):
        logger.info("%s is trained and registered already; nothing to launch", storage.url(run_dir))
        return storage.read_json(registered)

    if backend is None:
        from infra.launcher.tpu import TpuOptions, TpuVmBackend

        backend = TpuVmBackend.for_params(params, storage, options or TpuOptions.from_env())
    poll_s, max_preemptions, timeout_s = backend.watch.poll_s, backend.watch.max_preemptions, backend.watch.timeout_s

    flow_run_id = flow_run_id or current_flow_run_id()
    launch_id = launch_id or new_launch_id(flow_run_id)
    config_yaml = dump_config(cfg)
    record: dict[str, Any] = {
        "launch_id": launch_id, "flow_run_id": flow_run_id, "created_at": _now(), "backend": backend.describe(),
        "params": params.model_dump(mode="json") if hasattr(params, "model_dump") else params,
        "shards": shards.id, "run_dir": run_dir, "steps": steps, "attempts": [], "outcome": None, "finished_at": None,
    }
    _write_record(storage, record)
    title = f"jagpt train on {backend.kind} ({launch_id})"
    logger.info("%s: %s, run %s, %d steps; record %s", title, shards.id, run_dir, steps, storage.url(record_path(launch_id)))
    with _live_lock:
        _live[launch_id] = (storage, backend, record)
    progress = Progress(storage, run_dir, steps, title, logger)
    started = time.monotonic()
    outcome = "failed"
    try:
        backend.prepare(launch_id, config_yaml)
        attempt, preemptions = 0, 0
        while True:
            attempt += 1
            job = Job(launch_id, attempt, config_yaml, shards.path, run_dir, steps)
            entry = {"attempt": attempt, "names": backend.names(job), "submitted_at": _now(), "deleted_at": None}
            record["attempts"].append(entry)
            _write_record(storage, record)  # named before created: a crash from here on leaves a record to clean up
            handle = backend.submit(job)
            entry["names"], entry["_runtime"] = handle.names, handle.runtime
            _write_record(storage, record)
            logger.info("attempt %d submitted: %s", attempt, handle.names)
            polled = _watch(backend, handle, progress, logger, poll_s, cancel, started, timeout_s)
            entry["status"] = polled.status.value
            if polled.status is Status.SUCCEEDED:
                break
            if polled.status is Status.PREEMPTED:
                preemptions += 1
                logger.warning("attempt %d preempted (%s); %s", attempt, polled.detail or "no detail",
                               "giving up" if preemptions > max_preemptions else "deleting it and queueing again; the run resumes from its newest checkpoint")
                if preemptions > max_preemptions:
                    raise LaunchError(f"preempted {preemptions} times (more than max_preemptions {max_preemptions})")
                backend.delete(handle)
                entry["deleted_at"] = _now()
                _write_record(storage, record)
                continue
            tail = backend.log_tail(handle)
            raise LaunchError(f"attempt {attempt} failed: {polled.detail}" + (f"\n--- the log's tail:\n{tail}" if tail else ""))
        if not storage.exists(registered):
            raise LaunchError(f"the hosts reported success but {storage.url(registered)} is missing")
        progress.update()
        progress.done()
        outcome = "succeeded"
        result = storage.read_json(registered)
        logger.info("trained and registered %s-%s (val loss %s) in %d attempt(s)", result["run_id"], result["step"],
                    result.get("val_loss"), attempt)
        return result
    except LaunchCancelled:
        outcome = "cancelled"
        raise
    except BaseException as e:
        # Not an Exception: Ctrl-C, SystemExit, or the SIGTERM with which a Prefect worker stops a cancelled
        # run (prefect's TerminationSignal). The flow's on_cancellation hook turns "interrupted" into "cancelled".
        outcome = "failed" if isinstance(e, Exception) else "interrupted"
        record["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:]
        raise
    finally:
        try:
            deleted = _delete_attempts(storage, backend, record, logger)
            if deleted:
                logger.info("deleted %s", "; ".join(deleted))
        finally:
            record.update(outcome=outcome, finished_at=_now())
            _write_record(storage, record)
            with _live_lock:
                _live.pop(launch_id, None)


def _watch(backend: Backend, handle: Handle, progress: Progress, logger, poll_s: float,
           cancel: threading.Event | None, started: float, timeout_s: float | None) -> Polled:
    """Poll until the attempt succeeds, fails or is preempted."""
    last = None
    while True:
        if cancel is not None and cancel.is_set():
            raise LaunchCancelled("the launch was cancelled")
        polled = backend.poll(handle)
        if (polled.status, polled.detail) != last:
            logger.info("attempt %d: %s%s", handle.attempt, polled.status.value, f" ({polled.detail})" if polled.detail else "")
            last = (polled.status, polled.detail)
        if polled.status in (Status.RUNNING, Status.SUCCEEDED, Status.PREEMPTED):
            progress.update()
        if polled.status in (Status.SUCCEEDED, Status.FAILED, Status.PREEMPTED):
            return polled
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise LaunchError(f"not finished after {timeout_s:.0f} s (timeout_s)")
        if cancel is not None:
            if cancel.wait(poll_s):
                raise LaunchCancelled("the launch was cancelled")
        else:
            time.sleep(poll_s)


