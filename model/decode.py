"""Generation with a key/value cache, compiled once per shape bucket.

The GPT of :mod:`model.gpt` recomputes every position on each call. Here the
keys and values of every layer are kept in a cache of shape
``(n_layer, batch, S, n_head, d_head)``, so a new token costs one position's
work (plus attention over the cache) instead of the whole window's:

* **prefill** runs the prompt, padded to a bucket of ``P`` positions, writes
  its keys and values into cache slots ``[0, P)`` and samples the first new
  token from the logits at the prompt's last real position;
* **decode** runs one token at position ``pos``, writes slot ``pos`` and
  attends to slots ``<= pos``, then samples the next token.

Both read the same parameters as :class:`model.gpt.GPT` (the stacked
``blocks``, scanned over layers) and compute in its ``compute_dtype``.
Shapes are bucketed: ``S`` and ``P`` are powers of two (at least
:data:`MIN_BUCKET`, at most the model's context), so a session of prompts and
lengths compiles a handful of programs; within a generation every decode step
has the same shapes and runs the same compiled program. Padded prompt slots
beyond the prompt's length are never attended to: decode overwrites slot
``pos`` before it reads it, and the mask stops at ``pos``.

Sampling is part of each compiled step: temperature (0 means greedy), top-k,
top-p (nucleus, over what top-k kept) and a ban on ``<|endoftext|>`` until
``min_new_tokens`` have been generated. They are traced values, except the
size of the candidate list (:func:`candidates`: the next power of two above
top-k, or the whole vocabulary when top-k is off), so changing them does not
recompile; the draw is made among those candidates. Each row of a batch has its own PRNG key, ``fold_in(PRNGKey(seed),
row)``, so sample ``i`` of a batch and sample ``i`` generated alone draw from
the same key sequence.

When a generation fills the model's context, the most recent ``context // 2``
tokens are prefilled again into the same cache (positions are learned, so a
cache cannot be shifted), and decoding goes on from there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.gpt import GPT, layer_norm, logits as tied_logits

MIN_BUCKET = 16


def bucket(n: int, limit: int, smallest: int = MIN_BUCKET) -> int:
    """The smallest power of two >= ``n`` (and >= ``smallest``), at most ``limit``."""
    if n > limit:
        raise ValueError(f"{n} positions do not fit in a context of {limit}")
    return min(limit, max(smallest, 1 << max(n - 1, 0).bit_length()))


def candidates(top_k: int, vocab_size: int) -> int:
    """How many of the highest logits a compiled sampler keeps sorted: top-k rounded up to a power
    of two, or the whole vocabulary when top-k is off (0)."""
    if top_k <= 0 or top_k >= vocab_size:
        return vocab_size
    return min(vocab_size, 1 << max(top_k - 1, 0).bit_length())


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. ``temperature`` 0: greedy; ``top_k`` 0 and ``top_p`` 1: off."""

    temperature: float = 1.0
    top_k: int = 40
    top_p: float = 1.0
    min_new_tokens: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")


# -- the cached forward pass ---------------------------------------------------------------------


