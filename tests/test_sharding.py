import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from model import sharding
from model.config import ModelConfig
from model.gpt import GPT

ROOT = Path(__file__).resolve().parent.parent


def run_on_fake_devices(code: str, devices: int = 8) -> dict:
    """Run ``code`` in a fresh interpreter whose JAX sees ``devices`` CPU devices; it prints one JSON line."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_steps_on_a_2x4_mesh_match_one_device():
    out = run_on_fake_devices("""
        import json
        import jax, numpy as np
        from flax import nnx
        from model import sharding, step
        from model.config import preset

        # 250 does not divide by 4: the vocab-parallel embedding and loss pad the table
        cfg = preset("tiny", vocab_size=250, seq_len=64)
        settings = step.OptimSettings(lr=1e-2, warmup_steps=0, total_steps=10, grad_accum=2, remat="full", loss_chunk=8)
        lean = settings.model_copy(update={"moments": "int8", "grad_dtype": "bfloat16"})
        rng = np.random.default_rng(0)
        x = rng.integers(0, 250, (16, 32)).astype(np.int32)
        y = np.roll(x, -1, axis=1)
        out = {"devices": jax.device_count()}
        for name, axes, devices, settings in [
            ("one", (1, 1, 1), jax.devices()[:1], settings), ("data2_fsdp4", (2, 4, 1), None, settings),
            ("data2_fsdp2_tensor2", (2, 2, 2), None, settings),
            ("lean_one", (1, 1, 1), jax.devices()[:1], lean), ("lean_fsdp8", (1, 8, 1), None, lean),
        ]:
            mesh = sharding.make_mesh(*axes, devices=devices)
            model, optimizer = step.create_train_state(cfg, settings, mesh, seed=0)
            xs = sharding.shard_batch(mesh, step.split_batch(x, 2))
            ys = sharding.shard_batch(mesh, step.split_batch(y, 2))
            losses = [float(step.train_step(model, optimizer, xs, ys)["loss"]) for _ in range(3)]
            kernel = model.blocks.c_fc.kernel[...]
            mu = optimizer.opt_state[1].blocks[0].mu["c_fc"]["kernel"][...]
            out[name] = {
                "losses": losses,
                "params": [float(np.abs(np.asarray(p)).sum()) for p in jax.tree.leaves(nnx.state(model))],
                "kernel_spec": str(kernel.sharding.spec), "mu_spec": str(mu.sharding.spec),
                "kernel_devices": len(kernel.sharding.device_set), "x_spec": str(xs.sharding.spec),
            }
        try:
            step.check_config(cfg, settings, sharding.make_mesh(1, 1, 8))
        except ValueError as e:
            out["tensor8"] = str(e)
        print(json.dumps(out))
    """)
    assert out["devices"] == 8
    one = out["one"]
    assert one["losses"][0] != one["losses"][2]  # the updates change the model
    for name in ("data2_fsdp4", "data2_fsdp2_tensor2"):
        np.testing.assert_allclose(out[name]["losses"], one["losses"], rtol=1e-4)
        np.testing.assert_allclose(out[name]["params"], one["params"], rtol=1e-4)
        assert out[name]["kernel_devices"] == 8 and out[name]["x_spec"] == "P(None, ('data', 'fsdp'), None)"
    # 8-bit moments and bfloat16 gradients: the same codes wherever their blocks live
    np.testing.assert_allclose(out["lean_fsdp8"]["losses"], out["lean_one"]["losses"], rtol=1e-3)
    np.testing.assert_allclose(out["lean_fsdp8"]["params"], out["lean_one"]["params"], rtol=1e-3)
    np.testing.assert_allclose(out["lean_one"]["losses"], one["losses"], rtol=2e-2)
    assert out["data2_fsdp4"]["kernel_spec"] == out["data2_fsdp4"]["mu_spec"] == "P(None, 'fsdp')"
    assert out["data2_fsdp2_tensor2"]["kernel_spec"] == "P(None, 'fsdp', 'tensor')"
    assert out["data2_fsdp2_tensor2"]["mu_spec"] == "P(None, 'fsdp', 'tensor')"
    assert out["tensor8"] == "n_head 4 is not divisible by the tensor axis 8"


def test_make_mesh_checks_the_device_count():
    with pytest.raises(ValueError, match=r"data=2 x fsdp=1 x tensor=1 = 2 devices, but there are 1"):
        sharding.make_mesh(2, 1, 1, devices=jax.devices()[:1])
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.size == 1


def test_parse_mesh():
    assert sharding.parse_mesh("fsdp=8", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sharding.parse_mesh("fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="has 4 devices, not 8"):
        sharding.parse_mesh("data=1,fsdp=4", 8)
    with pytest.raises(ValueError, match="bad mesh part"):
        sharding.parse_mesh("pipeline=2", 8)


def test_logical_axes_map_to_mesh_axes():
    mesh = jax.sharding.AbstractMesh((2, 4, 2), sharding.AXES)
    assert sharding.spec_for(("layers", "embed", "mlp"), (3, 64, 256), mesh) == P(None, "fsdp", "tensor")
    assert sharding.spec_for(("batch", None), (16, 5), mesh) == P(("data", "fsdp"), None)
    assert sharding.spec_for(("embed",), (6,), mesh) == P(None)  # 6 does not split 4 ways: kept whole
    model = GPT(ModelConfig(vocab_size=64, seq_len=16, n_layer=2, d_model=32, n_head=4), nnx.Rngs(0))
    one = sharding.make_mesh(devices=jax.devices()[:1])
    shardings = sharding.state_shardings(nnx.state(model), one)
    assert shardings["blocks"]["c_attn"]["kernel"].get_value().spec == P(None, "fsdp", None, "tensor")
    assert shardings["wte"].get_value().spec == P(None, "fsdp")


def test_distributed_is_left_alone_on_one_host(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert sharding.initialize_distributed(timeout_s=1) == (0, 1)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert sharding._multi_host_env() == "TPU pod slice"
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert sharding._multi_host_env() == "SLURM_NTASKS"
