"""Train-step benchmark: tokens/s and MFU of the GPT train step on this machine's devices.

    .venv/bin/python bench/train_step.py [--presets tiny,small,medium] [--json FILE]

1. Measures the devices' own dense matmul peak: a jitted (n x n) @ (n x n)
   matmul in the step's compute dtype (float32 on CPU, bfloat16 elsewhere),
   best of several timed runs, FLOP/s = 2 n^3 / s per device; once before
   and once after the presets, keeping the higher (a machine shared with
   other work shows a lower peak, which would inflate MFU).
2. For each preset, builds the model and AdamW state with
   ``model.step.create_train_state`` over every device (data parallel), takes
   one step to compile, then times ``--steps`` steps (each waited on).
   tokens/s = batch x seq_len / median step time; MFU = tokens/s x
   ``flops_per_token`` (6N + 12·L·d·T) / (devices x peak), against the
   measured peak and against the table peak of ``model.metrics`` (GPUs and
   TPUs; none for CPUs unless JAGPT_PEAK_FLOPS is set). Also reports the share
   of the CPU cores the process used while timing: well below 100% on a CPU
   run means other work took the cores and the figures are low.
3. Checks the target: the 125M (small) step reaches 35% of the measured peak.
   See docs/performance.md.

Exit status: 0 target met (or small not run), 1 missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from model import sharding, step  # noqa: E402
from model.config import preset  # noqa: E402
from model.metrics import peak_flops_per_device  # noqa: E402

TARGET_MFU_SMALL = 0.35
# (sequences per step, seq_len) per preset, per platform: CPU sizes keep a step to seconds.
SHAPES = {
    "cpu": {"tiny": (16, 256), "mini": (16, 256), "small": (8, 512), "medium": (4, 512)},
    "accelerator": {"tiny": (64, 256), "mini": (64, 256), "small": (32, 1024), "medium": (16, 1024)},
}


def matmul_peak(n: int, dtype, repeats: int = 5) -> float:
    """Best FLOP/s of one device on an (n x n) @ (n x n) matmul."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def bench_preset(name: str, vocab: int, batch: int, seq_len: int, steps: int, compute_dtype: str) -> dict:
    cfg = preset(name, vocab_size=vocab, seq_len=max(seq_len, 256))
    mesh = sharding.make_mesh(data=jax.device_count())
    settings = step.OptimSettings(lr=1e-4, warmup_steps=0, total_steps=steps + 1, compute_dtype=compute_dtype)
    step.check_batch(cfg, settings, mesh, batch, seq_len)
    model, optimizer = step.create_train_state(cfg, settings, mesh, seed=0)
    rng = np.random.default_rng(0)
    x = sharding.shard_batch(mesh, rng.integers(0, vocab, (1, batch, seq_len)).astype(np.int32))
    y = sharding.shard_batch(mesh, rng.integers(0, vocab, (1, batch, seq_len)).astype(np.int32))
    start = time.perf_counter()
    jax.block_until_ready(step.train_step(model, optimizer, x, y))
    compile_s = time.perf_counter() - start
    times = []
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for _ in range(steps):
        start = time.perf_counter()
        metrics = jax.block_until_ready(step.train_step(model, optimizer, x, y))
        times.append(time.perf_counter() - start)
    # Below 1 on a CPU run, other processes took part of the cores.
    cpu_share = (time.process_time() - cpu_start) / ((time.perf_counter() - wall_start) * (os.cpu_count() or 1))
    step_s = statistics.median(times)
    return {
        "preset": name, "params": cfg.n_params(), "batch": batch, "seq_len": seq_len, "compute_dtype": compute_dtype,
        "first_step_s": round(compile_s, 2), "step_s": round(step_s, 3), "step_s_all": [round(t, 3) for t in times],
        "tokens_per_s": batch * seq_len / step_s, "flops_per_token": step.flops_per_token(cfg, seq_len),
        "loss": float(metrics["loss"]), "cpu_share": round(cpu_share, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,small,medium")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per preset (after one to compile)")
    parser.add_argument("--matmul", type=int, help="matmul size n (default 4096 on CPU, 8192 elsewhere)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    device = jax.devices()[0]
    platform = "cpu" if device.platform == "cpu" else "accelerator"
    compute_dtype = "float32" if platform == "cpu" else "bfloat16"
    n_dev = jax.device_count()
    matmul_n = args.matmul or (4096 if platform == "cpu" else 8192)
    before = matmul_peak(matmul_n, jnp.dtype(compute_dtype))
    table = peak_flops_per_device(device.device_kind)
    rows = [bench_preset(name, args.vocab, *SHAPES[platform][name], args.steps, compute_dtype)
            for name in args.presets.split(",")]
    after = matmul_peak(matmul_n, jnp.dtype(compute_dtype))
    measured = max(before, after)
    print(f"{n_dev} x {device.device_kind} ({device.platform}); {compute_dtype} matmul peak measured: "
          f"{measured / 1e9:,.1f} GFLOP/s per device (before {before / 1e9:,.1f}, after {after / 1e9:,.1f}); "
          "table peak: " + (f"{table / 1e12:,.1f} TFLOP/s" if table else "none for this device"))
    for r in rows:
        name, batch, seq_len = r["preset"], r["batch"], r["seq_len"]
        model_flops = r["tokens_per_s"] * r["flops_per_token"]
        r["mfu_measured_peak"] = model_flops / (n_dev * measured)
        r["mfu_table_peak"] = model_flops / (n_dev * table) if table else None
        table_mfu = f"{r['mfu_table_peak']:.1%}" if table else "n/a"
        print(f"{name:>7} ({r['params'] / 1e6:,.1f}M params, {batch} x {seq_len} tokens): {r['step_s']:.3f} s/step "
              f"(steps {r['step_s_all']}), {r['tokens_per_s']:,.0f} tokens/s, {model_flops / 1e9:,.1f} GFLOP/s, "
              f"MFU {r['mfu_measured_peak']:.1%} of measured peak, {table_mfu} of table peak; "
              f"first step {r['first_step_s']} s; this process used {r['cpu_share']:.0%} of the CPU cores")
    small = next((r for r in rows if r["preset"] == "small"), None)
    met = small is None or small["mfu_measured_peak"] >= TARGET_MFU_SMALL
    if small:
        print(f"target: small reaches {TARGET_MFU_SMALL:.0%} of the measured peak: "
              f"{'met' if met else 'MISSED'} ({small['mfu_measured_peak']:.1%})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": device.device_kind, "platform": device.platform, "devices": n_dev,
            "matmul_peak_flops": measured, "matmul_peak_before": before, "matmul_peak_after": after,
            "table_peak_flops": table, "results": rows,
        }, indent=2))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
