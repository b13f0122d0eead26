"""Generation speed on the current device: prompt processing and generation, for the tiny and 125M presets.

For each preset (randomly initialized: speed does not depend on the weights)
it measures, with batch 1 and after compiling:

* **prompt**: one prefill of a ``--prompt-tokens`` prompt (the cache's
  bucket), tokens per second;
* **generate**: the whole sampling loop (``model.decode.Decoder.generate``:
  decode step, top-k sampling, the host reading each token), tokens per
  second over ``--new-tokens`` tokens after the first;

  each the fastest of ``--repeats`` runs (the machine may be shared);
* **flat**: the time per token as the host receives it, at positions
  101-132 (from a 100-token prompt) and 901-932 (from a 900-token prompt),
  both in the cache bucket of 1024 slots that a generation from position 100
  to 932 uses; the median per round, the fastest of ``--rounds`` alternating
  rounds (the machine may be shared), and their ratio. With the key/value
  cache a token costs the same at any position of a bucket; the check is a
  ratio of at most 1.5. The CPU share is the benchmark's CPU time over
  the wall time of these rounds and the cores (near 100%: undisturbed);
* **no cache**: for contrast, the time of one forward pass over the whole
  context, which is what each new token cost before the cache.

    .venv/bin/python bench/generate.py                 # both presets
    .venv/bin/python bench/generate.py --presets tiny --json out.json

Exits 1 when a flatness ratio is over 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from model.config import preset  # noqa: E402
from model.decode import Decoder, Sampling, bucket, candidates, prefill  # noqa: E402
from model.gpt import GPT  # noqa: E402

NAMES = {"tiny": "tiny", "125M": "small"}
FLAT_FROM, FLAT_TO, FLAT_SPAN = 100, 900, 32


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def measure(label: str, vocab: int, prompt_tokens: int, new_tokens: int, repeats: int, dtype: str, rounds: int) -> dict:
    cfg = preset(NAMES[label], vocab_size=vocab, seq_len=2048 if label == "125M" else 1024)
    model = GPT(cfg, nnx.Rngs(0), compute_dtype=dtype)
    decoder = Decoder(model)
    rng = np.random.default_rng(0)
    eot = 0

    # prompt processing: the prefill program alone
    prompt = rng.integers(1, vocab, prompt_tokens).astype(np.int32)[None]
    cache_len = bucket(prompt_tokens + new_tokens, cfg.seq_len)
    knobs = (jnp.float32(1.0), jnp.int32(40), jnp.float32(1.0), jnp.int32(eot), jnp.bool_(False))
    keys = jax.random.PRNGKey(0)[None]

    def run_prefill():
        return prefill(decoder.params, prompt, jnp.int32(prompt_tokens), keys, *knobs, n_head=cfg.n_head,
                       dtype=decoder.dtype, cache_len=cache_len, k_cap=candidates(40, vocab))[0]

    start = time.perf_counter()
    jax.block_until_ready(run_prefill())
    compile_prefill = time.perf_counter() - start
    t_prompt = timed(run_prefill, repeats)

    # generation: the whole loop, as `jagpt generate` runs it
    ids = prompt[0].tolist()
    min_new = Sampling(temperature=1.0, top_k=40, min_new_tokens=new_tokens)
    start = time.perf_counter()
    list(decoder.generate(ids, new_tokens, eot, min_new))  # compiles
    compile_generate = time.perf_counter() - start
    t_gen = []
    for _ in range(repeats):
        start = time.perf_counter()
        first = None
        for n, _ in enumerate(decoder.generate(ids, new_tokens, eot, min_new)):
            if n == 0:
                first = time.perf_counter()
        t_gen.append((time.perf_counter() - first) / (new_tokens - 1))
    per_token = min(t_gen)

    # flatness: the time per token at positions 100-132 and 900-932, in the same cache bucket (1024 slots,
    # as a generation from position 100 to 932 has): alternating rounds, the least disturbed round kept
    flat = Sampling(temperature=1.0, top_k=40, min_new_tokens=FLAT_TO + FLAT_SPAN)
    cpu0, wall0 = os.times(), time.perf_counter()

    def gaps(prompt_len: int, max_new: int) -> float:
        stamps = []
        for _ in decoder.generate(rng.integers(1, vocab, prompt_len).tolist(), max_new, eot, flat):
            stamps.append(time.perf_counter())
            if len(stamps) > FLAT_SPAN:
                break
        return float(np.median(np.diff(stamps)))

    span = FLAT_TO + FLAT_SPAN - FLAT_FROM
    assert bucket(FLAT_FROM + span, cfg.seq_len) == bucket(FLAT_TO + FLAT_SPAN, cfg.seq_len)
    gaps(FLAT_FROM, span), gaps(FLAT_TO, FLAT_SPAN)  # compile
    early, late = [], []
    for _ in range(rounds):
        early.append(gaps(FLAT_FROM, span))
        late.append(gaps(FLAT_TO, FLAT_SPAN))
    cpu1, wall1 = os.times(), time.perf_counter()
    share = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / (wall1 - wall0) / (os.cpu_count() or 1)
    early, late = min(early), min(late)

    # before the cache: the whole context's forward pass per token
    forward = nnx.jit(lambda m, x: m(x))
    window = np.zeros((1, cfg.seq_len), np.int32)
    jax.block_until_ready(forward(model, window))
    t_full = timed(lambda: forward(model, window), max(1, min(repeats, 3)))

    return {
        "preset": label, "params": cfg.n_params(), "n_layer": cfg.n_layer, "d_model": cfg.d_model, "context": cfg.seq_len,
        "vocab": vocab, "dtype": dtype, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "prompt_tokens_per_s": prompt_tokens / t_prompt, "generate_tokens_per_s": 1.0 / per_token,
        "ms_per_token": per_token * 1e3, "ms_per_token_at_100": early * 1e3, "ms_per_token_at_900": late * 1e3,
        "flat_ratio": late / early, "flat_cpu_share": share, "no_cache_ms_per_token": t_full * 1e3,
        "compile_s": {"prefill": round(compile_prefill, 1), "generate": round(compile_generate, 1)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(NAMES), choices=list(NAMES))
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (the encoder's default)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the flatness measurement (the fastest is kept)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} ({jax.device_count()} device(s)), "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}", flush=True)
    rows = []
    for label in args.presets:
        row = measure(label, args.vocab, args.prompt_tokens, args.new_tokens, args.repeats, args.dtype, args.rounds)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    header = ("preset", "params", "prompt tok/s", "generate tok/s", "ms/token @100", "ms/token @900", "ratio",
              "no-cache ms/token", "CPU share")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['prompt_tokens_per_s']:,.0f} | "
              f"{r['generate_tokens_per_s']:,.1f} | "
              f"{r['ms_per_token_at_100']:.2f} | {r['ms_per_token_at_900']:.2f} | {r['flat_ratio']:.2f} | "
              f"{r['no_cache_ms_per_token']:,.1f} | {100 * r['flat_cpu_share']:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": f"{device.platform} {device.device_kind}", "cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    bad = [r["preset"] for r in rows if r["flat_ratio"] > 1.5]
    if bad:
        print(f"FAIL: time per token at position 900 is over 1.5x that at 100 for {', '.join(bad)}")
        return 1
    print("ok: the time per generated token at position 900 is within 1.5x of that at position 100")
    return 0


if __name__ == "__main__":
    sys.exit(main())
