"""Checkpoints of a training run, written and read by orbax, and preemption handling.

:class:`Checkpoints` wraps an orbax ``CheckpointManager`` on
``<storage root>/<rel>`` (normally ``runs/<id>/checkpoints``). Each step folder
``<step>/`` holds three items:

* ``model``: the model state, a pytree of arrays (e.g. ``nnx.to_pure_dict(nnx.state(model))``);
* ``optimizer``: the optimizer state, likewise (optional);
* ``meta``: JSON with the step, the loader's position (:meth:`model.data.Loader.state`),
  the run's fingerprint (model config and tokenizer id) and a checksum of every array.

Where it is written: orbax writes local folders and ``gs://`` itself (metadata
through fsspec/gcsfs, arrays through TensorStore), so each host writes its own
shards of a sharded array straight to the bucket and nothing is staged on local
disk. Locally orbax writes a step into a temporary folder and renames it; on
GCS it writes ``commit_success.txt`` last. Either way a step becomes visible
only once complete, so a killed save leaves no half step to resume from. Those
libraries take a GCS endpoint from the environment, not from arguments: for a
root whose fsspec options name an ``endpoint_url`` (the GCS emulator, a private
endpoint), it is exported as ``STORAGE_EMULATOR_HOST`` and
``TENSORSTORE_GCS_HTTP_URL`` for this process. Credentials are the
environment's (Application Default Credentials); none go in the config.

Arrays are stored as plain zarr (one object per chunk), not in orbax's default
OCDBT database: OCDBT updates its manifest with generation-conditional writes,
which the GCS emulator does not implement (it sends no object generation), and
saves to it failed most of the time. The model's state is a few dozen large
arrays, so OCDBT's packing of many small arrays into few files gains nothing
here, and one format serves every root. Restores read either format.

Saves are asynchronous: :meth:`Checkpoints.save` returns once the arrays are
copied off the devices, and the writing goes on in a background thread while
training continues. A save must finish before the process exits: call
:meth:`Checkpoints.close` (or use the object as a context manager); it is also
registered with ``atexit``. A killed process loses only the save in flight.

Resume: :meth:`Checkpoints.latest_restorable` restores the newest step. A step
that cannot be read (a missing or damaged file, or arrays whose checksums do not
match the ones saved) is logged as a WARNING and the previous step is tried. Once
an older step restores, the unreadable newer ones are taken away: renamed to
``unreadable-<step>-<time>`` in a local folder, deleted on ``gs://`` (where a
rename copies every object). Left in place they would block saving those step
numbers again and count towards ``max_to_keep``. If steps exist but none can be read, it
raises instead of letting the run start again from step 0. A step saved with
another model shape or tokenizer raises :class:`CheckpointMismatch` at once. Keep
``max_to_keep`` at 2 or more so that there is a previous step to fall back to.

Preemption (SIGTERM): the signal handler of :class:`PreemptionFlag` only records
the signal. The loop checks :meth:`PreemptionFlag.should_stop` once per step;
when it is true it saves that step, calls :meth:`Checkpoints.close` (which waits
for the save to be written) and exits. Doing the save in the handler itself
would interrupt a step halfway.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import logging
import os
import posixpath
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from corpus.storage import Storage
from model.config import ModelConfig
from model.gpt import GPT

log = logging.getLogger(__name__)

_GCS_ENDPOINT_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")


class CheckpointMismatch(ValueError):
    """A checkpoint was saved by a run with another model shape or tokenizer."""


class NoRestorableCheckpoint(RuntimeError):
    """Checkpoints exist, but none of them can be read."""


def fingerprint(model_config: ModelConfig | dict, tokenizer_id: str, **extra: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model's config and the tokenizer id (plus ``extra``)."""
    cfg = model_config.model_dump() if hasattr(model_config, "model_dump") else dict(model_config)
    return json.loads(json.dumps({"model": cfg, "tokenizer_id": tokenizer_id, **extra}, sort_keys=True))


def pure_state(module: nnx.Module) -> dict:
    """A module's (or an ``nnx.Optimizer``'s) state as the plain nested dict of arrays that is saved."""
    return nnx.to_pure_dict(nnx.state(module))


