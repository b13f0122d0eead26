"""The train stage: a GPT trained with optax AdamW on the token shards.

The loop is the plain one: sample a batch, take a step, evaluate every
``eval_every`` steps, checkpoint every ``checkpoint_every`` steps. Batches are
a pure function of (seed, step), so any step's batch can be rebuilt at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from pydantic import Field

from corpus.settings import Settings
from corpus.storage import Storage
from encoder.shards import load_split
from model import checkpoint
from model.config import ModelConfig, preset
from model.gpt import GPT

log = logging.getLogger(__name__)


class TrainSettings(Settings):
    preset: str = "tiny"
    seq_len: int = Field(default=128, gt=1)
    batch_size: int = Field(default=16, gt=0)
    steps: int = Field(default=300, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    warmup_steps: int = Field(default=30, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    optimizer: Literal["adamw"] = "adamw"
    eval_every: int = Field(default=50, gt=0)
    eval_batches: int = Field(default=4, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    seed: int = 0


def batch_at(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch for ``step``: random windows, determined by (seed, step) alone."""
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"only {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
            "crawl more pages or lower train.seq_len"
        )
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    window = tokens[idx].astype(np.int32)
    return window[:, :-1], window[:, 1:]


def make_optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    """AdamW (beta2 0.95) with linear warmup, then cosine decay to 10% (GPT-3)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=settings.lr,
        warmup_steps=min(settings.warmup_steps, settings.steps - 1),
        decay_steps=settings.steps,
        end_value=settings.lr * 0.1,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731 - no decay on biases, norms
    return optax.chain(
        optax.clip_by_global_norm(settings.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=settings.weight_decay, mask=decay_mask),
    )


def loss_fn(model: GPT, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = model(x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model: GPT, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_step(model: GPT, x: jax.Array, y: jax.Array) -> jax.Array:
    return loss_fn(model, x, y)


def evaluate(model: GPT, val: np.ndarray, settings: TrainSettings) -> float:
    seq_len = min(settings.seq_len, len(val) - 1)
    losses = [
        float(eval_step(model, *batch_at(val, seq_len, settings.batch_size, settings.seed + 1_000_003, i)))
        for i in range(settings.eval_batches)
    ]
    return float(np.mean(losses))


def plot_losses(metrics: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    train = [(m["step"], m["train_loss"]) for m in metrics if "train_loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("jagpt training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(storage: Storage, shards_dir: str, settings: TrainSettings, out: str, progress=None) -> dict:
    """Train on the shards in ``shards_dir``; checkpoints and metrics go under ``out``."""
    manifest = storage.read_json(f"{shards_dir}/manifest.json")
    cfg = preset(settings.preset, vocab_size=manifest["vocab_size"], seq_len=settings.seq_len)
    train_tokens = load_split(storage, shards_dir, "train")
    val_tokens = load_split(storage, shards_dir, "val")
    log.info(
        "train: %s preset, %.2fM params, %d train / %d val tokens, %d steps",
        settings.preset, cfg.n_params() / 1e6, len(train_tokens), len(val_tokens), settings.steps,
    )
    model = GPT(cfg, nnx.Rngs(settings.seed))
    optimizer = nnx.Optimizer(model, make_optimizer(settings), wrt=nnx.Param)

    metrics: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="jagpt-train-") as work:
        ckpt_dir = os.path.join(work, "checkpoints")
        first_val = evaluate(model, val_tokens, settings)
        metrics.append({"step": 0, "val_loss": first_val})
        log.info("step 0: val loss %.4f", first_val)
        start = time.monotonic()
        for step in range(1, settings.steps + 1):
            x, y = batch_at(train_tokens, settings.seq_len, settings.batch_size, settings.seed, step)
            loss = float(train_step(model, optimizer, x, y))
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {step}; stopping (no checkpoint written)")
            row: dict = {"step": step, "train_loss": loss}
            if step % settings.eval_every == 0 or step == settings.steps:
                row["val_loss"] = evaluate(model, val_tokens, settings)
                elapsed = time.monotonic() - start
                row["tokens_per_s"] = round(step * settings.batch_size * settings.seq_len / elapsed, 1)
                log.info("step %d/%d: train %.4f, val %.4f, %.0f tok/s", step, settings.steps, loss, row["val_loss"], row["tokens_per_s"])
                if progress:
                    progress(step, settings.steps, row)
            metrics.append(row)
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                checkpoint.save(ckpt_dir, step, model, optimizer)

        with open(os.path.join(work, "metrics.jsonl"), "w", encoding="utf-8") as f:
            for m in metrics:
                f.write(json.dumps(m) + "\n")
        plot_losses(metrics, os.path.join(work, "loss.png"))
        with open(os.path.join(work, "model.json"), "w", encoding="utf-8") as f:
            json.dump({"model": cfg.model_dump(), "train": settings.model_dump(), "shards": shards_dir}, f, indent=2)
        storage.put_dir(work, out)

    final_val = metrics[-1]["val_loss"]
    return {
        "steps": settings.steps,
        "params": cfg.n_params(),
        "first_val_loss": round(first_val, 4),
        "final_val_loss": round(final_val, 4),
        "final_train_loss": round(metrics[-1]["train_loss"], 4),
        "tokens_seen": settings.steps * settings.batch_size * settings.seq_len,
        "checkpoint": f"{out}/checkpoints/{settings.steps}",
        "model": cfg.model_dump(),
        "tokenizer_id": manifest["tokenizer_id"],
    }


def model_config_of(storage: Storage, run_dir: str) -> ModelConfig:
    return ModelConfig(**storage.read_json(f"{run_dir}/model.json")["model"])
