"""The training loop: exact resume after SIGKILL and SIGTERM, NaN stops, and the stage's step.

Each run trains the tiny preset for a few steps on shards made from the
sample site's prose. An interrupted run, resumed, must end with exactly the
parameters and the loss curve of a run never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from corpus.storage import Storage
from encoder.bpe import EncoderSettings, train as train_encoder
from encoder.shards import ShardSettings, build_shards
from model.checkpoint import restore_model
from model.metrics import read_metrics
from model.train import TrainSettings, model_config_of, train
from tests.test_mixture import NEWS, NOVEL
from tests.test_shards import write_links

SETTINGS = TrainSettings(steps=12, seq_len=32, batch_size=8, warmup_steps=2, eval_every=4, eval_batches=2,
                         checkpoint_every=4, log_every=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN_SCRIPT = """
import json, sys
from corpus.storage import Storage
from model.checkpoint import install_sigterm_handler
from model.train import Preempted, TrainSettings, train
root, shards, out, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
with install_sigterm_handler() as stop:
    try:
        train(Storage(root), shards, TrainSettings(**settings), out, stop=stop)
    except Preempted as e:
        print(e, flush=True)
        sys.exit(75)
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    storage = Storage(str(tmp_path_factory.mktemp("train")))
    files = write_links(storage, [NOVEL, NEWS])
    encoder = train_encoder(NOVEL + NEWS, EncoderSettings(vocab_size=1200), "tok-train")
    build_shards(storage, files, encoder, ShardSettings(shard_tokens=4000, val_fraction=0.15, workers=1), "shards/s", "c")
    return storage


@pytest.fixture(scope="module")
def uninterrupted(shards):
    stats = train(shards, "shards/s", SETTINGS, "runs/whole")
    return stats


def curve(storage: Storage, run: str) -> list[dict]:
    """The metrics rows without the timing figures, which differ from run to run."""
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in read_metrics(storage, run)]


def params(storage: Storage, run: str, step: int) -> dict:
    cfg = model_config_of(storage, run)
    model = restore_model(storage.path(f"{run}/checkpoints/{step}"), cfg)
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_run(storage: Storage, run: str, reference: str = "runs/whole") -> None:
    assert curve(storage, run) == curve(storage, reference)
    mine, theirs = params(storage, run, SETTINGS.steps), params(storage, reference, SETTINGS.steps)
    assert mine.keys() == theirs.keys()
    for k in mine:
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)


def start(storage: Storage, out: str, settings: TrainSettings = SETTINGS) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, storage.root, "shards/s", out, json.dumps(settings.model_dump())],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for_checkpoint(storage: Storage, out: str, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.isdir(storage.path(f"{out}/checkpoints/{step}")):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoint {step} within {timeout} s")
        time.sleep(0.05)


def test_an_uninterrupted_run_learns_and_records_everything(shards, uninterrupted):
    rows = read_metrics(shards, "runs/whole")
    assert [r["step"] for r in rows] == list(range(SETTINGS.steps + 1))
    vals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in vals] == [0, 4, 8, 12]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert all(r["val_bits_per_char"] > 0 and r["val_ppl"] > 1 for r in vals)
    assert uninterrupted["final_val_loss"] == round(vals[-1]["val_loss"], 4)
    assert shards.read_bytes("runs/whole/loss.png").startswith(b"\x89PNG")
    assert sorted(int(n) for n in os.listdir(shards.path("runs/whole/checkpoints")) if n.isdigit()) == [4, 8, 12]


def test_a_run_killed_with_sigkill_resumes_exactly(shards, uninterrupted):
    proc = start(shards, "runs/killed")
    wait_for_checkpoint(shards, "runs/killed", 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    train(shards, "shards/s", SETTINGS, "runs/killed")  # resumes from the newest complete checkpoint
    assert_same_run(shards, "runs/killed")


def test_sigterm_saves_and_exits_then_the_run_resumes_exactly(shards, uninterrupted):
    proc = start(shards, "runs/preempted")
    wait_for_checkpoint(shards, "runs/preempted", 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert "preempted at step" in out
    stopped = int(out.split("preempted at step ")[1].split(":")[0])
    assert os.path.isdir(shards.path(f"runs/preempted/checkpoints/{stopped}"))  # saved where it stopped
    train(shards, "shards/s", SETTINGS, "runs/preempted")
    assert_same_run(shards, "runs/preempted")


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(shards, uninterrupted, caplog):
    proc = start(shards, "runs/corrupt")
    wait_for_checkpoint(shards, "runs/corrupt", 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_dir = shards.path("runs/corrupt/checkpoints/8/model")
    victim = max((os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        f.write(b"\xff" * 64)
    caplog.set_level("WARNING")
    train(shards, "shards/s", SETTINGS, "runs/corrupt")
    assert "step 8" in caplog.text
    assert_same_run(shards, "runs/corrupt")


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shards):
    wild = SETTINGS.model_copy(update={"lr": 1e12, "warmup_steps": 0, "checkpoint_every": 1, "grad_clip": 1e12})
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train(shards, "shards/s", wild, "runs/nan")
    saved = sorted(int(n) for n in os.listdir(shards.path("runs/nan/checkpoints")) if n.isdigit())
    assert saved and all(np.isfinite(v).all() for v in params(shards, "runs/nan", saved[-1]).values())


def test_an_impossible_config_is_rejected_before_compiling(shards):
    with pytest.raises(ValueError, match="not divisible"):
        train(shards, "shards/s", SETTINGS.model_copy(update={"batch_size": 6, "grad_accum": 4}), "runs/bad")
    with pytest.raises(ValueError, match="devices"):
        train(shards, "shards/s", SETTINGS.model_copy(update={"mesh": "fsdp=2"}), "runs/bad")
    assert not shards.exists("runs/bad/checkpoints")