def abstract_like(tree: Any) -> Any:
    """Restore targets shaped, typed and sharded like the arrays of ``tree`` (no data copied)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


# -- checksums ----------------------------------------------------------------------------


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A uint32 sum of the array's bits, each element weighted by an odd function of its position.

    Orbax does not detect flipped bytes inside an array's data file (it restores
    them as wrong values), so each array's checksum is saved in ``meta`` and
    compared after a restore. Integer sums are exact in any order, so the value
    does not depend on how the array is sharded.
    """
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    u = jax.lax.bitcast_convert_type(x, unsigned)
    if x.dtype.itemsize == 8:
        u = u ^ (u >> 32)
    u = u.astype(jnp.uint32)
    index = jnp.zeros(u.shape, jnp.uint32)
    for d, n in enumerate(u.shape):
        index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d)
    return jnp.sum(u * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def checksums(tree: Any) -> dict[str, list]:
    """``{path: [dtype, checksum]}`` for every array of ``tree``."""
    tree = jax.tree.map(jnp.asarray, tree)
    sums = _checksums_jit(tree)
    out = {}
    for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(sums)):
        out[jax.tree_util.keystr(path)] = [str(leaf.dtype), int(np.asarray(s.addressable_data(0)))]
    return out


def _verify(step: int, item: str, restored: Any, saved: dict[str, list] | None) -> None:
    if not saved:
        return
    now = checksums(restored)
    bad = [p for p, (dtype, value) in saved.items() if p in now and now[p][0] == dtype and now[p][1] != value]
    missing = [p for p in saved if p not in now]
    if bad or missing:
        raise ValueError(
            f"step {step}: the restored {item} does not match the checksums saved with it "
            f"(differs: {bad[:5]}{' …' if len(bad) > 5 else ''}; missing: {missing[:5]}): its files are damaged"
        )


# -- the manager ------------------------------------------------------------------------------


def _orbax_directory(storage: Storage, rel: str) -> str:
    if storage.is_local:
        return storage.path(rel)
    if storage.protocol not in ("gs", "gcs"):
        raise ValueError(f"checkpoints can be written to a local folder or gs://, not {storage.url(rel)}")
    endpoint = storage.options.get("endpoint_url")
    if endpoint:
        for var in _GCS_ENDPOINT_VARS:
            current = os.environ.get(var)
            if current and current.rstrip("/") != endpoint.rstrip("/"):
                raise ValueError(f"{var} is {current}, but the storage root's endpoint_url is {endpoint}")
            os.environ[var] = endpoint
    return "gs://" + storage.path(rel)


def _reason(e: BaseException) -> str:
    """The root cause of a failed restore, on one line (orbax wraps TensorStore's error in a long spec dump)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}{'…' if len(text) > 400 else ''}"


@dataclass
class Restored:
    step: int
    model: Any
    optimizer: Any
    meta: dict[str, Any]

    @property
    def loader(self) -> dict[str, Any] | None:
        """The loader's saved position, for :meth:`model.data.Loader.restore`."""
        return self.meta.get("loader")