def forward_cached(params: dict, tokens: jax.Array, start, cache: dict, n_head: int, dtype) -> tuple[jax.Array, dict]:
    """Final hidden states (B, T, d) of ``tokens`` at positions ``start .. start + T - 1``, attending to
    the cache's earlier positions; returns them with the cache holding these positions too.

    ``params`` is the GPT's pure state dict; ``cache`` holds ``k`` and ``v`` of shape
    (n_layer, B, S, n_head, d_head). The same arithmetic as :func:`model.gpt.block`.
    """
    B, T = tokens.shape
    L, _, S, H, Dh = cache["k"].shape
    c = lambda a: a.astype(dtype)  # noqa: E731
    positions = start + jnp.arange(T)
    mask = jnp.arange(S)[None, :] <= positions[:, None]  # (T, S): causal over the cache
    x = (params["wte"][tokens] + jax.lax.dynamic_slice_in_dim(params["wpe"], start, T)).astype(dtype)
    scale = 1.0 / math.sqrt(Dh)

    def layer(carry, xs):
        x, ck, cv = carry
        i, p = xs
        h = layer_norm(x, p["ln_1"]["scale"], p["ln_1"]["bias"], dtype)
        qkv = jnp.einsum("btd,dkf->btkf", h, c(p["c_attn"]["kernel"])) + c(p["c_attn"]["bias"])
        qkv = qkv.reshape(B, T, 3, H, Dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (i, 0, start, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (i, 0, start, 0, 0))
        keys, values = ck[i], cv[i]  # (B, S, H, Dh)
        scores = jnp.einsum("bthd,bshd->bhts", q, keys, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask[None, None], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
        y = jnp.einsum("bhts,bshd->bthd", weights, values).reshape(B, T, H * Dh)
        x = x + jnp.einsum("btf,fd->btd", y, c(p["attn_proj"]["kernel"])) + c(p["attn_proj"]["bias"])
        h = layer_norm(x, p["ln_2"]["scale"], p["ln_2"]["bias"], dtype)
        h = jnp.einsum("btd,df->btf", h, c(p["c_fc"]["kernel"])) + c(p["c_fc"]["bias"])
        h = jax.nn.gelu(h, approximate=True)
        x = x + jnp.einsum("btf,fd->btd", h, c(p["mlp_proj"]["kernel"])) + c(p["mlp_proj"]["bias"])
        return (x, ck, cv), None

    (x, ck, cv), _ = jax.lax.scan(layer, (x, cache["k"], cache["v"]), (jnp.arange(L), params["blocks"]))
    return layer_norm(x, params["ln_f"]["scale"], params["ln_f"]["bias"], dtype), {"k": ck, "v": cv}


def empty_cache(params: dict, n_head: int, batch: int, length: int, dtype) -> dict:
    n_layer, d = params["blocks"]["ln_1"]["scale"].shape
    shape = (n_layer, batch, length, n_head, d // n_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


# -- sampling --------------------------------------------------------------------------------------


def sample(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p, k_cap: int) -> jax.Array:
    """One token id per row of float32 ``logits`` (B, V), each row with its own key.

    Top-k keeps the ``top_k`` highest logits, top-p then keeps the smallest
    set of those, highest first, whose probability reaches ``top_p``;
    temperature 0 takes the highest logit. The draw is made among the
    ``k_cap`` highest logits only (:func:`candidates`: all of them when top-k
    is off), so its cost does not grow with the vocabulary.
    """
    V = logits.shape[-1]
    greedy = temperature <= 0
    z = logits / jnp.where(greedy, 1.0, temperature)
    ranked, index = jax.lax.top_k(z, k_cap)  # (B, k_cap), descending
    k = jnp.clip(jnp.where(top_k > 0, top_k, V), 1, k_cap)
    ranked = jnp.where(jnp.arange(k_cap) < k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better candidates
    ranked = jnp.where((before < top_p) | (jnp.arange(k_cap) == 0), ranked, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, ranked)
    drawn = jnp.take_along_axis(index, choice[:, None], axis=-1)[:, 0]
    return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


def _next(h_last: jax.Array, params: dict, keys, temperature, top_k, top_p, eot, ban_eot, k_cap: int):
    logits = tied_logits(h_last[:, None], params["wte"])[:, 0]
    logits = logits.at[:, eot].set(jnp.where(ban_eot, -jnp.inf, logits[:, eot]))
    pairs = jax.vmap(lambda key: jax.random.split(key))(keys)
    token = sample(logits, pairs[:, 1], temperature, top_k, top_p, k_cap)
    return token, logits, pairs[:, 0]


@functools.partial(jax.jit, static_argnames=("n_head", "dtype", "cache_len", "k_cap"))
def prefill(params, tokens, length, keys, temperature, top_k, top_p, eot, ban_eot, *, n_head: int, dtype,
            cache_len: int, k_cap: int):
    """Run the padded prompts ``tokens`` (B, P), whose last real position is ``length - 1``, into a
    fresh cache of ``cache_len`` slots; sample the first new token. Returns
    (tokens (B,), logits (B, V), keys, cache)."""
    B = tokens.shape[0]
    h, cache = forward_cached(params, tokens, 0, empty_cache(params, n_head, B, cache_len, dtype), n_head, dtype)
    h_last = jax.lax.dynamic_index_in_dim(h, length - 1, axis=1, keepdims=False)
    token, logits, keys = _next(h_last, params, keys, temperature, top_k, top_p, eot, ban_eot, k_cap)
    return token, logits, keys, cache


@functools.partial(jax.jit, static_argnames=("n_head", "dtype", "k_cap"), donate_argnames=("cache",))
def decode_step(params, cache, token, pos, keys, temperature, top_k, top_p, eot, ban_eot, *, n_head: int,
                dtype, k_cap: int):
    """Run ``token`` (B,) at position ``pos`` and sample the next. Returns (tokens, logits, keys, cache)."""
    h, cache = forward_cached(params, token[:, None], pos, cache, n_head, dtype)
    token, logits, keys = _next(h[:, 0], params, keys, temperature, top_k, top_p, eot, ban_eot, k_cap)
    return token, logits, keys, cache


# -- the host loop -----------------------------------------------------------------------------------


def row_keys(seed: int, rows: Sequence[int]) -> jax.Array:
    base = jax.random.PRNGKey(seed)
    return jnp.stack([jax.random.fold_in(base, r) for r in rows])


class Decoder:
    """A GPT's parameters and the bucketed, cached sampling loop over them."""

    def __init__(self, model: GPT):
        self.cfg = model.cfg
        self.dtype = jnp.dtype(model.compute_dtype)
        self.params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eot_id: int,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        rows: Sequence[int] = (0,),
        return_logits: bool = False,
    ) -> Iterator[np.ndarray]:
        """Yield, per step, the new token of each row (int32 (B,); -1 once a row has ended).

        Every row continues the same prompt; row ``r`` samples with the key
        ``fold_in(PRNGKey(seed), r)``. A row ends at ``<|endoftext|>`` (not
        yielded) or after ``max_new_tokens``; the loop ends when all have.
        ``return_logits``: yield (tokens, float32 logits (B, V) they were drawn from).
        """
        cfg, ctx = self.cfg, self.cfg.seq_len
        if max_new_tokens <= 0:
            return
        ids = list(prompt_ids) or [eot_id]
        if len(ids) >= ctx:
            ids = ids[-(ctx - 1):]
        B = len(rows)
        cache_len = bucket(min(len(ids) + max_new_tokens, ctx), ctx)
        k_cap = candidates(sampling.top_k, cfg.vocab_size)
        static = {"n_head": cfg.n_head, "dtype": self.dtype, "k_cap": k_cap}
        knobs = (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p),
                 jnp.int32(eot_id))
        keys = row_keys(seed, rows)
        history = [list(ids) for _ in range(B)]  # per row: what the model has seen, for a refill
        done = np.zeros(B, dtype=bool)

        def fill(context: list[list[int]], n_new: int):
            n = len(context[0])
            padded = np.full((B, bucket(n, ctx)), eot_id, dtype=np.int32)
            padded[:, :n] = context
            return prefill(self.params, padded, jnp.int32(n), keys, *knobs, jnp.bool_(n_new < sampling.min_new_tokens),
                           cache_len=cache_len, **static), n

        (token, logits, keys, cache), pos = fill(history, 0)
        for n_new in range(max_new_tokens):
            step_token, step_logits = token, logits
            last = n_new + 1 == max_new_tokens
            if not last and pos < ctx:
                # Dispatched before this step's token is read, so the device runs ahead of the host.
                token, logits, keys, cache = decode_step(
                    self.params, cache, token, jnp.int32(pos), keys, *knobs,
                    jnp.bool_(n_new + 1 < sampling.min_new_tokens), **static)
            out = np.asarray(step_token).astype(np.int32)
            out[done] = -1
            done |= out == eot_id
            out[out == eot_id] = -1
            if done.all():
                return
            yield (out, np.asarray(step_logits)) if return_logits else out
            for r in range(B):
                history[r].append(int(out[r]) if out[r] >= 0 else eot_id)
            if last:
                return
            pos += 1
            if pos > ctx:  # the context is full: start again from its most recent half
                (token, logits, keys, cache), pos = fill([h[-(ctx // 2):] for h in history], n_new + 1)
