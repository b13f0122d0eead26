"""One optimizer step of the GPT, sharded over a mesh: settings, optimizer, state, step.

The training loop calls ``create_train_state`` once, then ``train_step`` with
batches placed by ``shard_batch``. A step takes ``grad_accum`` micro-batches
(a ``jax.lax.scan`` inside the jitted step), sums their gradients and makes one
update, so its loss and gradients are those of the whole batch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from pydantic import Field

from corpus.settings import Settings
from model import sharding
from model.config import ModelConfig
from model.gpt import GPT, Remat


class OptimSettings(Settings):
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    lr: float = Field(default=6e-4, gt=0)
    warmup_steps: int = Field(default=100, ge=0)
    total_steps: int = Field(default=1000, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    b1: float = Field(default=0.9, ge=0, lt=1)
    b2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)
    moments: Literal["float32", "bfloat16", "int8"] = "float32"  # AdamW: how both moments are stored
    grad_dtype: Literal["float32", "bfloat16"] = "float32"  # the gradient accumulator (remat full)
    grad_accum: int = Field(default=1, gt=0)
    remat: Remat = "none"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    loss_chunk: int = Field(default=0, ge=0)  # positions of T per cross-entropy piece; 0: whole sequence
    attn_chunk: int = Field(default=0, ge=0)  # queries per attention piece; 0: whole sequence (cuDNN on GPU)


def make_schedule(settings: OptimSettings, total_steps: int | None = None) -> optax.Schedule:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    total = total_steps or settings.total_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=settings.lr, warmup_steps=min(settings.warmup_steps, max(total - 1, 0)),
        decay_steps=total, end_value=settings.lr * settings.min_lr_ratio,
    )


DECAYED = {"kernel", "wte", "wpe"}


def decay_mask(params):
    """Weight decay on the matrices (kernels and embeddings), not on biases or LayerNorms.

    By name, not rank: the stacked layers give every bias a leading layer axis.
    """

    def name(path) -> str:
        return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]

    return jax.tree_util.tree_map_with_path(lambda path, _: name(path) in DECAYED, params)


def scale_by_adam_bf16(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's moment scaling with both moments stored in bfloat16 (the arithmetic is float32).

    optax.scale_by_adam keeps nu in the dtype it was created in, so creating it
    in bfloat16 is enough.
    """
    inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=jnp.bfloat16)

    def init(params):
        state = inner.init(params)
        return state._replace(nu=optax.tree.cast(state.nu, jnp.bfloat16))

    return optax.GradientTransformation(init, inner.update)


QUANT_BLOCK = 128


def _blocks(x: jax.Array) -> jax.Array:
    n = x.shape[-1]
    block = QUANT_BLOCK if n % QUANT_BLOCK == 0 else n
    return x.reshape(*x.shape[:-1], n // block, block)


def quantize(x: jax.Array, power: int, signed: bool) -> tuple[jax.Array, jax.Array]:
    """Blockwise 8-bit codes of ``(|x| / block max) ** (1 / power)``, and the float32 block maxima.

    Blocks are ``QUANT_BLOCK`` elements along the last axis (the whole axis
    when it does not divide). The root spreads the codes over orders of
    magnitude, the idea of bitsandbytes' dynamic quantization in one line: a
    linear code rounds every element under 1/255 of its block's largest to
    zero; with ``power`` 4 the smallest non-zero code stands for 2e-10 of it.
    """
    xb = _blocks(x.astype(jnp.float32))
    scale = jnp.max(jnp.abs(xb), axis=-1)
    unit = jnp.abs(xb) / jnp.where(scale > 0, scale, 1.0)[..., None]
    levels = 127 if signed else 255
    code = jnp.round(unit ** (1.0 / power) * levels)
    codes = (jnp.sign(xb) * code).astype(jnp.int8) if signed else code.astype(jnp.uint8)
    return codes.reshape(x.shape), scale


def dequantize(codes: jax.Array, scale: jax.Array, power: int) -> jax.Array:
    c = _blocks(codes.astype(jnp.float32)) / (127 if codes.dtype == jnp.int8 else 255)
    return (jnp.sign(c) * jnp.abs(c) ** power * scale[..., None]).reshape(codes.shape)


def _block_maxima_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    n = shape[-1]
    return (*shape[:-1], n // QUANT_BLOCK if n % QUANT_BLOCK == 0 else 1)


class ScaleByAdamInt8State(NamedTuple):
    count: jax.Array
    mu: optax.Updates  # int8 codes
    mu_scale: optax.Updates
    nu: optax.Updates  # uint8 codes
    nu_scale: optax.Updates


MU_POWER, NU_POWER = 2, 4


def _unzip(pairs):
    """A tree of (a, b) leaves as two trees."""
    is_pair = lambda t: isinstance(t, tuple)  # noqa: E731
    return jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair), jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)


