"""A GPT-2/GPT-3 decoder in Flax NNX, laid out so it exports to HF ``GPT2LMHeadModel``.

Learned positions, pre-LayerNorm (eps 1e-5), GELU (tanh), biases everywhere,
and the output layer tied to the token embedding. The fused qkv projection is
[q | k | v], each head-major, as in GPT-2's ``c_attn``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig

LN_EPS = 1e-5


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        init = nnx.initializers.normal(0.02)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        resid_init = nnx.initializers.normal(0.02 / math.sqrt(2 * cfg.n_layer))
        self.n_head = cfg.n_head
        self.ln_1 = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.c_attn = nnx.Linear(d, 3 * d, kernel_init=init, rngs=rngs)
        self.attn_proj = nnx.Linear(d, d, kernel_init=resid_init, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.c_fc = nnx.Linear(d, 4 * d, kernel_init=init, rngs=rngs)
        self.mlp_proj = nnx.Linear(4 * d, d, kernel_init=resid_init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, D = x.shape
        qkv = self.c_attn(self.ln_1(x)).reshape(B, T, 3, self.n_head, D // self.n_head)
        y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
        x = x + self.attn_proj(y.reshape(B, T, D))
        return x + self.mlp_proj(jax.nn.gelu(self.c_fc(self.ln_2(x)), approximate=True))


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.wpe = nnx.Embed(cfg.seq_len, cfg.d_model, embedding_init=nnx.initializers.normal(0.01), rngs=rngs)
        self.h = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=LN_EPS, rngs=rngs)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        T = tokens.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context {self.cfg.seq_len}")
        x = self.wte(tokens) + self.wpe(jnp.arange(T))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits (B, T, vocab) for token ids (B, T)."""
        return self.wte.attend(self.hidden(tokens))
