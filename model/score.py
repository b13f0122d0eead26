"""Scoring and embedding texts with a trained model (``jagpt score``, ``jagpt embed``).

**Scoring.** A text is read as a document of its own, the way the shards hold
documents: ``<|endoftext|>`` (the end of the previous document), the text's
tokens, ``<|endoftext|>``. Its log-probability (natural log) is the sum over
every token after the first of log p(token | the tokens before it); with
``exclude_end`` the closing ``<|endoftext|>`` is left out, which scores the
text as a prefix rather than as a whole document. A text longer than the
model's context is scored in windows of the context that overlap by half:
every token is scored once, with at least half a context before it (except in
the first window).

**Embedding.** The final hidden states (after the last LayerNorm) of
``<|endoftext|>`` + the text's tokens, either averaged over the text's tokens
(``mean``; the leading ``<|endoftext|>``, the same for every text, is left out;
an empty text gets its state) or taken at the last token (``last``). A text
longer than the context is cut to its first ``context - 1`` tokens.

Texts are batched by length: each batch is padded to a power of two of
positions (at most the context; padding comes after the text, so causal
attention never sees it) and of rows, so a run compiles one program per
(length, rows) bucket, not one per text.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from encoder.bpe import Encoder
from model.decode import bucket
from model.gpt import GPT, logits as tied_logits

Pooling = Literal["mean", "last"]
# positions x rows of float32 logits made at once (vocabulary-wide): 512 rows of a 32k vocabulary is 64 MB
LOGIT_ROWS = 512


@dataclass
class Scored:
    text: str
    logprob: float  # natural log
    ids: list[int] = field(default_factory=list)  # the tokens scored, in order
    logprobs: list[float] = field(default_factory=list)  # one per scored token


def _chunk(T: int, rows: int) -> int:
    """Positions per logits piece: a power of two dividing T, with at most LOGIT_ROWS rows in a piece."""
    want = max(1, LOGIT_ROWS // max(rows, 1))
    c = 1
    while c * 2 <= want and T % (c * 2) == 0:
        c *= 2
    return c


@functools.partial(jax.jit, static_argnums=(0, 4))
def _gold_logprobs(graphdef, state, x: jax.Array, y: jax.Array, chunk: int) -> jax.Array:
    """log p(y[b, t] | x[b, :t + 1]) for every position, float32 (B, T)."""
    model = nnx.merge(graphdef, state)
    h = model.hidden(x)
    wte = model.wte[...]
    B, T, D = h.shape
    hs = h.reshape(B, T // chunk, chunk, D).swapaxes(0, 1)
    ys = y.reshape(B, T // chunk, chunk).swapaxes(0, 1)

    def piece(args):
        hc, yc = args
        z = tied_logits(hc, wte)
        return jnp.take_along_axis(z, yc[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(z, axis=-1)

    return jax.lax.map(piece, (hs, ys)).swapaxes(0, 1).reshape(B, T)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _pooled(graphdef, state, x: jax.Array, lengths: jax.Array, pooling: str) -> jax.Array:
    """Pooled final hidden states, float32 (B, d); ``lengths`` counts the leading end token."""
    model = nnx.merge(graphdef, state)
    h = model.hidden(x).astype(jnp.float32)
    if pooling == "last":
        return jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    pos = jnp.arange(x.shape[1])[None, :]
    first = jnp.where(lengths > 1, 1, 0)[:, None]  # the text's tokens; an empty text: the end token's state
    mask = ((pos >= first) & (pos < lengths[:, None])).astype(jnp.float32)
    return jnp.einsum("bt,btd->bd", mask, h) / mask.sum(axis=1)[:, None]


def _batches(lengths: Sequence[int], ctx: int, batch_tokens: int) -> Iterator[tuple[int, list[int]]]:
    """(padded length, indices) batches of items grouped by length bucket, longest first."""
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_bucket.setdefault(bucket(max(n, 1), ctx), []).append(i)
    for T in sorted(by_bucket, reverse=True):
        items = by_bucket[T]
        rows = max(1, batch_tokens // T)
        for k in range(0, len(items), rows):
            yield T, items[k:k + rows]


def _rows(n: int) -> int:
    """Rows of a batch of ``n`` items: a power of two, so batch shapes come from a short list too."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class _Window:
    item: int  # index of the text
    inputs: list[int]  # at most the context
    targets: list[int]  # same length
    first: int  # the first target scored here (the earlier ones were scored in the window before)