class Checkpoints:
    """The checkpoints of one run under ``storage`` at ``rel`` (see the module doc).

    ``fingerprint`` (from :func:`fingerprint`) is saved with every step and
    checked on restore; ``None`` skips the check. ``max_to_keep`` newest steps
    are kept, plus every ``keep_period``-th step if given.
    """

    def __init__(
        self,
        storage: Storage,
        rel: str,
        fingerprint: dict[str, Any] | None,
        *,
        max_to_keep: int = 3,
        keep_period: int | None = None,
        async_save: bool = True,
    ):
        self.storage, self.rel = storage, rel
        self.fingerprint = None if fingerprint is None else json.loads(json.dumps(fingerprint, sort_keys=True))
        self.directory = _orbax_directory(storage, rel)
        self.url = storage.url(rel)
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "model": ocp.StandardCheckpointHandler(use_ocdbt=False),
                "optimizer": ocp.StandardCheckpointHandler(use_ocdbt=False),
                "meta": ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                keep_period=keep_period,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                create=True,
            ),
        )
        self._closed = False
        atexit.register(self.close)

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def steps(self) -> list[int]:
        """Complete steps, oldest first (after the save in flight, if any, is written)."""
        self.wait()
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    # -- saving ------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        model: Any,
        optimizer: Any = None,
        *,
        loader: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        """Start saving ``step``; returns once the arrays are off the devices (False if the step exists).

        A previous save still being written is waited for first.
        """
        if step in self.manager.all_steps():
            log.info("checkpoint step %d already exists under %s; not saved again", step, self.url)
            return False
        meta = {
            "step": step,
            "loader": loader,
            "fingerprint": self.fingerprint,
            "checksums": {"model": checksums(model), **({"optimizer": checksums(optimizer)} if optimizer is not None else {})},
            "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **(extra or {}),
        }
        items = {"model": ocp.args.StandardSave(model), "meta": ocp.args.JsonSave(meta)}
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardSave(optimizer)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            log.info("checkpoint step %d: saving to %s", step, self.url)
        return bool(saved)

    def wait(self) -> None:
        """Block until the save in flight (if any) is written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the save in flight, then release the manager. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self.manager.close()

    # -- restoring -----------------------------------------------------------------------------
    def _check_fingerprint(self, step: int, saved: dict[str, Any] | None) -> None:
        if self.fingerprint is None or saved == self.fingerprint:
            return
        saved = saved or {}
        keys = sorted(set(saved) | set(self.fingerprint))
        diff = []
        for k in keys:
            a, b = saved.get(k), self.fingerprint.get(k)
            if a == b:
                continue
            if isinstance(a, dict) and isinstance(b, dict):
                sub = sorted(f"{k}.{s}: saved {a.get(s)!r}, now {b.get(s)!r}" for s in set(a) | set(b) if a.get(s) != b.get(s))
                diff.extend(sub)
            else:
                diff.append(f"{k}: saved {a!r}, now {b!r}")
        raise CheckpointMismatch(
            f"checkpoint step {step} under {self.url} belongs to another configuration ({'; '.join(diff)}): "
            "resume with the settings it was saved with, or start a new run in another folder"
        )

    def restore(self, step: int, model: Any, optimizer: Any = None) -> Restored:
        """Step ``step`` restored into the targets ``model`` and ``optimizer``.

        Targets are pytrees shaped like what was saved, with arrays or
        ``jax.ShapeDtypeStruct`` leaves; their shardings are the shardings of the
        restored arrays (e.g. :func:`abstract_like` of a freshly built, sharded
        state, or ``nnx.eval_shape`` output mapped to ``ShapeDtypeStruct`` with
        ``sharding=``). ``optimizer=None`` restores only the model.
        """
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise ValueError(f"step {step}: its meta item is not a checkpoint meta record: {str(meta)[:200]}")
        self._check_fingerprint(step, meta.get("fingerprint"))
        items = {"model": ocp.args.StandardRestore(model)}
        if optimizer is not None:
            items["optimizer"] = ocp.args.StandardRestore(optimizer)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        saved_sums = meta.get("checksums", {})
        _verify(step, "model", restored["model"], saved_sums.get("model"))
        if optimizer is not None:
            _verify(step, "optimizer", restored["optimizer"], saved_sums.get("optimizer"))
        return Restored(step, restored["model"], restored["optimizer"] if optimizer is not None else None, meta)

    def latest_restorable(self, model: Any, optimizer: Any = None) -> Restored | None:
        """The newest step that restores, trying older ones after failures (see the module doc).

        None when there is no checkpoint. Raises :class:`CheckpointMismatch` for
        a step of another configuration and :class:`NoRestorableCheckpoint` when
        no step can be read.
        """
        steps = self.steps()
        failed: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                restored = self.restore(step, model, optimizer)
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read a step means: try the one before
                reason = _reason(e)
                log.warning("checkpoint step %d under %s cannot be restored (%s); trying the previous step", step, self.url, reason)
                failed.append((step, reason))
                continue
            if failed:
                self._set_aside([s for s, _ in failed])
                log.warning("resuming from checkpoint step %d; newer steps %s could not be read", step, [s for s, _ in failed])
            return restored
        if failed:
            listing = "; ".join(f"step {s}: {r}" for s, r in failed)
            raise NoRestorableCheckpoint(
                f"{len(failed)} checkpoint(s) under {self.url} and none can be restored ({listing}). "
                "Not starting again from step 0: repair or move that folder away first"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Take unreadable steps out of orbax's sight: renamed in a local folder (orbax ignores folders not
        named by a step number), deleted on an object store, where a rename is a copy of every object
        (GCS's soft delete keeps deleted objects for a week by default)."""
        self.wait()
        if jax.process_index() == 0:
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
            for step in steps:
                if self.storage.is_local:
                    dst = posixpath.join(self.rel, f"unreadable-{step}-{stamp}")
                    os.replace(self.storage.path(posixpath.join(self.rel, str(step))), self.storage.path(dst))
                    log.warning("moved unreadable checkpoint step %d to %s", step, self.storage.url(dst))
                else:
                    self.manager.delete(step)
                    log.warning("deleted unreadable checkpoint step %d under %s", step, self.url)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jagpt-checkpoints-set-aside")
        self.manager.reload()


