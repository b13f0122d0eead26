"""Does lean optimizer state train like float32 AdamW? Loss curves on real tokens, one per setting.

    .venv/bin/python bench/optimizer_state.py [--root ./data] [--shards shards/KEY] [--steps 300]

Trains the same model from the same initialization on the same batches of a
shard set (default: the newest one under the storage root, e.g. what
`make demo` built) with each optimizer setting of the memory-lean recipes:

* AdamW, float32 moments (the reference);
* AdamW, bfloat16 moments;
* AdamW, 8-bit moments (``moments: int8``);
* AdamW, 8-bit moments and a bfloat16 gradient accumulator
  (``grad_dtype: bfloat16``, with ``grad_accum`` micro-batches): the 13B
  recipe of docs/training.md;
* Adafactor.

Every setting uses remat ``full`` and float32 compute, so the state format
is the only difference. It reports, per setting, the mean training loss of
the last 10% of the steps and the validation loss at the end, and each one's
difference from the float32 AdamW run. No timings: what it measures is
whether the setting learns as well. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from corpus.storage import Storage  # noqa: E402
from encoder.shards import load_split  # noqa: E402
from model import sharding, step  # noqa: E402
from model.config import preset  # noqa: E402

SETTINGS = {
    "adamw float32": {},
    "adamw bfloat16 moments": {"moments": "bfloat16"},
    "adamw int8 moments": {"moments": "int8"},
    "adamw int8 moments, bf16 grads": {"moments": "int8", "grad_dtype": "bfloat16"},
    "adafactor": {"optimizer": "adafactor"},
}


def newest_shards(storage: Storage) -> str:
    """The newest published pretraining shard set (fine-tuning sets are ``ft-*``)."""
    sets = [f"shards/{d}" for d in storage.listdir("shards") if not d.startswith(("ft-", "part-"))]
    sets = [rel for rel in sets if storage.is_published(rel)]
    if not sets:
        raise SystemExit(f"no shard set under {storage.url('shards')}: run `make demo` first, or give --shards")
    return max(sets, key=lambda rel: storage.fs.modified(storage.path(f"{rel}/manifest.json")))


def windows(tokens: np.ndarray, seq_len: int, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
    w = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return w[:, :-1], w[:, 1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="./data")
    ap.add_argument("--shards", help="shards/KEY under the root (default: the newest)")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    storage = Storage(args.root)
    shards = args.shards or newest_shards(storage)
    train, val = load_split(storage, shards, "train"), load_split(storage, shards, "val")
    vocab = storage.read_json(f"{shards}/manifest.json")["vocab_size"]
    cfg = preset(args.preset, vocab_size=vocab, seq_len=args.seq_len)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    val_x, val_y = windows(val, args.seq_len, 64, np.random.default_rng(10_000))
    print(f"{storage.url(shards)}: {len(train):,} train and {len(val):,} val tokens, vocab {vocab}; "
          f"{args.preset} preset, {args.steps} steps of {args.batch} x {args.seq_len} tokens")

    results = {}
    for name, change in SETTINGS.items():
        settings = step.OptimSettings(
            lr=args.lr, warmup_steps=args.steps // 10, total_steps=args.steps, remat="full",
            grad_accum=args.grad_accum, **change,
        )
        model, optimizer = step.create_train_state(cfg, settings, mesh, seed=0)
        rng = np.random.default_rng(0)
        losses = []
        for _ in range(args.steps):
            x, y = windows(train, args.seq_len, args.batch, rng)
            xs = sharding.shard_batch(mesh, step.split_batch(x, args.grad_accum))
            ys = sharding.shard_batch(mesh, step.split_batch(y, args.grad_accum))
            losses.append(float(step.train_step(model, optimizer, xs, ys)["loss"]))
        total, n = step.eval_step(model, sharding.shard_batch(mesh, val_x), sharding.shard_batch(mesh, val_y))
        tail = max(1, args.steps // 10)
        results[name] = {"train_loss_last": float(np.mean(losses[-tail:])), "val_loss": float(total) / int(n),
                         "curve": [round(v, 4) for v in losses]}
        print(f"  {name}: train {results[name]['train_loss_last']:.4f}, val {results[name]['val_loss']:.4f}", flush=True)

    ref = results["adamw float32"]
    print(f"\n{'setting':<34}{'train loss (last 10%)':>24}{'val loss':>12}{'val vs float32':>16}")
    for name, r in results.items():
        diff = (r["val_loss"] - ref["val_loss"]) / ref["val_loss"]
        print(f"{name:<34}{r['train_loss_last']:>24.4f}{r['val_loss']:>12.4f}{diff:>+15.2%}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"shards": storage.url(shards), "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