def _windows(item: int, seq: list[int], ctx: int) -> list[_Window]:
    inputs, targets = seq[:-1], seq[1:]
    if len(inputs) <= ctx:
        return [_Window(item, inputs, targets, 0)]
    stride = max(1, ctx // 2)
    out, done, start = [], 0, 0
    while done < len(targets):
        end = min(start + ctx, len(targets))
        out.append(_Window(item, inputs[start:end], targets[start:end], done - start))
        done = end
        start += stride
    return out


def score_texts(
    model: GPT, encoder: Encoder, texts: Sequence[str], exclude_end: bool = False, batch_tokens: int = 8192,
) -> list[Scored]:
    """Each text's log-probability and its tokens' (see the module doc)."""
    ctx, eot = model.cfg.seq_len, encoder.eot_id
    graphdef, state = nnx.split(model)
    seqs = [[eot, *ids, eot] for ids in encoder.encode_batch(list(texts))]
    windows = [w for i, seq in enumerate(seqs) for w in _windows(i, seq, ctx)]
    per_window: list[np.ndarray | None] = [None] * len(windows)
    for T, members in _batches([len(w.inputs) for w in windows], ctx, batch_tokens):
        x = np.full((_rows(len(members)), T), encoder.pad_id, np.int32)
        y = np.zeros_like(x)
        for r, k in enumerate(members):
            n = len(windows[k].inputs)
            x[r, :n], y[r, :n] = windows[k].inputs, windows[k].targets
        lp = np.asarray(_gold_logprobs(graphdef, state, x, y, _chunk(T, len(x))))
        for r, k in enumerate(members):
            per_window[k] = lp[r, windows[k].first:len(windows[k].inputs)]
    out = [Scored(t, 0.0) for t in texts]
    for w, lp in zip(windows, per_window):
        out[w.item].logprobs.extend(float(v) for v in lp)
    for s, seq in zip(out, seqs):
        s.ids = seq[1:]
        if exclude_end:
            s.ids, s.logprobs = s.ids[:-1], s.logprobs[:-1]
        s.logprob = float(np.sum(np.asarray(s.logprobs, np.float64)))
    return out


def embed_texts(
    model: GPT, encoder: Encoder, texts: Sequence[str], pooling: Pooling = "mean", normalize: bool = False,
    batch_tokens: int = 8192,
) -> tuple[np.ndarray, list[int]]:
    """(float32 vectors (N, d_model), indices of the texts cut to the context)."""
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be mean or last, not {pooling!r}")
    ctx, eot = model.cfg.seq_len, encoder.eot_id
    graphdef, state = nnx.split(model)
    encoded = encoder.encode_batch(list(texts))
    seqs = [[eot, *ids][:ctx] for ids in encoded]
    cut = [i for i, ids in enumerate(encoded) if len(ids) + 1 > ctx]
    vectors = np.zeros((len(seqs), model.cfg.d_model), np.float32)
    for T, members in _batches([len(s) for s in seqs], ctx, batch_tokens):
        x = np.full((_rows(len(members)), T), encoder.pad_id, np.int32)
        lengths = np.ones(len(x), np.int32)
        for r, k in enumerate(members):
            x[r, :len(seqs[k])] = seqs[k]
            lengths[r] = len(seqs[k])
        vectors[members] = np.asarray(_pooled(graphdef, state, x, lengths, pooling))[:len(members)]
    if normalize:
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors, cut