# -- preemption ----------------------------------------------------------------------------------


class PreemptionFlag:
    """Records SIGTERM (or ``signals``) instead of dying, so the loop can save and exit between steps.

    Single process: a Python handler sets the flag; it is installed only from
    the main thread (elsewhere Python forbids it, and a warning says the signal
    keeps its default action). Several processes: JAX's preemption service,
    started by ``jax.distributed.initialize``, already catches SIGTERM and
    agrees on one step at which every host saves; :meth:`should_stop` asks it,
    and no handler is installed over it. :meth:`uninstall` puts back the
    previous handlers.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self.multi_process = jax.process_count() > 1
        self.installed = False
        if self.multi_process:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM keeps its default action (the process dies without a final checkpoint)")
            return
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)
        self.installed = True

    def _handle(self, signum, frame) -> None:
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    def should_stop(self, step: int) -> bool:
        """True when the loop should save ``step`` and exit. Call it once per step, on every host."""
        if self.multi_process:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # the preemption service is off: nothing can be received
                return False
        if self.received is not None:
            log.warning("received signal %d: stopping after step %d", self.received, step)
            return True
        return False

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        self.installed = False

    def __enter__(self) -> PreemptionFlag:
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()


def install_sigterm_handler() -> PreemptionFlag:
    """A :class:`PreemptionFlag` for SIGTERM."""
    return PreemptionFlag((signal.SIGTERM,))


# -- single steps, for generation ------------------------------------------------------------------


def save(local_dir: str, step: int, model: GPT, optimizer: nnx.Optimizer | None = None) -> str:
    """Write step ``step`` of ``model`` (and ``optimizer``) under ``local_dir`` and wait; returns the step's folder."""
    with Checkpoints(Storage(local_dir), "", None, max_to_keep=None, async_save=False) as ckpt:
        ckpt.save(step, pure_state(model), pure_state(optimizer) if optimizer is not None else None)
    return os.path.join(local_dir, str(step))


def restore_model(local_step_dir: str, cfg: ModelConfig) -> GPT:
    """A model with the parameters saved in ``local_step_dir`` (one step's folder)."""
    abstract = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    with ocp.CheckpointManager(os.path.dirname(os.path.abspath(local_step_dir))) as manager:
        step = int(os.path.basename(local_step_dir.rstrip("/")))
        restored = manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
    nnx.replace_by_pure_dict(state, restored["model"])
    return nnx.merge(graphdef, state)


def cache_dir() -> str:
    return os.environ.get("JAGPT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jagpt"))


def fetch(storage: Storage, rel: str) -> str:
    """A local copy of the checkpoint step folder ``rel`` (kept in a cache for remote roots), without its
    optimizer state, which generation does not need and which is twice the model's size under Adam."""
    if storage.is_local:
        return storage.path(rel)
    key = hashlib.sha256(storage.url(rel).encode()).hexdigest()[:16]
    local = os.path.join(cache_dir(), "checkpoints", key, os.path.basename(rel.rstrip("/")))
    if not os.path.exists(os.path.join(local, ".complete")):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(local))
        base = storage.path(rel)
        storage.fs.invalidate_cache(base)
        for src in storage.fs.find(base):
            sub = posixpath.relpath(src, base)
            if sub.split("/")[0] == "optimizer":
                continue
            dst = os.path.join(tmp, *sub.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with storage.fs.open(src, "rb") as f, open(dst, "wb") as out:
                shutil.copyfileobj(f, out)
        open(os.path.join(tmp, ".complete"), "w").close()
        if os.path.exists(local):
            shutil.rmtree(local)
        os.replace(tmp, local)
    return local