def scale_by_adam_int8(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam's moment scaling with both moments stored in 8 bits: mu as int8 codes of its square
    root, nu as uint8 codes of its fourth root (``quantize``), each with a float32 maximum per block
    of 128. An update dequantizes, runs Adam's float32 arithmetic and quantizes the new moments.

    A parameter then costs 2.03 bytes of moments instead of 8 (float32) or 4
    (bfloat16), as with 8-bit Adam (Dettmers et al., 2022).
    """

    def init(params):
        def like(dtype, shape=lambda s: s):
            return jax.tree.map(lambda p: jnp.zeros(shape(p.shape), dtype), params)

        return ScaleByAdamInt8State(
            jnp.zeros([], jnp.int32), like(jnp.int8), like(jnp.float32, _block_maxima_shape),
            like(jnp.uint8), like(jnp.float32, _block_maxima_shape),
        )

    def update(updates, state, params=None):
        del params

        def mu_of(g, codes, scale):
            return b1 * dequantize(codes, scale, MU_POWER) + (1 - b1) * g

        def nu_of(g, codes, scale):
            return b2 * dequantize(codes, scale, NU_POWER) + (1 - b2) * jnp.square(g)

        mu = jax.tree.map(mu_of, updates, state.mu, state.mu_scale)
        nu = jax.tree.map(nu_of, updates, state.nu, state.nu_scale)
        count = optax.safe_increment(state.count)
        c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
        out = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        mu_codes, mu_scale = _unzip(jax.tree.map(lambda m: quantize(m, MU_POWER, signed=True), mu))
        nu_codes, nu_scale = _unzip(jax.tree.map(lambda v: quantize(v, NU_POWER, signed=False), nu))
        return out, ScaleByAdamInt8State(count, mu_codes, mu_scale, nu_codes, nu_scale)

    return optax.GradientTransformation(init, update)


def make_layer_optimizer(settings: OptimSettings, total_steps: int | None = None) -> optax.GradientTransformation:
    """AdamW or Adafactor with decoupled weight decay (times the schedule), without clipping.

    Adafactor: factored second moment (decay 0.8), no first moment, update
    clipping at RMS 1, and ``lr`` as an absolute step size like Adam's (no
    scaling by the parameters' RMS); ``b1``/``b2`` do not apply to it.
    """
    schedule = make_schedule(settings, total_steps)
    if settings.optimizer == "adamw":
        moments = {
            "float32": optax.scale_by_adam, "bfloat16": scale_by_adam_bf16, "int8": scale_by_adam_int8,
        }[settings.moments](b1=settings.b1, b2=settings.b2, eps=settings.eps)
    else:
        moments = optax.chain(optax.scale_by_factored_rms(decay_rate=0.8), optax.clip_by_block_rms(1.0))
    return optax.chain(
        moments,
        optax.add_decayed_weights(settings.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule),
    )


def make_optimizer(settings: OptimSettings, total_steps: int | None = None) -> optax.GradientTransformation:
    """Global-norm clipping, then ``make_layer_optimizer``'s chain applied to each layer of the
    stacked blocks on its own (``per_layer``) and to the other parameters."""
    return optax.chain(optax.clip_by_global_norm(settings.grad_clip), per_layer(make_layer_optimizer(settings, total_steps)))


class PerLayerState(NamedTuple):
    blocks: optax.OptState  # the inner state of one layer, stacked along a leading layer axis
    rest: optax.OptState


def _nested(tree) -> tuple[dict, Callable[[dict], object]]:
    """``tree`` (an nnx state or pure dict) as plain nested dicts, and the way back."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    paths = [tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey)) for path, _ in flat]
    nested: dict = {}
    for path, (_, leaf) in zip(paths, flat):
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf

    def back(d: dict):
        def get(path):
            node = d
            for key in path:
                node = node[key]
            return node

        return jax.tree.unflatten(treedef, [get(p) for p in paths])

    return nested, back


def _split_blocks(tree) -> tuple[dict, dict, Callable[[dict, dict], object]]:
    nested, back = _nested(tree)
    rest = {k: v for k, v in nested.items() if k != "blocks"}
    return nested["blocks"], rest, lambda blocks, rest: back({**rest, "blocks": blocks})


def per_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` applied to each layer of the stacked ``blocks`` on its own, and to the other parameters.

    Per layer, Adafactor's factoring and update clipping see one layer's
    matrix, as with unstacked layers. This generic ``update`` makes the whole
    update tree; ``LayerwiseOptimizer.update`` gives the same result in place,
    one layer at a time.
    """

    def init(params):
        blocks, rest, _ = _split_blocks(params)
        return PerLayerState(jax.vmap(inner.init)(blocks), inner.init(rest))

    def update(updates, state, params=None):
        g_blocks, g_rest, join = _split_blocks(updates)
        p_blocks, p_rest, _ = _split_blocks(params)
        u_rest, rest_state = inner.update(g_rest, state.rest, p_rest)
        u_blocks, blocks_state = jax.lax.map(lambda a: inner.update(*a), (g_blocks, state.blocks, p_blocks))
        return join(u_blocks, u_rest), PerLayerState(blocks_state, rest_state)

    return optax.GradientTransformation(init, update)


class LayerwiseOptimizer(nnx.Optimizer):
    """An ``nnx.Optimizer`` over a GPT whose update runs ``per_layer``'s inner chain
    one layer at a time, writing each layer's parameters and state in place.

    The whole-tree update keeps a parameter-sized temporary per leaf alive, and
    a stacked leaf holds all layers (3.4 GB for the 2.7B model's MLP); here the
    temporaries are one layer's.
    """

    def __init__(self, model: GPT, settings: OptimSettings, total_steps: int | None = None):
        self.inner = make_layer_optimizer(settings, total_steps)
        self.grad_clip = settings.grad_clip
        self.grad_dtype = settings.grad_dtype
        super().__init__(model, optax.chain(optax.clip_by_global_norm(settings.grad_clip), per_layer(self.inner)), wrt=nnx.Param)

    def update(self, model: GPT, grads) -> None:
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        grads = nnx.as_pure(nnx.state(grads, nnx.Param))
        clip_state, state = nnx.as_pure(self.opt_state)
        norm = global_norm(grads)
        # optax.clip_by_global_norm's rule, as one scalar applied to each layer's slice
        scale = jnp.where(norm < self.grad_clip, 1.0, self.grad_clip / norm)
        g_blocks, g_rest, _ = _split_blocks(grads)
        p_blocks, p_rest, join = _split_blocks(params)
        u_rest, rest_state = self.inner.update(jax.tree.map(lambda g: g * scale, g_rest), state.rest, p_rest)
        p_rest = optax.apply_updates(p_rest, u_rest)

        def layer(i, carry):
            p_all, s_all = carry
            take = lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False)  # noqa: E731
            p, s = jax.tree.map(take, p_all), jax.tree.map(take, s_all)
            u, s = self.inner.update(jax.tree.map(lambda g: take(g).astype(jnp.float32) * scale, g_blocks), s, p)
            p = optax.apply_updates(p, u)
            put = lambda a, x: jax.lax.dynamic_update_index_in_dim(a, x, i, 0)  # noqa: E731
            return jax.tree.map(put, p_all, p), jax.tree.map(put, s_all, s)

        n_layer = jax.tree.leaves(p_blocks)[0].shape[0]
        p_blocks, blocks_state = jax.lax.fori_loop(0, n_layer, layer, (p_blocks, state.blocks))
        nnx.update(model, join(p_blocks, p_rest))
        nnx.update(self.opt_state, nnx.state((clip_state, PerLayerState(blocks_state, rest_state))))
        self.step[...] += 1


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6N + 12·L·d·T (forward and backward, no remat recompute).

    N: the blocks' parameters (matrices, biases, LayerNorms) plus the output layer
    (tied to ``wte``, vocab x d), the weights every token meets in a matmul. The
    position table, the lookup and the final LayerNorm are left out.
    The attention term counts the full T x T scores, as PaLM's MFU does.
    """
    T = seq_len or cfg.seq_len
    n = cfg.n_params() - cfg.seq_len * cfg.d_model - 2 * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layer * cfg.d_model * T


def _axes(mesh: Mesh | dict[str, int]) -> dict[str, int]:
    return dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)


def check_config(cfg: ModelConfig, settings: OptimSettings, mesh: Mesh | dict[str, int]) -> None:
    """Reject a model, settings and mesh (or its axis sizes) that cannot run together, before anything compiles."""
    tensor, fsdp = _axes(mesh)["tensor"], _axes(mesh)["fsdp"]
    if cfg.n_head % tensor:
        raise ValueError(f"n_head {cfg.n_head} is not divisible by the tensor axis {tensor}")
    if cfg.d_model % tensor:
        raise ValueError(f"d_model {cfg.d_model} is not divisible by the tensor axis {tensor}")
    if cfg.d_model % fsdp:
        raise ValueError(f"d_model {cfg.d_model} is not divisible by the fsdp axis {fsdp}")


def check_batch(cfg: ModelConfig, settings: OptimSettings, mesh: Mesh | dict[str, int], batch: int, seq_len: int) -> None:
    """A global batch of ``batch`` sequences of ``seq_len`` tokens per optimizer step."""
    axes = _axes(mesh)
    replicas = axes["data"] * axes["fsdp"]
    if seq_len > cfg.seq_len:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context {cfg.seq_len}")
    if batch % (replicas * settings.grad_accum):
        raise ValueError(
            f"batch of {batch} sequences is not divisible by data x fsdp x grad_accum = "
            f"{axes['data']} x {axes['fsdp']} x {settings.grad_accum}"
        )
    for name in ("loss_chunk", "attn_chunk"):
        chunk = getattr(settings, name)
        if chunk and chunk < seq_len and seq_len % chunk:
            raise ValueError(f"{name} {chunk} does not divide seq_len {seq_len}")


def split_batch(array, grad_accum: int):
    """(batch, T) -> (grad_accum, batch // grad_accum, T), the layout ``train_step`` takes."""
    batch = array.shape[0]
    if batch % grad_accum:
        raise ValueError(f"batch of {batch} sequences is not divisible by grad_accum {grad_accum}")
    return array.reshape(grad_accum, batch // grad_accum, *array.shape[1:])


def build_model(cfg: ModelConfig, settings: OptimSettings, rngs: nnx.Rngs) -> GPT:
    return GPT(cfg, rngs, compute_dtype=settings.compute_dtype, remat=settings.remat, loss_chunk=settings.loss_chunk,
        attn_chunk=settings.attn_chunk,
    )


def abstract_train_state(cfg: ModelConfig, settings: OptimSettings, mesh: Mesh, seed: int = 0):
    """(graphdef, state of ShapeDtypeStructs carrying their NamedShardings) of the model and
    optimizer, and the function that makes them; nothing is allocated."""
    check_config(cfg, settings, mesh)

    def init():
        model = build_model(cfg, settings, nnx.Rngs(seed))
        return model, LayerwiseOptimizer(model, settings)

    graphdef, abstract = nnx.split(nnx.eval_shape(init))
    shardings = sharding.state_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return graphdef, state, init


def create_train_state(cfg: ModelConfig, settings: OptimSettings, mesh: Mesh, seed: int = 0) -> tuple[GPT, nnx.Optimizer]:
    """The model and its optimizer, initialized directly into their shards on ``mesh``."""
    graphdef, abstract, init = abstract_train_state(cfg, settings, mesh, seed)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    state = jax.jit(lambda: nnx.split(init())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def global_norm(tree) -> jax.Array:
    """optax.tree.norm, summed in float32 whatever the leaves' dtype."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _zeros_like(params: nnx.State, dtype=jnp.float32) -> nnx.State:
    """Zeros shaped and split like ``params`` (a gradient accumulator)."""
    return sharding.constrain_state(jax.tree.map(lambda p: jnp.zeros(p.shape, dtype), params))


def loss_and_grads(
    model: GPT, x: jax.Array, y: jax.Array, grad_dtype: str = "float32"
) -> tuple[jax.Array, nnx.State]:
    """Mean cross-entropy over all of ``x``'s (grad_accum, micro_batch, T) tokens and its gradient.

    With ``remat == "full"`` the blocks add their gradients into the
    accumulator (``grad_dtype``) as the backward pass makes them
    (``gpt.run_blocks_into``). A bfloat16 accumulator rounds each addition to
    8 significant bits, an error of up to 2^-9 of the running sum: over K
    micro-batches typically sqrt(K) x 2^-9 of the sum (2% at K = 122, GPT-3's
    2M-token batch on 8 devices), K x 2^-9 at worst.
    """
    n_micro = x.shape[0]
    scale = 1.0 / x.size
    if model.remat == "full":
        graphdef, blocks, rest = nnx.split(model, nnx.PathContains("blocks"), ...)

        def micro_loss(rest, sink, x, y):
            model = nnx.merge(graphdef, blocks, rest)
            return model.loss_sum(x, y, grad_sink=nnx.to_pure_dict(sink)["blocks"]) * scale

        grad_fn = jax.value_and_grad(micro_loss, argnums=(0, 1))

        def body(carry, xy):
            loss, rest_acc, sink = carry
            micro, (g_rest, sink) = grad_fn(rest, sink, *xy)
            return (loss + micro, jax.tree.map(jnp.add, rest_acc, g_rest), sink), None

        if n_micro == 1:
            loss, (g_rest, sink) = grad_fn(rest, _zeros_like(blocks, grad_dtype), x[0], y[0])
        else:
            carry = (jnp.float32(0), _zeros_like(rest), _zeros_like(blocks, grad_dtype))
            (loss, g_rest, sink), _ = jax.lax.scan(body, carry, (x, y))
        grads = nnx.merge_state(sink, g_rest)
    else:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        grad_fn = jax.value_and_grad(lambda p, x, y: nnx.merge(graphdef, p, rest).loss_sum(x, y) * scale)
        if n_micro == 1:
            loss, grads = grad_fn(params, x[0], y[0])
        else:

            def body(carry, xy):
                loss, acc = carry
                micro, g = grad_fn(params, *xy)
                return (loss + micro, jax.tree.map(jnp.add, acc, g)), None

            (loss, grads), _ = jax.lax.scan(body, (jnp.float32(0), _zeros_like(params)), (x, y))
    return loss, grads


def _as_micro_batches(x: jax.Array) -> jax.Array:
    return x[None] if x.ndim == 2 else x


def update(model: GPT, optimizer: LayerwiseOptimizer, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    loss, grads = loss_and_grads(model, _as_micro_batches(x), _as_micro_batches(y), optimizer.grad_dtype)
    grad_norm = global_norm(grads)
    optimizer.update(model, grads)
    return {"loss": loss, "grad_norm": grad_norm}


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def jitted_step(graphdef, state, x, y):
    """The whole step as a pure function of (model, optimizer) state; what the planner compiles."""
    model, optimizer = nnx.merge(graphdef, state)
    metrics = update(model, optimizer, x, y)
    return sharding.constrain_state(nnx.state((model, optimizer))), metrics


@functools.partial(jax.jit, static_argnums=0)
def _jitted_eval(graphdef, state, x, y):
    model = nnx.merge(graphdef, state)
    x, y = _as_micro_batches(x), _as_micro_batches(y)
    total = jax.lax.map(lambda xy: model.loss_sum(*xy), (x, y)).sum()
    return total, jnp.int32(x.size)


def _mesh_context(tree):
    mesh = sharding.mesh_of(tree)
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def train_step(model: GPT, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """One optimizer step on int32 token ids ``x`` and targets ``y``; updates both in place.

    ``x``, ``y``: (grad_accum, micro_batch, T), as ``shard_batch(mesh,
    split_batch(batch, grad_accum))`` gives; a (batch, T) array is one
    micro-batch. Returns ``loss`` (mean cross-entropy of the whole batch, before
    the update) and ``grad_norm`` (global norm before clipping), as device scalars.
    """
    if x.shape[-1] > model.cfg.seq_len:
        raise ValueError(f"seq_len {x.shape[-1]} is longer than the model's context {model.cfg.seq_len}")
    graphdef, state = nnx.split((model, optimizer))
    with _mesh_context(state):
        state, metrics = jitted_step(graphdef, state, x, y)
    nnx.update((model, optimizer), state)
    return metrics


def eval_step(model: GPT, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy, number of tokens) over (batch, T) or (n, batch, T) ids."""
    if x.shape[-1] > model.cfg.seq_len:
        raise ValueError(f"seq_len {x.shape[-1]} is longer than the model's context {model.cfg.seq_len}")
    graphdef, state = nnx.split(model)
    with _mesh_context(state):
        return _jitted_eval(graphdef, state, x, y)
