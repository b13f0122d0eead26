"""Device mesh and placement: one code path for 1 CPU, N simulated CPUs, GPUs and TPU slices.

The mesh has three axes: ``data`` (replicas), ``fsdp`` (parameters, gradients
and optimizer state split across devices, ZeRO-3 style) and ``tensor``
(Megatron-style split of heads and MLP features). Parameters carry logical
axis names (``out_sharding`` metadata, e.g. ``("embed", "mlp")``); ``RULES``
maps them to mesh axes. The batch is split over (data, fsdp).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# logical axis -> mesh axis (None: not split)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH,
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": None,
    "layers": None,
    "positions": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices()) if devices is None else list(devices)
    shape = (data, fsdp, tensor)
    if min(shape) < 1:
        raise ValueError(f"mesh axes must be at least 1, got data={data} fsdp={fsdp} tensor={tensor}")
    if data * fsdp * tensor != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} devices, "
            f"but there are {len(devices)}; the product of the mesh axes must equal the device count"
        )
    if len(devices) == jax.device_count() and devices == list(jax.devices()):
        # Topology-aware order (ICI rings on TPU, NVLink islands on GPU).
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.array(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)


def parse_mesh(text: str, devices: int) -> dict[str, int]:
    """``"fsdp=8"`` or ``"data=2,fsdp=2,tensor=2"`` -> axis sizes; an omitted ``data`` takes the rest of ``devices``."""
    sizes = {"data": None, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(data|fsdp|tensor)=(\d+)", part)
        if not m:
            raise ValueError(f"bad mesh part {part!r}: expected data=N, fsdp=N or tensor=N")
        sizes[m.group(1)] = int(m.group(2))
    if sizes["data"] is None:
        rest = sizes["fsdp"] * sizes["tensor"]
        if rest < 1 or devices % rest:
            raise ValueError(f"mesh {text!r} does not divide {devices} devices")
        sizes["data"] = devices // rest
    if sizes["data"] * sizes["fsdp"] * sizes["tensor"] != devices:
        raise ValueError(f"mesh {text!r} has {sizes['data'] * sizes['fsdp'] * sizes['tensor']} devices, not {devices}")
    return sizes


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The mesh split for an array with these logical axes; a dimension the mesh
    axes do not divide evenly stays whole (only optimizer statistics hit this)."""
    out = []
    for name, size in zip(logical, shape):
        axes = RULES.get(name) if name else None
        if axes is not None:
            n = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
            if size % n:
                axes = None
        out.append(axes)
    return PartitionSpec(*out)


def _logical_of(variable: nnx.Variable) -> tuple | None:
    names = variable.get_metadata().get("out_sharding")
    value = variable.get_value()
    # Factored optimizer statistics copy their parameter's names but not its rank.
    if names is None or len(names) != len(getattr(value, "shape", ())):
        return None
    return tuple(names)


def state_shardings(state, mesh: Mesh):
    """NamedShardings for every leaf of an nnx state (same tree, Variables kept)."""

    def one(x):
        value = x.get_value() if isinstance(x, nnx.Variable) else x
        shape = getattr(value, "shape", ())
        logical = _logical_of(x) if isinstance(x, nnx.Variable) else None
        spec = spec_for(logical, shape, mesh) if logical else PartitionSpec()
        sharding = NamedSharding(mesh, spec)
        return x.replace(sharding) if isinstance(x, nnx.Variable) else sharding

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """(batch, T) or (grad_accum, batch, T): the batch axis over (data, fsdp)."""
    if ndim not in (2, 3):
        raise ValueError(f"a batch is (batch, T) or (grad_accum, batch, T), not {ndim}-dimensional")
    spec = (BATCH, None) if ndim == 2 else (None, BATCH, None)
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_batch(mesh: Mesh, array) -> jax.Array:
    """Place a host batch on the mesh, its batch axis split over (data, fsdp).

    Multi-host: every process passes the same global array (batches are a pure
    function of seed and step); each keeps the slices its devices hold.
    """
    array = np.asarray(array)
    sharding = batch_sharding(mesh, array.ndim)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = array.shape[-2]
    if batch % replicas:
        raise ValueError(f"batch of {batch} sequences does not split over data x fsdp = {replicas} devices")
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def active_mesh():
    """The (data, fsdp, tensor) mesh of the enclosing ``jax.set_mesh``, or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or set(mesh.axis_names) != set(AXES) else mesh


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pin an activation's split inside jit; a no-op outside a ``jax.set_mesh`` context."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(logical, x.shape, mesh))


def constrain_state(state):
    """Pin every Variable of an nnx state inside jit to the split ``state_shardings`` gives it."""
    mesh = active_mesh()
    if mesh is None:
        return state

    def one(x):
        if not isinstance(x, nnx.Variable):
            return x
        value = x.get_value()
        logical = _logical_of(x)
        spec = spec_for(logical, value.shape, mesh) if logical else PartitionSpec()
        return x.replace(jax.lax.with_sharding_constraint(value, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of ``tree`` are placed on (None when not placed by name)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            return sharding.mesh
    return None


def _multi_host_env() -> str | None:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "TPU pod slice"
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return var
    return None


def initialize_distributed(timeout_s: int = 300, force: bool = False) -> tuple[int, int]:
    """Join the other processes of a multi-host job; returns (process index, process count).

    Only when a multi-host environment is found (JAX_COORDINATOR_ADDRESS with
    JAX_NUM_PROCESSES and JAX_PROCESS_ID, a TPU pod slice, SLURM or Open MPI
    with more than one task) or ``force``; a single host is left alone.
    """
    reason = "forced" if force else _multi_host_env()
    if reason and not jax.distributed.is_initialized():
        kwargs = {}
        if os.environ.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        log.info("multi-host environment (%s): joining, waiting up to %d s for the other processes", reason, timeout_s)
        jax.distributed.initialize(initialization_timeout=int(timeout_s), **kwargs)
    index, count = jax.process_index(), jax.process_count()
    log.info(
        "process %d of %d; %d local devices, %d in all (%s)",
        index, count, jax.local_device_count(), jax.device_count(), jax.devices()[0].platform,
    )
    return index, count
