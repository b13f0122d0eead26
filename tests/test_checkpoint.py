import logging
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from corpus.storage import Storage
from model.checkpoint import (
    CheckpointMismatch,
    Checkpoints,
    NoRestorableCheckpoint,
    abstract_like,
    checksums,
    fetch,
    fingerprint,
    install_sigterm_handler,
    pure_state,
    restore_model,
    save,
)
from model.config import preset
from model.gpt import GPT

# A failed restore leaves orbax's read coroutines unawaited; Python reports them at garbage collection.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CFG = preset("tiny", vocab_size=64, seq_len=16)
FP = fingerprint(CFG, "tok-a")


def train_state(seed: int) -> tuple[dict, dict]:
    """A model's and its AdamW optimizer's state after one update (moments and count nonzero)."""
    model = GPT(CFG, nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (seed + 1)), nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    return pure_state(model), pure_state(optimizer)


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def damage(step_dir: str, how: str) -> str:
    """Truncate or flip bytes in the middle of the largest file of a step's model item."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "model")) for f in fs]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        mid = len(data) // 2
        data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    open(path, "wb").write(bytes(data))
    return path


@pytest.fixture(scope="module")
def states():
    return {step: train_state(step) for step in (1, 2, 3)}


def test_round_trip_is_exact_and_carries_the_loader_state(tmp_path, states):
    model, opt = states[1]
    loader = {"step": 1, "seed": 0, "shard_set": "abc"}
    with Checkpoints(Storage(str(tmp_path)), "runs/r/checkpoints", FP, max_to_keep=2) as ckpt:
        assert ckpt.latest_restorable(abstract_like(model), abstract_like(opt)) is None  # nothing saved yet
        assert ckpt.save(1, model, opt, loader=loader, extra={"tokens_seen": 512})
        assert not ckpt.save(1, model, opt, loader=loader)  # a step is written once
    assert os.path.isdir(tmp_path / "runs/r/checkpoints/1/model")
    with Checkpoints(Storage(str(tmp_path)), "runs/r/checkpoints", FP) as ckpt:
        restored = ckpt.latest_restorable(abstract_like(model), abstract_like(opt))
    assert restored.step == 1 and restored.loader == loader and restored.meta["tokens_seen"] == 512
    assert_trees_equal(restored.model, model)
    assert_trees_equal(restored.optimizer, opt)
    assert int(restored.optimizer["step"]) == 1


def test_restores_into_the_targets_shardings(tmp_path, states):
    model, opt = states[1]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with Checkpoints(Storage(str(tmp_path)), "c", FP) as ckpt:
        ckpt.save(1, model, opt)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), model)
        restored = ckpt.restore(1, target)
    assert restored.optimizer is None  # only the model was asked for
    assert all(x.sharding == replicated for x in jax.tree.leaves(restored.model))
    assert_trees_equal(restored.model, model)


SHARDED = textwrap.dedent(
    """
    import os, sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from corpus.storage import Storage
    from model.checkpoint import Checkpoints

    assert jax.device_count() == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    w = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    state = {"w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))), "b": jax.numpy.ones(4)}
    with Checkpoints(Storage(sys.argv[1]), "c", None) as ckpt:
        ckpt.save(7, state)
        # restore with another layout: rows over all four devices
        target = {
            "w": jax.ShapeDtypeStruct((8, 6), np.float32, sharding=NamedSharding(mesh, P(("data", "model"), None))),
            "b": jax.ShapeDtypeStruct((4,), np.float32, sharding=NamedSharding(mesh, P())),
        }
        got = ckpt.latest_restorable(target)
    assert got.step == 7
    assert got.model["w"].sharding.spec == P(("data", "model"), None)
    assert [s.data.shape for s in got.model["w"].addressable_shards] == [(2, 6)] * 4
    np.testing.assert_array_equal(np.asarray(got.model["w"]), w)
    print("sharded restore ok")
    """
)


def test_restores_a_sharded_state_into_another_sharding(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", SHARDED, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sharded restore ok" in out.stdout


def test_keeps_the_newest_n(tmp_path, states):
    model, opt = states[1]
    with Checkpoints(Storage(str(tmp_path)), "c", FP, max_to_keep=2) as ckpt:
        for step in (10, 20, 30, 40):
            ckpt.save(step, model, opt)
        ckpt.wait()
        assert ckpt.steps() == [30, 40]
    assert sorted(os.listdir(tmp_path / "c")) == ["30", "40"]


@pytest.mark.parametrize("how", ["garble", "truncate"])
def test_a_damaged_newest_step_falls_back_to_the_previous_one(tmp_path, states, caplog, how):
    storage = Storage(str(tmp_path))
    with Checkpoints(storage, "c", FP, max_to_keep=3) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, *states[step], loader={"step": step})
    damage(str(tmp_path / "c" / "3"), how)
    model, opt = states[1]
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        with Checkpoints(storage, "c", FP, max_to_keep=3) as ckpt:
            restored = ckpt.latest_restorable(abstract_like(model), abstract_like(opt))
            assert restored.step == 2 and restored.loader == {"step": 2}
            assert_trees_equal(restored.model, states[2][0])
            assert_trees_equal(restored.optimizer, states[2][1])
            # the unreadable step is set aside, so the resumed run can save step 3 again
            assert ckpt.steps() == [1, 2]
            assert ckpt.save(3, *states[3])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in m and "cannot be restored" in m for m in warnings), warnings
    assert any(name.startswith("unreadable-3-") for name in os.listdir(tmp_path / "c"))


def test_all_steps_unreadable_is_an_error_not_a_fresh_start(tmp_path, states):
    storage = Storage(str(tmp_path))
    with Checkpoints(storage, "c", FP) as ckpt:
        for step in (1, 2):
            ckpt.save(step, *states[step])
    for step in (1, 2):
        damage(str(tmp_path / "c" / str(step)), "truncate")
    model, opt = states[1]
    with Checkpoints(storage, "c", FP) as ckpt:
        with pytest.raises(NoRestorableCheckpoint, match=r"2 checkpoint\(s\).*step 2: .*step 1: .*Not starting again"):
            ckpt.latest_restorable(abstract_like(model), abstract_like(opt))
        assert ckpt.steps() == [1, 2]  # nothing was moved away


def test_another_model_or_tokenizer_is_a_clear_error(tmp_path, states):
    storage = Storage(str(tmp_path))
    model, opt = states[1]
    with Checkpoints(storage, "c", FP) as ckpt:
        ckpt.save(5, model, opt)
    other_tok = fingerprint(CFG, "tok-b")
    with Checkpoints(storage, "c", other_tok) as ckpt:
        with pytest.raises(CheckpointMismatch, match=r"step 5 .*tokenizer_id: saved 'tok-a', now 'tok-b'"):
            ckpt.latest_restorable(abstract_like(model), abstract_like(opt))
    bigger = fingerprint(preset("mini", vocab_size=64, seq_len=16), "tok-a")
    with Checkpoints(storage, "c", bigger) as ckpt:
        with pytest.raises(CheckpointMismatch, match=r"model.d_model: saved 128, now 256"):
            ckpt.latest_restorable(abstract_like(model))


def test_checksums_see_a_single_changed_element():
    tree = {"a": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": jnp.ones(5, jnp.bfloat16)}
    swapped = {"a": tree["a"].at[0, 0].set(1.0).at[0, 1].set(0.0), "b": tree["b"]}
    flipped = {"a": tree["a"], "b": tree["b"].at[4].set(2)}
    base = checksums(tree)
    assert base == checksums(jax.tree.map(jnp.copy, tree))
    assert checksums(swapped)["['a']"] != base["['a']"]  # positions count, not only values
    assert checksums(flipped)["['b']"] != base["['b']"] and checksums(flipped)["['a']"] == base["['a']"]


def small_state(seed: int) -> dict:
    """A state shaped like a model's and an optimizer's (nested dicts, int keys, several dtypes), small
    enough for the emulator, which writes a few hundred KiB per second."""
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((32, 48)), jnp.float32),
        "emb": jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16),
        "opt": {0: {"count": jnp.int32(seed), "mu": jnp.asarray(rng.standard_normal(48), jnp.float32)}},
    }


def test_gcs_round_trip_and_fallback_on_the_emulator(gcs_root, monkeypatch, caplog):
    for var in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"):
        monkeypatch.delenv(var, raising=False)  # set for orbax by Checkpoints, restored after the test
    root, options = gcs_root
    storage = Storage(root, options)
    states = {step: small_state(step) for step in (1, 2, 3)}
    target = abstract_like(states[1])
    with Checkpoints(storage, "runs/r/checkpoints", FP, max_to_keep=2) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, states[step], states[step], loader={"step": step})
    assert storage.listdir("runs/r/checkpoints") == ["2", "3"]
    assert storage.exists("runs/r/checkpoints/3/commit_success.txt")
    with Checkpoints(storage, "runs/r/checkpoints", FP, max_to_keep=2) as ckpt:
        restored = ckpt.latest_restorable(target, target)
    assert restored.step == 3 and restored.loader == {"step": 3}
    assert_trees_equal(restored.model, states[3])
    assert_trees_equal(restored.optimizer, states[3])

    # zero 16 bytes in the middle of the newest step's largest model file
    files = [p for p in storage.glob("runs/r/checkpoints/3/model/**") if not storage.fs.isdir(storage.path(p))]
    biggest = max(files, key=lambda p: storage.fs.size(storage.path(p)))
    data = bytearray(storage.read_bytes(biggest))
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)
    storage.write_bytes(biggest, bytes(data))
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        with Checkpoints(storage, "runs/r/checkpoints", FP, max_to_keep=2) as ckpt:
            restored = ckpt.latest_restorable(target, target)
            assert restored.step == 2 and ckpt.steps() == [2]
            assert ckpt.save(3, states[3], states[3])  # the resumed run saves step 3 again
    assert_trees_equal(restored.model, states[2])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in m and "cannot be restored" in m for m in warnings), warnings
    assert storage.listdir("runs/r/checkpoints") == ["2", "3"]


def test_generation_fetches_and_restores_a_model_from_gcs(gcs_root, tmp_path, monkeypatch):
    monkeypatch.setenv("JAGPT_CACHE", str(tmp_path / "cache"))
    root, options = gcs_root
    storage = Storage(root, options)
    model = GPT(CFG, nnx.Rngs(3))
    save(str(tmp_path / "ckpt"), 9, model)
    storage.put_dir(str(tmp_path / "ckpt" / "9"), "runs/r/checkpoints/9")
    # a file in the optimizer item, which fetch leaves behind (the emulator is too slow for a real one)
    storage.write_bytes("runs/r/checkpoints/9/optimizer/_METADATA", b"{}")
    local = fetch(storage, "runs/r/checkpoints/9")
    assert local.startswith(str(tmp_path / "cache")) and not os.path.exists(os.path.join(local, "optimizer"))
    restored = restore_model(local, CFG)
    assert_trees_equal(pure_state(restored), pure_state(model))
    assert fetch(storage, "runs/r/checkpoints/9") == local  # cached


def test_sigterm_is_recorded_for_the_loop(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    flag = install_sigterm_handler()
    try:
        assert flag.installed and not flag.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and flag.should_stop(2)  # the process lives on to save
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before
