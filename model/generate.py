"""Sampling from a trained model (top-k, temperature), streaming text as it comes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from encoder.bpe import Encoder
from model.gpt import GPT


@nnx.jit(static_argnames=("top_k",))
def _sample_next(model: GPT, window: jax.Array, length: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int):
    logits = model(window)[0, length - 1].astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits)


def sample_ids(
    model: GPT, prompt_ids: list[int], max_new_tokens: int, eot_id: int, top_k: int = 40,
    temperature: float = 1.0, seed: int = 0,
) -> Iterator[int]:
    """Yield new token ids until ``max_new_tokens`` or ``<|endoftext|>``.

    The window has a fixed shape (the model's context), so the step compiles once.
    """
    ctx = model.cfg.seq_len
    ids = list(prompt_ids) or [eot_id]
    key = jax.random.PRNGKey(seed)
    top_k = min(top_k, model.cfg.vocab_size) if top_k > 0 else 0
    for _ in range(max_new_tokens):
        recent = ids[-ctx:]
        window = np.zeros((1, ctx), dtype=np.int32)
        window[0, : len(recent)] = recent
        key, sub = jax.random.split(key)
        nxt = int(_sample_next(model, window, jnp.int32(len(recent)), sub, jnp.float32(max(temperature, 1e-5)), top_k))
        if nxt == eot_id:
            return
        ids.append(nxt)
        yield nxt


def generate_text(
    model: GPT, encoder: Encoder, prompt: str, max_new_tokens: int = 100, top_k: int = 40,
    temperature: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None,
) -> str:
    """The prompt's continuation. ``on_text`` receives each new piece of text as
    soon as it decodes to whole characters (byte-level tokens can split one)."""
    new: list[int] = []
    shown = ""
    for token in sample_ids(model, encoder.encode(prompt), max_new_tokens, encoder.eot_id, top_k, temperature, seed):
        new.append(token)
        text = encoder.decode(new)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            if on_text:
                on_text(text[len(shown):])
            shown = text
    text = encoder.decode(new)
    if on_text and len(text) > len(shown):
        on_text(text[len(shown):])
    return text
