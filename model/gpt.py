"""A GPT-2/GPT-3 decoder in Flax NNX, laid out so it exports to HF ``GPT2LMHeadModel``.

Learned positions, pre-LayerNorm (eps 1e-5), GELU (tanh), biases everywhere,
and the output layer tied to the token embedding. The blocks' parameters are
stacked along a leading layer axis and run with ``jax.lax.scan``, so compile
time does not grow with depth. ``c_attn`` is (d, 3, d): reshaped to (d, 3d) it
is GPT-2's fused [q | k | v], each head-major. Parameters are stored in
float32 and cast per layer to ``compute_dtype``; LayerNorm statistics and
logits are float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig
from model.sharding import BATCH, active_mesh, constrain

LN_EPS = 1e-5
Remat = Literal["none", "dots_saveable", "full"]
REMAT_POLICIES = {
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}
ACT = ("batch", None, None)


def _param(init, key, shape, axes) -> nnx.Param:
    # eager_sharding off: the model is built without a mesh too (generation, restore);
    # model.sharding places it by these names.
    return nnx.Param(init(key, shape, jnp.float32), out_sharding=axes, eager_sharding=False)


class Norm(nnx.Module):
    def __init__(self, lead: tuple[int, ...], lead_axes: tuple, d: int):
        self.scale = _param(nnx.initializers.ones, None, (*lead, d), (*lead_axes, "embed"))
        self.bias = _param(nnx.initializers.zeros, None, (*lead, d), (*lead_axes, "embed"))


class Dense(nnx.Module):
    def __init__(self, key, kernel: tuple[int, ...], kernel_axes: tuple, bias: tuple[int, ...], bias_axes: tuple, std: float):
        self.kernel = _param(nnx.initializers.normal(std), key, kernel, kernel_axes)
        self.bias = _param(nnx.initializers.zeros, None, bias, bias_axes)


class Blocks(nnx.Module):
    """All ``n_layer`` blocks, each parameter stacked along a leading layer axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, d = cfg.n_layer, cfg.d_model
        std = 0.02
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2 scales the residual projections
        self.ln_1 = Norm((L,), ("layers",), d)
        self.c_attn = Dense(rngs.params(), (L, d, 3, d), ("layers", "embed", None, "heads"), (L, 3, d), ("layers", None, "heads"), std)
        self.attn_proj = Dense(rngs.params(), (L, d, d), ("layers", "heads", "embed"), (L, d), ("layers", "embed"), resid_std)
        self.ln_2 = Norm((L,), ("layers",), d)
        self.c_fc = Dense(rngs.params(), (L, d, 4 * d), ("layers", "embed", "mlp"), (L, 4 * d), ("layers", "mlp"), std)
        self.mlp_proj = Dense(rngs.params(), (L, 4 * d, d), ("layers", "mlp", "embed"), (L, d), ("layers", "embed"), resid_std)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, dtype) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + LN_EPS) * scale + bias).astype(dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int = 0) -> jax.Array:
    """Causal attention over (B, T, heads, d_head), ``chunk`` queries at a time.

    Without a fused kernel (CPU, TPU through XLA) the (B, heads, T, T) scores
    are made whole; in query chunks (each rematerialized in the backward pass)
    only (B, heads, chunk, T) exist at once. ``chunk`` 0 (or >= T): one piece,
    where ``implementation=None`` picks cuDNN flash attention on GPUs.
    """
    B, T, H, D = q.shape
    if chunk <= 0 or chunk >= T:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=None)
    if T % chunk:
        raise ValueError(f"attn_chunk {chunk} does not divide the sequence length {T}")
    key_pos = jnp.arange(T)

    def one(args):
        i, qc = args
        query_pos = i * chunk + jnp.arange(chunk)
        mask = (key_pos[None, :] <= query_pos[:, None])[None, None]
        return jax.nn.dot_product_attention(qc, k, v, mask=mask)

    qs = q.reshape(B, T // chunk, chunk, H, D).swapaxes(0, 1)
    out = jax.lax.map(jax.checkpoint(one, prevent_cse=False), (jnp.arange(T // chunk), qs))
    return out.swapaxes(0, 1).reshape(B, T, H, D)


def cast_weight(a: jax.Array, dtype) -> jax.Array:
    """A float32 weight in the compute dtype: bfloat16 by round-to-nearest-even on the bits.

    The same as ``astype`` for finite values, but XLA does not recognise it as
    a convert: a convert it hoists out of the layer loop, casting every
    layer's weights at once (a 3.2 GB copy for 13B on a TPU v3-8, which then
    does not fit).
    """
    if a.dtype == dtype:
        return a
    if jnp.dtype(dtype) != jnp.bfloat16:
        return a.astype(dtype)
    bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return jax.lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)


def block(p: dict, x: jax.Array, n_head: int, dtype, attn_chunk: int = 0) -> jax.Array:
    """One block on (B, T, d) for one layer's parameters ``p`` (a pure dict of float32 arrays)."""
    B, T, D = x.shape
    c = lambda a: cast_weight(a, dtype)  # noqa: E731
    h = layer_norm(x, p["ln_1"]["scale"], p["ln_1"]["bias"], dtype)
    qkv = jnp.einsum("btd,dkf->btkf", h, c(p["c_attn"]["kernel"])) + c(p["c_attn"]["bias"])
    qkv = constrain(qkv.reshape(B, T, 3, n_head, D // n_head), ("batch", None, None, "heads", None))
    y = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], attn_chunk)
    y = constrain(y, ("batch", None, "heads", None)).reshape(B, T, D)
    x = x + jnp.einsum("btf,fd->btd", y, c(p["attn_proj"]["kernel"])) + c(p["attn_proj"]["bias"])
    h = layer_norm(x, p["ln_2"]["scale"], p["ln_2"]["bias"], dtype)
    h = jnp.einsum("btd,df->btf", h, c(p["c_fc"]["kernel"])) + c(p["c_fc"]["bias"])
    h = constrain(jax.nn.gelu(h, approximate=True), ("batch", None, "mlp"))
    x = x + jnp.einsum("btf,fd->btd", h, c(p["mlp_proj"]["kernel"])) + c(p["mlp_proj"]["bias"])
    return constrain(x, ACT)


def run_blocks(block_fn: Callable, params: dict, x: jax.Array, remat: Remat) -> jax.Array:
    """Scan ``block_fn`` over the stacked layers, rematerialized per block by ``remat``."""
    if remat != "none":
        block_fn = jax.checkpoint(block_fn, policy=REMAT_POLICIES[remat], prevent_cse=False)
    x, _ = jax.lax.scan(lambda h, p: (block_fn(p, h), None), x, params)
    return x


def run_blocks_into(block_fn: Callable, params: dict, sink: dict, x: jax.Array) -> jax.Array:
    """``run_blocks`` with full remat whose backward adds the blocks' gradients into ``sink``.

    Differentiating with respect to ``sink`` yields ``sink + d loss / d params``
    (and ``params`` get no cotangent): each layer's gradient is added into the
    accumulator as the backward scan produces it, so gradient accumulation needs
    one float32 gradient buffer instead of two (the stacked gradients of a
    micro-step plus the running sum).
    """

    @jax.custom_vjp
    def run(params, sink, x):
        return jax.lax.scan(lambda h, p: (block_fn(p, h), None), x, params)[0]

    def fwd(params, sink, x):
        y, inputs = jax.lax.scan(lambda h, p: (block_fn(p, h), h), x, params)
        return y, (params, sink, inputs)

    def bwd(res, dy):
        params, sink, inputs = res

        def step(carry, layer):
            dh, sink = carry
            i, p, h = layer
            _, vjp = jax.vjp(block_fn, p, h)
            dp, dh = vjp(dh)
            sink = jax.tree.map(lambda s, g: s.at[i].add(g.astype(s.dtype)), sink, dp)
            return (dh, sink), None

        n = jax.tree.leaves(params)[0].shape[0]
        (dx, sink), _ = jax.lax.scan(step, (dy, sink), (jnp.arange(n), params, inputs), reverse=True)
        return None, sink, dx

    run.defvjp(fwd, bwd)
    return run(params, sink, x)


class GPT(nnx.Module):
    def __init__(
        self, cfg: ModelConfig, rngs: nnx.Rngs, *, compute_dtype: str = "float32", remat: Remat = "none",
        loss_chunk: int = 0, attn_chunk: int = 0,
    ):
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.remat = remat
        self.loss_chunk = loss_chunk
        self.attn_chunk = attn_chunk
        self.wte = _param(nnx.initializers.normal(0.02), rngs.params(), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        self.wpe = _param(nnx.initializers.normal(0.01), rngs.params(), (cfg.seq_len, cfg.d_model), ("positions", "embed"))
        self.blocks = Blocks(cfg, rngs)
        self.ln_f = Norm((), (), cfg.d_model)

    @property
    def dtype(self):
        return jnp.dtype(self.compute_dtype)

    def block_params(self) -> dict:
        return nnx.to_pure_dict(nnx.state(self.blocks))

    def hidden(self, tokens: jax.Array, grad_sink: dict | None = None) -> jax.Array:
        """Final-LayerNorm output (B, T, d) in the compute dtype.

        ``grad_sink``: a float32 pure dict shaped like ``block_params()``; the
        blocks then run with full remat and add their gradients into it (see
        ``run_blocks_into``).
        """
        T = tokens.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context {self.cfg.seq_len}")
        wpe = constrain(self.wpe[:T], (None, None))
        x = constrain((embed_tokens(self.wte[...], tokens) + wpe).astype(self.dtype), ACT)
        block_fn = lambda p, h: block(p, h, self.cfg.n_head, self.dtype, self.attn_chunk)  # noqa: E731
        if grad_sink is None:
            x = run_blocks(block_fn, self.block_params(), x, self.remat)
        else:
            x = run_blocks_into(block_fn, self.block_params(), grad_sink, x)
        return layer_norm(x, self.ln_f.scale[...], self.ln_f.bias[...], self.dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits (B, T, vocab), float32, for token ids (B, T)."""
        return logits(self.hidden(tokens), self.wte[...])

    def loss_sum(self, tokens: jax.Array, targets: jax.Array, grad_sink: dict | None = None) -> jax.Array:
        """Summed cross-entropy (float32) of ``targets`` given ``tokens``, both (B, T)."""
        return cross_entropy_sum(self.hidden(tokens, grad_sink), self.wte[...], targets, self.loss_chunk)


def logits(h: jax.Array, wte: jax.Array) -> jax.Array:
    """float32 logits of the tied output layer, ``wte`` gathered whole in the compute dtype."""
    w = constrain(wte.astype(h.dtype), (None, None))
    return jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)


# Vocab-parallel embedding and loss. Under a mesh whose fsdp axis splits the
# parameters, the table is split along the vocabulary over that axis (padded to
# a multiple of it) and the fsdp group shares its tokens or hidden states
# instead of the table: a whole-vocabulary float32 copy of wte (1 GB for 13B) is
# never made; the group's (batch, T, d) activations are smaller than the table
# for every GPT-3 shape at micro-batch 1.


def _vocab_parallel(mesh, batch: int) -> bool:
    """Only when the fsdp axis splits the table (on one device XLA:CPU needs 0.8 GB more for 2.7B)."""
    return mesh is not None and mesh.shape["fsdp"] > 1 and batch % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0


def _split_vocab(wte: jax.Array, mesh) -> jax.Array:
    pad = -wte.shape[0] % mesh.shape["fsdp"]
    return jnp.pad(wte, ((0, pad), (0, 0))) if pad else wte


def _local_rows(ids: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """(row of each id in this device's slice, clipped; whether the id is in the slice)."""
    j = ids - jax.lax.axis_index("fsdp") * rows
    return jnp.clip(j, 0, rows - 1), (j >= 0) & (j < rows)


def embed_tokens(wte: jax.Array, tokens: jax.Array) -> jax.Array:
    """``wte[tokens]``, (B, T, d) in the table's dtype."""
    mesh = active_mesh()
    if not _vocab_parallel(mesh, tokens.shape[0]):
        return wte[tokens]

    def local(w, ids):
        ids = jax.lax.all_gather(ids, "fsdp", axis=0, tiled=True)
        j, hit = _local_rows(ids, w.shape[0])
        x = jnp.where(hit[..., None], w[j], 0)
        return jax.lax.psum_scatter(x, "fsdp", scatter_dimension=0, tiled=True)

    split = jax.shard_map(local, in_specs=(P("fsdp", None), P(BATCH, None)), out_specs=P(BATCH, None, None))
    return split(_split_vocab(wte, mesh), tokens)


def _ce_sum(h: jax.Array, wte: jax.Array, targets: jax.Array) -> jax.Array:
    z = logits(h, wte)
    gold = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jax.nn.logsumexp(z, axis=-1) - gold)


def _ce_sum_vocab_slice(h: jax.Array, w: jax.Array, targets: jax.Array, vocab: int) -> jax.Array:
    """``_ce_sum`` inside the shard_map: this device's slice ``w`` of the (padded) table."""
    z = jnp.einsum("btd,vd->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    rows = w.shape[0]
    if rows * jax.lax.axis_size("fsdp") > vocab:
        z = jnp.where(jax.lax.axis_index("fsdp") * rows + jnp.arange(rows) < vocab, z, -jnp.inf)
    m = jax.lax.pmax(jax.lax.stop_gradient(z.max(-1)), "fsdp")
    lse = jnp.log(jax.lax.psum(jnp.exp(z - m[..., None]).sum(-1), "fsdp")) + m
    j, hit = _local_rows(targets, rows)
    gold = jax.lax.psum(jnp.where(hit, jnp.take_along_axis(z, j[..., None], axis=-1)[..., 0], 0.0), "fsdp")
    return jnp.sum(lse - gold)


def _chunked_sum(piece: Callable, h: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    B, T, D = h.shape
    if chunk <= 0 or chunk >= T:
        return piece(h, targets)
    if T % chunk:
        raise ValueError(f"loss_chunk {chunk} does not divide the sequence length {T}")
    n = T // chunk
    hs = h.reshape(B, n, chunk, D).swapaxes(0, 1)
    ys = targets.reshape(B, n, chunk).swapaxes(0, 1)
    piece = jax.checkpoint(piece, prevent_cse=False)
    _, sums = jax.lax.scan(lambda carry, hy: (carry, piece(*hy)), None, (hs, ys))
    return sums.sum()


def cross_entropy_sum(h: jax.Array, wte: jax.Array, targets: jax.Array, chunk: int = 0) -> jax.Array:
    """Summed cross-entropy of the tied output layer, ``chunk`` positions of T at a time.

    Each chunk's float32 logits (B, chunk, vocab) are made, reduced and, in the
    backward pass, made again (``jax.checkpoint``), so the (B, T, vocab) logits
    never exist at once. ``chunk`` 0 (or >= T): one piece. Under a mesh each
    device makes the logits of its fsdp group's positions for its slice of the
    vocabulary, and the log-sum-exp is summed over the group.
    """
    mesh = active_mesh()
    if not _vocab_parallel(mesh, h.shape[0]):
        return _chunked_sum(lambda h, y: _ce_sum(h, wte, y), h, targets, chunk)
    vocab = wte.shape[0]

    def local(h, w, y):
        def piece(h, y):  # one chunk of positions, gathered from the whole fsdp group
            gather = lambda a: jax.lax.all_gather(a, "fsdp", axis=0, tiled=True)  # noqa: E731
            return _ce_sum_vocab_slice(gather(h), w, gather(y), vocab)

        return jax.lax.psum(_chunked_sum(piece, h, y, chunk), "data")

    split = jax.shard_map(local, in_specs=(P(BATCH, None, None), P("fsdp", None), P(BATCH, None)), out_specs=P())
    return split(h, _split_vocab(wte, mesh), targets)
