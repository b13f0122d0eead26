"""Will a training setup fit, and what will it cost? ``jagpt plan``.

The real train step (``step.jitted_step``) is compiled for a mesh of N
devices from abstract shapes: nothing is allocated. XLA's buffer assignment
(``compiled.memory_analysis()``) gives the bytes each device needs. The
compile runs on CPU in a child process that simulates the N devices
(``--xla_force_host_platform_device_count``), so any machine can plan for a
TPU slice or a GPU it does not have. If the setup does not fit, cheaper
recipes are tried in order and the first that fits is reported. Time and cost
follow from 6·N·D-style FLOPs (``step.flops_per_token``), an assumed MFU and
the TPU table in ``tpu_specs.json``.

XLA:CPU upcasts bfloat16 matmul operands to float32 in places and has no fused
attention kernel, so with bfloat16 compute the temporaries it reports are an
upper bound for GPUs and TPUs. The compile runs with
``--xla_cpu_copy_insertion_use_region_analysis=true`` (see ``compile_recipes``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from model.config import GPT3_PRESETS, PRESETS, preset

SPECS_PATH = Path(__file__).with_name("tpu_specs.json")
# `make test` installs libtpu here, outside site-packages: importable from there, JAX on a
# machine without TPUs would try (and noisily fail) to start it in every process.
LIBTPU_DIR = Path(sys.prefix) / "libtpu"
GPT3_VOCAB = 50257


@dataclasses.dataclass(frozen=True)
class Recipe:
    micro_batch: int  # sequences per data-parallel rank (data x fsdp) per micro-step
    grad_accum: int
    remat: str = "none"
    optimizer: str = "adamw"
    moments: str = "float32"
    compute_dtype: str = "float32"
    loss_chunk: int = 0
    attn_chunk: int = 0
    grad_dtype: str = "float32"

    def describe(self) -> str:
        lean_moments = self.optimizer == "adamw" and self.moments != "float32"
        opt = self.optimizer + (f" ({self.moments} moments)" if lean_moments else "")
        grads = f", {self.grad_dtype} gradients" if self.grad_dtype != "float32" else ""
        return (
            f"{opt}, remat {self.remat}, {self.compute_dtype} compute{grads}, micro-batch {self.micro_batch} x "
            f"grad_accum {self.grad_accum}, loss_chunk {self.loss_chunk}, attn_chunk {self.attn_chunk}"
        )


def parse_bytes(text: str) -> int:
    """``16GiB``, ``24 GiB``, ``80GB``, ``512MiB`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (try 16GiB or 80GB)")
    unit = (m.group(2) or "B").upper().rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def tpu_specs() -> dict:
    return json.loads(SPECS_PATH.read_text(encoding="utf-8"))


def tpu_slice(name: str) -> dict:
    """``v4-8`` -> chips, devices and per-device HBM of that slice."""
    m = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", name.strip().lower())
    specs = tpu_specs()["types"]
    if not m or m.group(1) not in specs:
        raise ValueError(f"unknown TPU slice {name!r}; types: {', '.join(specs)} (e.g. v4-8, v5e-16)")
    kind, count = m.group(1), int(m.group(2))
    spec = specs[kind]
    chips = count // 2 if spec["name_counts"] == "cores" else count
    devices = chips * spec["devices_per_chip"]
    return {
        "type": kind, "chips": chips, "devices": devices,
        "device_memory": int(spec["hbm_gib_per_chip"] * 2**30 / spec["devices_per_chip"]), **spec,
    }


def tpu_topology(name: str) -> str:
    """``v3-8`` -> the topology name the XLA TPU compiler takes (``v3:2x2``)."""
    tpu_slice(name)
    topologies = tpu_specs()["topologies"]
    if name.strip().lower() not in topologies:
        raise ValueError(f"no TPU topology is known for {name!r}; --compiler tpu knows {', '.join(topologies)}")
    return topologies[name.strip().lower()]


def cheaper(recipe: Recipe, seq_len: int) -> list[Recipe]:
    """The ladder tried when ``recipe`` does not fit; each step keeps the ones before it.

    Same global batch throughout: halving the micro-batch doubles grad_accum.
    """
    out, r = [], recipe

    def step(**change):
        nonlocal r
        nxt = dataclasses.replace(r, **change)
        if nxt != r:
            out.append(nxt)
            r = nxt

    if r.remat == "none":
        step(remat="dots_saveable")
    step(remat="full")
    step(compute_dtype="bfloat16")
    step(loss_chunk=r.loss_chunk or _divisor(seq_len, 256), attn_chunk=r.attn_chunk or _divisor(seq_len, 512))
    if r.optimizer == "adamw" and r.moments == "float32":
        step(moments="bfloat16")
    while r.micro_batch > 1 and r.micro_batch % 2 == 0:
        step(micro_batch=r.micro_batch // 2, grad_accum=r.grad_accum * 2)
    step(grad_dtype="bfloat16")
    if r.optimizer == "adamw":
        step(moments="int8")
    step(optimizer="adafactor", moments="float32")
    return out


def _divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` not above ``at_most`` (0 when that is n itself)."""
    d = max(k for k in range(1, min(n, at_most) + 1) if n % k == 0)
    return 0 if d == n else d


def _compile(job: dict) -> dict:
    """Compile the train step for one recipe in this process (which has the devices)."""
    import jax
    import jax.numpy as jnp

    from model import sharding, step

    cfg = preset(job["preset"], vocab_size=job["vocab"], seq_len=job["context"])
    r = Recipe(**job["recipe"])
    settings = step.OptimSettings(
        optimizer=r.optimizer, moments=r.moments, grad_dtype=r.grad_dtype, grad_accum=r.grad_accum, remat=r.remat,
        compute_dtype=r.compute_dtype, loss_chunk=r.loss_chunk, attn_chunk=r.attn_chunk,
    )
    if job.get("topology"):
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(platform="tpu", topology_name=job["topology"]).devices
        mesh = sharding.make_mesh(**job["mesh"], devices=devices)
    else:
        mesh = sharding.make_mesh(**job["mesh"])
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = r.micro_batch * replicas * r.grad_accum
    step.check_batch(cfg, settings, mesh, batch, job["seq_len"])
    start = time.monotonic()
    graphdef, state, _ = step.abstract_train_state(cfg, settings, mesh)
    tokens = jax.ShapeDtypeStruct(
        (r.grad_accum, r.micro_batch * replicas, job["seq_len"]), jnp.int32, sharding=sharding.batch_sharding(mesh, 3)
    )
    with jax.set_mesh(mesh):
        lowered = step.jitted_step.lower(graphdef, state, tokens, tokens)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            # The TPU compiler refuses a program that does not fit its HBM.
            return {"out_of_memory": str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0],
                    "compile_s": round(time.monotonic() - start, 1), "batch_sequences": batch}
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    if job.get("topology"):
        peak = m.peak_memory_in_bytes  # the TPU compiler's own figure; the sum above counts buffers it reuses
    return {
        "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
        "code_bytes": m.generated_code_size_in_bytes, "peak_bytes": peak + m.generated_code_size_in_bytes,
        "compile_s": round(time.monotonic() - start, 1), "batch_sequences": batch,
    }


def _child() -> None:
    """``python -m model.plan --child``: compile the recipes on stdin in order, stop at the first that fits."""
    jobs = json.loads(sys.stdin.read())
    for job in jobs:
        try:
            result = {"recipe": job["recipe"], **_compile(job)}
            result["fits"] = "out_of_memory" not in result and result["peak_bytes"] <= job["limit_bytes"]
        except ValueError as e:
            result = {"recipe": job["recipe"], "error": str(e), "fits": False}
        print(json.dumps(result), flush=True)
        if result["fits"]:
            return


def _libtpu_path() -> str | None:
    """'' when libtpu is importable as installed, ``LIBTPU_DIR`` when it is there, else None."""
    if importlib.util.find_spec("libtpu") is not None:
        return ""
    return str(LIBTPU_DIR) if (LIBTPU_DIR / "libtpu").is_dir() else None


def compile_recipes(jobs: list[dict], devices: int, timeout_s: float = 1800) -> list[dict]:
    """Run ``_child`` with ``devices`` simulated CPU devices; one result per recipe tried."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"  # the TPU compiler needs no TPU backend
    if any(job.get("topology") for job in jobs) and _libtpu_path():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_libtpu_path(), env.get("PYTHONPATH")]))
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    # Without region analysis XLA:CPU copies every same-shaped array carried through the
    # per-layer optimizer loop (a parameter-sized copy per AdamW moment).
    env["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={devices} --xla_cpu_copy_insertion_use_region_analysis=true"
    ).strip()
    proc = subprocess.run(
        [sys.executable, "-m", "model.plan", "--child"], input=json.dumps(jobs), capture_output=True, text=True,
        env=env, timeout=timeout_s, cwd=str(Path(__file__).resolve().parent.parent),
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not results:
        raise RuntimeError(f"the planner's compile failed:\n{proc.stderr[-3000:]}")
    return results


def plan(
    preset_name: str, devices: int, device_memory: int, mesh: dict[str, int], *, micro_batch: int = 1,
    grad_accum: int | None = None, remat: str = "none", optimizer: str = "adamw", moments: str = "float32",
    grad_dtype: str = "float32", compute_dtype: str = "float32", loss_chunk: int = 0, attn_chunk: int = 0,
    seq_len: int | None = None,
    vocab: int = GPT3_VOCAB, batch_tokens: int | None = None, headroom: float = 0.05, mfu: float = 0.4,
    tokens: float = 300e9, tpu: str | None = None, peak_tflops: float | None = None, try_cheaper: bool = True,
    compiler: str = "cpu",
) -> dict:
    """The report for one setup (a dict; ``format_report`` prints it).

    ``compiler``: ``cpu`` compiles with XLA:CPU for ``devices`` simulated CPU
    devices; ``tpu`` with the XLA TPU compiler of libtpu for the ``tpu``
    slice's topology, which needs no TPU (MaxText's ahead-of-time compile).
    """
    from model import step

    topology = None
    if compiler == "tpu":
        if not tpu:
            raise ValueError("--compiler tpu plans for a TPU slice: give --tpu (e.g. v3-8)")
        topology = tpu_topology(tpu)
        if _libtpu_path() is None:
            raise ValueError(
                f"--compiler tpu needs libtpu, the version jax[tpu] pins, importable or in {LIBTPU_DIR} "
                "(`make libtpu` puts it there)"
            )
    elif compiler != "cpu":
        raise ValueError(f"unknown compiler {compiler!r}: cpu or tpu")

    key = preset_name.lower()
    if key not in PRESETS:
        raise ValueError(f"unknown model preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    cfg = preset(key, vocab_size=vocab)
    T = seq_len or cfg.seq_len
    if mesh["data"] * mesh["fsdp"] * mesh["tensor"] != devices:
        raise ValueError(f"mesh {mesh} has {mesh['data'] * mesh['fsdp'] * mesh['tensor']} devices, not {devices}")
    replicas = mesh["data"] * mesh["fsdp"]
    batch_tokens = batch_tokens or PRESETS[key][3]
    if grad_accum is None:
        grad_accum = max(1, round(batch_tokens / (T * micro_batch * replicas)))
    recipe = Recipe(
        micro_batch, grad_accum, remat=remat, optimizer=optimizer, moments=moments, compute_dtype=compute_dtype,
        loss_chunk=loss_chunk, attn_chunk=attn_chunk, grad_dtype=grad_dtype,
    )
    settings = step.OptimSettings(
        optimizer=optimizer, moments=moments, grad_dtype=grad_dtype, grad_accum=grad_accum, remat=remat,
        compute_dtype=compute_dtype, loss_chunk=loss_chunk, attn_chunk=attn_chunk,
    )
    step.check_config(cfg, settings, mesh)
    step.check_batch(cfg, settings, mesh, micro_batch * replicas * grad_accum, T)
    limit = int(device_memory * (1 - headroom))
    ladder = [recipe, *(cheaper(recipe, T) if try_cheaper else [])]
    jobs = [
        {"preset": key, "vocab": vocab, "context": cfg.seq_len, "seq_len": T, "mesh": mesh,
         "recipe": dataclasses.asdict(r), "limit_bytes": limit, "topology": topology}
        for r in ladder
    ]
    tried = compile_recipes(jobs, devices)
    fitting = next((t for t in tried if t["fits"]), None)

    fpt = step.flops_per_token(cfg, T)
    total_flops = fpt * tokens
    report = {
        "preset": key, "params": cfg.n_params(), "vocab": vocab, "seq_len": T, "devices": devices, "mesh": mesh,
        "compiler": compiler, "topology": topology,
        "device_memory_bytes": device_memory, "headroom": headroom, "limit_bytes": limit,
        "requested": tried[0], "fits": tried[0]["fits"], "first_fit": fitting, "tried": tried,
        "flops_per_token": fpt, "tokens": tokens, "total_flops": total_flops, "mfu": mfu,
        "batch_tokens": recipe.micro_batch * replicas * recipe.grad_accum * T,
    }
    if peak_tflops:
        seconds = total_flops / (devices * peak_tflops * 1e12 * mfu)
        report["time_on_devices_s"] = seconds
    specs = tpu_specs()
    rows = []
    for kind, spec in specs["types"].items():
        if tpu and not tpu.lower().startswith(kind + "-"):
            continue
        chips = tpu_slice(tpu)["chips"] if tpu else max(1, devices // spec["devices_per_chip"])
        seconds = total_flops / (chips * spec["peak_bf16_tflops_per_chip"] * 1e12 * mfu)
        hours = seconds / 3600
        rows.append({
            "type": kind, "chips": chips, "days": hours / 24,
            "on_demand_usd": hours * chips * spec["on_demand_usd_per_chip_hour"],
            "spot_usd": hours * chips * spec["spot_usd_per_chip_hour"],
        })
    report["tpu"] = rows
    report["prices_as_of"] = specs["prices_as_of"]
    report["prices_source"] = specs["prices_source"]
    return report


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def format_report(r: dict) -> str:
    lines = [
        f"{'GPT-3 ' if r['preset'] in GPT3_PRESETS else ''}{r['preset']}: "
        + (f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e9 else f"{r['params'] / 1e6:.1f}M")
        + f" parameters (vocab {r['vocab']}), seq_len {r['seq_len']}, "
        f"{r['devices']} device(s) of {r['device_memory_bytes'] / 2**30:.1f} GiB, mesh "
        + " ".join(f"{k}={v}" for k, v in r["mesh"].items()),
        f"limit per device: {_gb(r['limit_bytes'])} ({r['headroom']:.0%} headroom)",
        "compiled by: " + (
            f"the XLA TPU compiler (libtpu) for topology {r['topology']}, peak from its buffer assignment"
            if r.get("compiler") == "tpu" else f"XLA:CPU, simulating {r['devices']} device(s)"
        ),
        "",
    ]
    for t in r["tried"]:
        recipe = Recipe(**t["recipe"])
        if "error" in t:
            lines.append(f"- {recipe.describe()}\n    rejected: {t['error']}")
            continue
        if "out_of_memory" in t:
            lines.append(f"- {recipe.describe()}\n    does not fit, says the compiler: {t['out_of_memory']}")
            continue
        verdict = "FITS" if t["fits"] else "does not fit"
        parts = (
            f"arguments {_gb(t['argument_bytes'])}, temporaries {_gb(t['temp_bytes'])}, peak"
            if r.get("compiler") == "tpu" else
            f"arguments {_gb(t['argument_bytes'])} + temporaries {_gb(t['temp_bytes'])} + outputs "
            f"{_gb(t['output_bytes'])} - aliased {_gb(t['alias_bytes'])} ="
        )
        lines.append(
            f"- {recipe.describe()}\n"
            f"    per device: {parts} {_gb(t['peak_bytes'])} "
            f"({t['peak_bytes'] / r['device_memory_bytes']:.0%} of the device): {verdict} "
            f"[{t['batch_sequences']} sequences per step, compiled in {t['compile_s']} s]"
        )
    if r["fits"]:
        lines.append("\nthe requested setup fits.")
    elif r["first_fit"]:
        lines.append(f"\ndoes not fit as asked; the first cheaper recipe that fits: {Recipe(**r['first_fit']['recipe']).describe()}")
    else:
        lines.append("\nneither the requested setup nor any recipe on the ladder fits: add devices or memory.")
    lines.append(
        f"\ncompute: {r['flops_per_token'] / 1e9:.2f} GFLOP per token (6N + 12·L·d·T) x {r['tokens']:.3g} tokens = "
        f"{r['total_flops']:.3g} FLOP; at MFU {r['mfu']:.0%}:"
    )
    if "time_on_devices_s" in r:
        lines.append(f"  on these {r['devices']} device(s): {r['time_on_devices_s'] / 86400:.1f} days")
    for row in r["tpu"]:
        lines.append(
            f"  TPU {row['type']:<4} x {row['chips']:>4} chips: {row['days']:9.1f} days, "
            f"${row['on_demand_usd']:,.0f} on demand, ${row['spot_usd']:,.0f} spot"
        )
    lines.append(f"  (prices as of {r['prices_as_of']}, {r['prices_source']}; see model/tpu_specs.json)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    if (argv or sys.argv[1:]) == ["--child"]:
        _child()
        return
    raise SystemExit("use `jagpt plan`")


if __name__ == "__main__":
    main()
