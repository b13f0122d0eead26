"""A run's metrics: ``metrics.jsonl``, TensorBoard event files, ``loss.png``, MFU and the progress line.

:class:`MetricsWriter` keeps the run's rows (one JSON object per step, e.g.
``{"step": 100, "train_loss": 3.2, "val_loss": 3.4, "tokens_per_s": ...}``) and
writes them under ``<run_dir>`` through :class:`corpus.storage.Storage`:

* ``metrics.jsonl`` is rewritten whole and atomically at each :meth:`MetricsWriter.flush`
  (an object store cannot append). Call it at every evaluation and before a
  checkpoint: a killed process then loses only the rows since the last flush,
  and a reader never sees half a file. Rows are small (~100 bytes), so logging
  a train row every few steps keeps the rewrite cheap.
* ``tensorboard/`` holds TensorBoard event files (tensorboardX). On a local
  root they are written in place; on ``gs://`` each flush closes the current
  event file and uploads it, and the next rows go to a new one (TensorBoard
  reads every event file of a folder), so each upload carries only new events.
* ``loss.png``: train and validation loss by step, redrawn at each flush.

Resume: ``MetricsWriter(storage, run_dir, resume_step=s)`` keeps the rows of
steps up to ``s`` (the checkpoint the run resumes from) and drops later ones,
which the resumed run is about to produce again, so the curve has no
duplicates; the TensorBoard writer is opened with ``purge_step=s + 1``, which
tells TensorBoard to discard older events from step ``s + 1`` on.
``resume_step=None`` (a fresh start) drops all earlier rows: they belong to an
attempt that left no checkpoint.

Several processes: only process 0 should create a writer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from corpus.storage import Storage

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
PLOT = "loss.png"
TENSORBOARD = "tensorboard"
PEAK_FLOPS_ENV = "JAGPT_PEAK_FLOPS"

# Dense bf16 peak FLOP/s per device, for GPUs, matched as substrings of the
# lower-cased ``device_kind`` (the more specific first). TPUs come from model/tpu_specs.json.
GPU_PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("rtx 3090", 71e12),  # tensor cores with fp32 accumulation (GeForce runs them at half rate)
]
TPU_SPECS = Path(__file__).with_name("tpu_specs.json")
_TPU_KINDS = {"v2": "v2", "v3": "v3", "v4": "v4", "v5 lite": "v5e", "v5e": "v5e", "v5litepod": "v5e",
              "v5": "v5p", "v5p": "v5p", "v6 lite": "v6e", "v6e": "v6e"}


def read_metrics(storage: Storage, run_dir: str) -> list[dict[str, Any]]:
    """The rows of ``<run_dir>/metrics.jsonl`` (none if it does not exist)."""
    rel = posixpath.join(run_dir, METRICS)
    if not storage.exists(rel):
        return []
    rows = []
    for n, line in enumerate(storage.read_text(rel).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{storage.url(rel)} line {n} is not JSON ({e}): {line[:200]!r}") from e
    return rows


def plot_losses(rows: list[dict], path: str) -> None:
    """Train and validation loss by step, as a PNG at local ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    train = [(m["step"], m["train_loss"]) for m in rows if "train_loss" in m]
    val = [(m["step"], m["val_loss"]) for m in rows if "val_loss" in m]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("jagpt training loss")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class MetricsWriter:
    """Rows of a run's metrics, written under ``run_dir`` (see the module doc)."""

    def __init__(
        self,
        storage: Storage,
        run_dir: str,
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
        plot: bool = True,
        flush_every_s: float = 300.0,
    ):
        self.storage, self.run_dir = storage, run_dir
        self.plot, self.flush_every_s = plot, flush_every_s
        old = read_metrics(storage, run_dir)
        self.rows = [r for r in old if resume_step is not None and r.get("step", 0) <= resume_step]
        if len(self.rows) != len(old):
            log.info(
                "metrics: dropped %d rows after step %s of an earlier attempt (kept %d)",
                len(old) - len(self.rows), resume_step, len(self.rows),
            )
            self._write_rows()
        self._last_flush = time.monotonic()
        self._tb = None
        self._tb_dir: str | None = None
        self._purge_step = None if resume_step is None else resume_step + 1
        self._tensorboard = tensorboard
        self._scratch = tempfile.mkdtemp(prefix="jagpt-metrics-")

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- rows --------------------------------------------------------------------------
    def log(self, step: int, **values: Any) -> dict[str, Any]:
        """Record ``values`` at ``step`` (merged into the last row when it is the same step)."""
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update(values)
            row = self.rows[-1]
        else:
            if self.rows and step < self.rows[-1]["step"]:
                raise ValueError(f"metrics for step {step} come after step {self.rows[-1]['step']}")
            row = {"step": step, **values}
            self.rows.append(row)
        if self._tensorboard:
            writer = self._writer()
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    writer.add_scalar(k, v, step)
        if time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()
        return row

    # -- writing -------------------------------------------------------------------------
    def _write_rows(self) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows)
        self.storage.write_text(posixpath.join(self.run_dir, METRICS), text)

    def _writer(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            if self.storage.is_local:
                self._tb_dir = self.storage.path(posixpath.join(self.run_dir, TENSORBOARD))
            else:
                self._tb_dir = tempfile.mkdtemp(dir=self._scratch)
            self._tb = SummaryWriter(self._tb_dir, purge_step=self._purge_step, filename_suffix=f".{uuid.uuid4().hex[:8]}")
            self._purge_step = None  # once: later event files hold only new steps
        return self._tb

    def _flush_tensorboard(self) -> None:
        if self._tb is None:
            return
        if self.storage.is_local:
            self._tb.flush()
            return
        self._tb.close()
        self._tb = None
        for name in sorted(os.listdir(self._tb_dir)):
            with open(os.path.join(self._tb_dir, name), "rb") as f:
                self.storage.write_bytes(posixpath.join(self.run_dir, TENSORBOARD, name), f.read())
        shutil.rmtree(self._tb_dir, ignore_errors=True)

    def flush(self) -> None:
        """Write ``metrics.jsonl``, the TensorBoard events and ``loss.png`` as they are now."""
        self._write_rows()
        self._flush_tensorboard()
        if self.plot and self.rows:
            png = os.path.join(self._scratch, PLOT)
            plot_losses(self.rows, png)
            with open(png, "rb") as f:
                self.storage.write_bytes(posixpath.join(self.run_dir, PLOT), f.read())
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._scratch is None:
            return
        self.flush()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch = None


# -- throughput --------------------------------------------------------------------------


def _tpu_peak(kind: str) -> float | None:
    specs = json.loads(TPU_SPECS.read_text(encoding="utf-8"))["types"]
    key = _TPU_KINDS.get(kind.removeprefix("tpu").strip())
    spec = specs.get(key) if key else None
    if not spec:
        return None
    return spec["peak_bf16_tflops_per_chip"] * 1e12 / spec.get("devices_per_chip", 1)


def peak_flops_per_device(device_kind: str | None = None, override: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device: ``override``, else ``$JAGPT_PEAK_FLOPS``, else the table
    entry for ``device_kind`` (default: ``jax.devices()[0].device_kind``). None when unknown (CPUs:
    give the figure, measured or from the vendor)."""
    if override:
        return float(override)
    if os.environ.get(PEAK_FLOPS_ENV):
        return float(os.environ[PEAK_FLOPS_ENV])
    if device_kind is None:
        import jax

        device_kind = jax.devices()[0].device_kind
    kind = " ".join(device_kind.lower().split())
    if kind.startswith("tpu"):
        return _tpu_peak(kind)
    for pattern, flops in GPU_PEAK_BF16_FLOPS:
        if pattern in kind:
            return flops
    return None


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak_flops_per_device: float | None) -> float | None:
    """Model FLOPs utilization: the model's FLOP/s (tokens/s x FLOPs per token, e.g.
    ``model.step.flops_per_token``) over the devices' peak. None without a peak figure."""
    if not peak_flops_per_device:
        return None
    return tokens_per_s * flops_per_token / (n_devices * peak_flops_per_device)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class Progress:
    """One terminal line per report: step/total, loss, tokens/s, MFU and ETA.

    Tokens/s and MFU are measured over the steps since the previous report;
    the ETA uses the average rate since ``start_step`` (the resumed step).
    """

    def __init__(
        self,
        total_steps: int,
        tokens_per_step: int,
        *,
        start_step: int = 0,
        flops_per_token: float | None = None,
        n_devices: int = 1,
        peak_flops_per_device: float | None = None,
    ):
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_per_token, self.n_devices, self.peak = flops_per_token, n_devices, peak_flops_per_device
        self.start_step = self._last_step = start_step
        self.start_time = self._last_time = time.monotonic()

    def update(self, step: int, loss: float, now: float | None = None) -> dict[str, Any]:
        """The figures at ``step``: tokens_per_s, mfu (None without a peak), eta_s."""
        now = time.monotonic() if now is None else now
        dt, ds = now - self._last_time, step - self._last_step
        tokens_per_s = ds * self.tokens_per_step / dt if dt > 0 and ds > 0 else float("nan")
        elapsed = now - self.start_time
        done = step - self.start_step
        eta = (self.total_steps - step) * elapsed / done if done > 0 else float("nan")
        self._last_step, self._last_time = step, now
        util = mfu(tokens_per_s, self.flops_per_token, self.n_devices, self.peak) if self.flops_per_token else None
        return {"step": step, "loss": loss, "tokens_per_s": tokens_per_s, "mfu": util, "eta_s": eta}

    def line(self, step: int, loss: float, now: float | None = None, figures: dict[str, Any] | None = None) -> str:
        """The report line; ``figures`` is what :meth:`update` returned, if it was already called for ``step``."""
        f = figures if figures is not None else self.update(step, loss, now)
        parts = [
            f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.1f}%)",
            f"loss {loss:.4f}",
            f"{_si(f['tokens_per_s'])} tok/s" if math.isfinite(f["tokens_per_s"]) else "? tok/s",
            f"MFU {100 * f['mfu']:.1f}%" if f["mfu"] is not None and math.isfinite(f["mfu"]) else "MFU n/a",
            f"ETA {format_duration(f['eta_s'])}",
        ]
        return "  ".join(parts)
