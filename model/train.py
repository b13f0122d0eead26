"""The train stage: the loop around one optimizer step (:mod:`model.step`).

Each step takes the loader's batch for that step (:mod:`model.data`: a pure
function of seed and step), places it on the mesh and updates the model.
Every ``eval_every`` steps it measures validation loss, perplexity and bits
per character; every ``checkpoint_every`` steps it saves the model, the
optimizer and the loader's position (:mod:`model.checkpoint`). Metrics go to
``metrics.jsonl``, TensorBoard and ``loss.png`` (:mod:`model.metrics`).

A run resumes by itself: if its folder holds checkpoints, the newest readable
one is restored and the loop goes on from there, so a run killed at any point
ends with the same parameters and the same loss curve as one never
interrupted. A SIGTERM (a preempted TPU VM) saves the current step and raises
:class:`Preempted`; a NaN or infinite loss stops the run with an error and
leaves the last good checkpoint as it was.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import Field, model_validator

from corpus.storage import Storage
from encoder.shards import ShardReader
from model import sharding
from model.checkpoint import Checkpoints, PreemptionFlag, abstract_like, fingerprint, pure_state
from model.config import ModelConfig, preset
from model.data import EvalSet, Loader
from model.metrics import MetricsWriter, Progress, peak_flops_per_device
from model.step import (
    OptimSettings, check_batch, check_config, create_train_state, eval_step, flops_per_token, make_schedule, train_step,
)

log = logging.getLogger(__name__)


class TrainSettings(OptimSettings):
    """The optimizer settings (:class:`model.step.OptimSettings`) plus the loop's."""

    preset: str = "tiny"
    seq_len: int = Field(default=128, gt=1)
    batch_size: int = Field(default=16, gt=0, description="sequences per optimizer step, all devices together")
    steps: int = Field(default=300, gt=0)
    total_steps: int | None = Field(default=None, gt=0, description="length of the learning-rate schedule; default: steps")
    lr: float = Field(default=3e-3, gt=0)
    warmup_steps: int = Field(default=30, ge=0)
    mesh: str = Field(default="", description="e.g. 'fsdp=8' or 'data=2,fsdp=4'; empty: data parallel over every device")
    eval_every: int = Field(default=50, gt=0)
    eval_batches: int = Field(default=4, gt=0)
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    keep_checkpoints: int = Field(default=3, ge=2, description="newest checkpoints kept (2 or more, so one can fall back)")
    seed: int = 0

    @model_validator(mode="after")
    def _known_preset(self) -> TrainSettings:
        preset(self.preset, vocab_size=256, seq_len=self.seq_len)  # raises for an unknown name
        return self

    def optim(self) -> OptimSettings:
        fields = {k: getattr(self, k) for k in OptimSettings.model_fields if k != "total_steps"}
        return OptimSettings(**fields, total_steps=self.total_steps or self.steps)


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after saving ``step``; running it again resumes there."""

    def __init__(self, step: int, url: str):
        super().__init__(f"preempted at step {step}: checkpoint saved under {url}; run again to resume")
        self.step = step


def place(mesh, local: np.ndarray) -> jax.Array:
    """This process's rows of a batch, as the global array split over the mesh's batch axes."""
    if jax.process_count() == 1:
        return sharding.shard_batch(mesh, local)
    return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, local.ndim), local)


def evaluate(model, mesh, evalset: EvalSet) -> dict[str, float]:
    """Mean validation loss (nats per token), perplexity and bits per character."""
    total = count = 0.0
    for x, y in evalset:
        s, n = eval_step(model, place(mesh, x), place(mesh, y))
        total, count = total + float(s), count + float(n)
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bits_per_char": evalset.bits_per_char(loss)}


def _state_from(module, pure: dict):
    state = nnx.state(module)
    nnx.replace_by_pure_dict(state, pure)
    return state


def train(
    storage: Storage, shards_dir: str, settings: TrainSettings, out: str, progress=None,
    stop: PreemptionFlag | None = None, init: str | None = None, patience: int = 0,
) -> dict:
    """Train on the shards in ``shards_dir``; checkpoints and metrics go under ``out`` (resumed if there).

    ``progress(step, steps, row)`` is called at each evaluation. ``stop``
    (see :func:`model.checkpoint.install_sigterm_handler`) ends the run
    cleanly with :class:`Preempted` once a SIGTERM arrived.

    Fine-tuning: ``init`` is a checkpoint step folder (``.../checkpoints/<step>``) whose model
    parameters a new run starts from (a fresh optimizer; the shape and tokenizer must match).
    ``patience`` > 0 stops early once that many evaluations in a row (after step 0) did not
    lower the validation loss, and the stats then name the best evaluated step's checkpoint
    (save a checkpoint at every evaluation and keep ``patience + 1`` of them).
    """
    sharding.initialize_distributed()
    train_reader = ShardReader(storage, shards_dir, "train")
    manifest = train_reader.manifest
    cfg = preset(settings.preset, vocab_size=manifest["vocab_size"], seq_len=settings.seq_len)
    optim = settings.optim()
    axes = sharding.parse_mesh(settings.mesh, jax.device_count())
    check_config(cfg, optim, axes)
    check_batch(cfg, optim, axes, settings.batch_size, settings.seq_len)
    mesh = sharding.make_mesh(**axes)
    host = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    loader = Loader(train_reader, settings.seq_len, settings.batch_size, seed=settings.seed, grad_accum=optim.grad_accum,
                    tokenizer_id=manifest["tokenizer_id"], vocab_size=cfg.vocab_size, **host)
    evalset = EvalSet(ShardReader(storage, shards_dir, "val"), settings.seq_len, settings.batch_size, settings.eval_batches, **host)
    model, optimizer = create_train_state(cfg, optim, mesh, settings.seed)
    log.info("train: %s preset, %.2fM params, mesh %s, %d train / %d val tokens, %d steps of %d sequences",
             settings.preset, cfg.n_params() / 1e6, axes, train_reader.num_tokens, evalset.reader.num_tokens,
             settings.steps, settings.batch_size)
    if jax.process_index() == 0 and not storage.exists(f"{out}/model.json"):
        storage.write_json(f"{out}/model.json", {"model": cfg.model_dump(), "train": settings.model_dump(), "shards": shards_dir,
                                                 "tokenizer_id": manifest["tokenizer_id"]})

    ckpt = Checkpoints(storage, f"{out}/checkpoints", fingerprint(cfg, manifest["tokenizer_id"]),
                       max_to_keep=settings.keep_checkpoints)
    try:
        restored = ckpt.latest_restorable(abstract_like(pure_state(model)), abstract_like(pure_state(optimizer)))
        start = 0
        if restored is not None:
            nnx.update(model, _state_from(model, restored.model))
            nnx.update(optimizer, _state_from(optimizer, restored.optimizer))
            loader.restore(restored.loader)
            start = restored.step
            log.info("train: resumed from the checkpoint of step %d", start)
        elif init is not None:
            parent, parent_step = init.rstrip("/").rsplit("/", 1)
            with Checkpoints(storage, parent, ckpt.fingerprint, async_save=False) as source:
                nnx.update(model, _state_from(model, source.restore(int(parent_step), abstract_like(pure_state(model))).model))
            log.info("train: starting from the parameters of %s", storage.url(init))
        metrics = MetricsWriter(storage, out, resume_step=start if restored is not None else None) if jax.process_index() == 0 else None
        record = (lambda step, **v: metrics.log(step, **v)) if metrics else (lambda step, **v: None)
        if start == 0:
            first = evaluate(model, mesh, evalset)
            record(0, **first)
            log.info("step 0: val loss %.4f (%.3f bits per character)", first["val_loss"], first["val_bits_per_char"])
        fpt = flops_per_token(cfg, settings.seq_len)
        meter = Progress(settings.steps, loader.tokens_per_step, start_step=start, flops_per_token=fpt,
                         n_devices=jax.device_count(), peak_flops_per_device=peak_flops_per_device())
        last_saved = start if restored is not None else None
        schedule = make_schedule(optim)
        evals = [(r["step"], r["val_loss"]) for r in (metrics.rows if metrics else []) if "val_loss" in r and r["step"] > 0]
        for index, x, y in loader.prefetch(start, settings.steps):
            step = index + 1
            result = train_step(model, optimizer, place(mesh, x), place(mesh, y))
            loss = float(result["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss} at step {step}; stopped. The last good checkpoint "
                    f"(step {last_saved}) is kept under {ckpt.url}; lower train.lr or check the data"
                    if last_saved is not None else
                    f"training loss became {loss} at step {step}; stopped before any checkpoint was written"
                )
            row = {"train_loss": loss, "grad_norm": float(result.get("grad_norm", jnp.nan)),
                   "lr": float(schedule(step - 1))}
            if step % settings.log_every == 0 or step == settings.steps:
                figures = meter.update(step, loss)
                row.update(tokens_per_s=figures["tokens_per_s"], mfu=figures["mfu"])
                log.info(meter.line(step, loss, figures=figures))
            if step % settings.eval_every == 0 or step == settings.steps:
                row.update(evaluate(model, mesh, evalset))
                log.info("step %d/%d: val loss %.4f, %.3f bits per character", step, settings.steps,
                         row["val_loss"], row["val_bits_per_char"])
                if progress:
                    progress(step, settings.steps, {"step": step, **row})
                evals.append((step, row["val_loss"]))
            record(step, **row)
            stopping = stop is not None and stop.should_stop(step)
            best_step = min(evals, key=lambda e: e[1])[0] if evals else None
            early = patience > 0 and best_step is not None and sum(s > best_step for s, _ in evals) >= patience
            if step % settings.checkpoint_every == 0 or step == settings.steps or stopping or early:
                if metrics:
                    metrics.flush()
                ckpt.save(step, pure_state(model), pure_state(optimizer), loader=loader.state(step=step))
                last_saved = step
            if stopping:
                ckpt.close()
                raise Preempted(step, ckpt.url)
            if early:
                log.info("step %d: no lower validation loss in %d evaluations since step %d; stopping early",
                         step, patience, best_step)
                break
        ckpt.wait()
    finally:
        loader.close()
        ckpt.close()
        if jax.process_index() == 0 and "metrics" in locals() and metrics:
            metrics.close()

    rows = metrics.rows if metrics else []
    vals = [r for r in rows if "val_loss" in r]
    trains = [r for r in rows if "train_loss" in r]
    last = rows[-1]["step"] if rows else settings.steps
    final = settings.steps
    if patience > 0 and any(r["step"] > 0 for r in vals):  # the best evaluated step is the result
        final = min((r for r in vals if r["step"] > 0), key=lambda r: r["val_loss"])["step"]
    at = [r for r in vals if r["step"] == final] or vals[-1:]
    stats = {
        "steps": final,
        "preset": settings.preset,
        "params": cfg.n_params(),
        "first_val_loss": round(vals[0]["val_loss"], 4) if vals else None,
        "final_val_loss": round(at[0]["val_loss"], 4) if at else None,
        "bits_per_char": round(at[0]["val_bits_per_char"], 4) if at else None,
        "final_train_loss": round(trains[-1]["train_loss"], 4) if trains else None,
        "tokens_seen": final * loader.tokens_per_step,
        "checkpoint": f"{out}/checkpoints/{final}",
        "model": cfg.model_dump(),
        "tokenizer_id": manifest["tokenizer_id"],
    }
    if patience > 0:
        stats.update(steps_run=last, stopped_early=last < settings.steps)
    return stats


def model_config_of(storage: Storage, run_dir: str) -> ModelConfig:
    return ModelConfig(**storage.read_json(f"{run_dir}/model.json")["model"])

