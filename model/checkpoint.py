"""Save and restore model (and optimizer) state with orbax.

Checkpoints are written by orbax to a local folder first and then published
under the storage root, so the same code serves ``./data`` and ``gs://``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import jax
import orbax.checkpoint as ocp
from flax import nnx

from corpus.storage import Storage
from model.config import ModelConfig
from model.gpt import GPT


def save(local_dir: str, step: int, model: GPT, optimizer: nnx.Optimizer | None = None) -> str:
    """Write step ``step`` under ``local_dir`` (an orbax CheckpointManager folder); returns its path."""
    items = {"model": ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model)))}
    if optimizer is not None:
        items["optimizer"] = ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer)))
    with ocp.CheckpointManager(os.path.abspath(local_dir)) as manager:
        manager.save(step, args=ocp.args.Composite(**items))
        manager.wait_until_finished()
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
    """A local copy of the checkpoint folder ``rel`` (kept in a cache for remote roots)."""
    if storage.is_local:
        return storage.path(rel)
    key = hashlib.sha256(storage.url(rel).encode()).hexdigest()[:16]
    local = os.path.join(cache_dir(), "checkpoints", key, os.path.basename(rel.rstrip("/")))
    if not os.path.exists(os.path.join(local, ".complete")):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(local))
        storage.get_dir(rel, tmp)
        open(os.path.join(tmp, ".complete"), "w").close()
        if os.path.exists(local):
            shutil.rmtree(local)
        os.replace(tmp, local)
    return local
