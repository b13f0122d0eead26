import math
import os
import struct

import pytest

from corpus.storage import Storage
from model.metrics import MetricsWriter, Progress, format_duration, mfu, peak_flops_per_device, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def events(folder) -> list:
    """Every event of the event files in ``folder`` (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(os.listdir(folder)):
        data, pos = open(os.path.join(folder, name), "rb").read(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            out.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
    return out


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for event in events(folder):
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_rows_are_written_merged_by_step_and_read_back(tmp_path):
    storage = Storage(str(tmp_path))
    with MetricsWriter(storage, "runs/r") as m:
        m.log(0, val_loss=4.0)
        m.log(1, train_loss=3.9)
        m.log(2, train_loss=3.5, tokens_per_s=1000.0)
        m.log(2, val_loss=3.6)  # the evaluation at the same step joins its row
        m.flush()
        assert read_metrics(storage, "runs/r") == [
            {"step": 0, "val_loss": 4.0},
            {"step": 1, "train_loss": 3.9},
            {"step": 2, "train_loss": 3.5, "tokens_per_s": 1000.0, "val_loss": 3.6},
        ]
        with pytest.raises(ValueError, match="step 1 come after step 2"):
            m.log(1, train_loss=1.0)
    png = (tmp_path / "runs/r/loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 2000
    scalars = tensorboard_scalars(str(tmp_path / "runs/r/tensorboard"))
    assert scalars["train_loss"] == [(1, pytest.approx(3.9)), (2, pytest.approx(3.5))]
    assert scalars["val_loss"] == [(0, 4.0), (2, pytest.approx(3.6))]


def test_unflushed_rows_are_lost_but_flushed_ones_survive(tmp_path):
    storage = Storage(str(tmp_path))
    m = MetricsWriter(storage, "r", tensorboard=False, plot=False)
    m.log(1, train_loss=2.0)
    m.flush()
    m.log(2, train_loss=1.0)  # the process dies here, before the next flush
    assert read_metrics(storage, "r") == [{"step": 1, "train_loss": 2.0}]


def test_resume_drops_the_rows_after_the_checkpoint(tmp_path):
    storage = Storage(str(tmp_path))
    with MetricsWriter(storage, "r") as m:
        for step in range(1, 8):
            m.log(step, train_loss=10.0 - step)
    # the run resumes from its checkpoint at step 4: steps 5-7 are redone
    with MetricsWriter(storage, "r", resume_step=4) as m:
        assert [r["step"] for r in read_metrics(storage, "r")] == [1, 2, 3, 4]  # truncated at once
        for step in range(5, 9):
            m.log(step, train_loss=20.0 - step)
    rows = read_metrics(storage, "r")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[4]["train_loss"] == 15.0  # the new run's value, not the dropped one
    # TensorBoard: the resumed writer marks step 5 as the purge point for the older events
    starts = [e.step for e in events(tmp_path / "r/tensorboard") if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [5]
    # a fresh start (no checkpoint) keeps nothing of an earlier attempt
    MetricsWriter(storage, "r", tensorboard=False).close()
    assert read_metrics(storage, "r") == []


def test_rows_and_event_files_reach_gcs(gcs_root):
    root, options = gcs_root
    storage = Storage(root, options)
    with MetricsWriter(storage, "runs/r") as m:
        m.log(1, train_loss=3.0)
        m.flush()
        m.log(2, train_loss=2.0, val_loss=2.5)
    assert [r["step"] for r in read_metrics(storage, "runs/r")] == [1, 2]
    events = storage.listdir("runs/r/tensorboard")
    assert len(events) == 2 and all(n.startswith("events.out.tfevents.") for n in events)  # one file per flush
    assert storage.read_bytes("runs/r/loss.png").startswith(PNG_MAGIC)


def test_mfu_arithmetic():
    # 10k tokens/s x 6e9 FLOPs per token = 6e13 FLOP/s, on 2 devices of 100 TFLOP/s = 30%
    assert mfu(10_000, 6e9, 2, 100e12) == pytest.approx(0.3)
    assert mfu(10_000, 6e9, 2, None) is None


def test_peak_flops_by_device_kind_and_override(monkeypatch):
    monkeypatch.delenv("JAGPT_PEAK_FLOPS", raising=False)
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_per_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_per_device("NVIDIA H200") == 989e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops_per_device("NVIDIA GeForce RTX 3090") == 71e12
    assert peak_flops_per_device("TPU v4") == 275e12
    assert peak_flops_per_device("TPU v5 lite") == 197e12
    assert peak_flops_per_device("TPU v5p") == 459e12
    assert peak_flops_per_device("TPU v6 lite") == 918e12
    assert peak_flops_per_device("TPU v3") == 61.5e12  # a v3 chip is two JAX devices
    assert peak_flops_per_device("cpu") is None
    assert peak_flops_per_device("cpu", override=1e12) == 1e12
    monkeypatch.setenv("JAGPT_PEAK_FLOPS", "2.5e12")
    assert peak_flops_per_device("NVIDIA H100 80GB HBM3") == 2.5e12


def test_progress_line():
    p = Progress(total_steps=1000, tokens_per_step=4096, start_step=100, flops_per_token=1e9, n_devices=2,
                 peak_flops_per_device=1e13)
    p.start_time = p._last_time = 0.0
    # 100 steps of 4096 tokens in 10 s: 40960 tok/s, x 1e9 FLOPs per token over 2 devices x 1e13 FLOP/s
    f = p.update(200, 2.5, now=10.0)
    assert f["tokens_per_s"] == pytest.approx(40960) and f["mfu"] == pytest.approx(40960 * 1e9 / 2e13)
    assert f["eta_s"] == pytest.approx(800 * 10.0 / 100)
    line = p.line(300, 2.25, now=30.0)  # 100 steps in 20 s since the last report
    assert line.startswith("step 300/1000 (30.0%)  loss 2.2500  20.5k tok/s  MFU 102.4%  ETA ")
    assert line.endswith("ETA 1m45s")  # 700 steps left at 200 steps per 30 s
    no_peak = Progress(10, 100)
    assert "MFU n/a" in no_peak.line(1, 1.0)
    assert format_duration(3 * 3600 + 5 * 60) == "3h05m" and format_duration(math.nan) == "?"
