"""Sampling text from a trained model, streamed as it comes.

The token loop is :class:`model.decode.Decoder` (a key/value cache, compiled
once per shape bucket); this module turns prompts into ids and ids back into
text. Text is handed out as soon as it decodes to whole characters: a
character outside the vocabulary is spelled by byte tokens (``<0xE3>`` ...),
and the first of them alone decodes to U+FFFD, so a piece ending in U+FFFD is
held back until the next token completes it (or the generation ends).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from encoder.bpe import Encoder
from model.decode import Decoder, Sampling
from model.gpt import GPT


def sample_ids(
    model: GPT, prompt_ids: list[int], max_new_tokens: int, eot_id: int, top_k: int = 40,
    temperature: float = 1.0, seed: int = 0, top_p: float = 1.0, min_new_tokens: int = 0,
) -> Iterator[int]:
    """Yield new token ids of one sample until ``max_new_tokens`` or ``<|endoftext|>``."""
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_new_tokens=min_new_tokens)
    for step in Decoder(model).generate(prompt_ids, max_new_tokens, eot_id, sampling, seed):
        yield int(step[0])


class TextStream:
    """Token ids in, text out: each :meth:`push` returns the text that became whole (maybe "")."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.pending: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.pending.append(token)
        piece = self.encoder.decode(self.pending)
        if not piece or piece.endswith("\ufffd"):
            return ""
        # Cut after a token that ends a character: decoding is additive from here on.
        self.pending = []
        self.text += piece
        return piece

    def flush(self) -> str:
        piece = self.encoder.decode(self.pending) if self.pending else ""
        self.pending = []
        self.text += piece
        return piece


def generate_samples(
    model: GPT | Decoder, encoder: Encoder, prompt: str, max_new_tokens: int = 100, sampling: Sampling = Sampling(),
    seed: int = 0, rows: Sequence[int] = (0,), on_text: Callable[[int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[str]:
    """The prompt's continuations, one per row of ``rows`` (sample ``r`` uses key ``fold_in(seed, r)``),
    generated as one batch. ``on_text(i, piece)`` receives the new text of the ``i``-th row as soon as
    it is whole; ``should_stop()`` is asked after every token (a client went away)."""
    decoder = model if isinstance(model, Decoder) else Decoder(model)
    streams = [TextStream(encoder) for _ in rows]
    for step in decoder.generate(encoder.encode(prompt), max_new_tokens, encoder.eot_id, sampling, seed, rows):
        for i, token in enumerate(step):
            if token >= 0:
                piece = streams[i].push(int(token))
                if piece and on_text:
                    on_text(i, piece)
        if should_stop is not None and should_stop():
            break
    for i, s in enumerate(streams):
        piece = s.flush()
        if piece and on_text:
            on_text(i, piece)
    return [s.text for s in streams]


def generate_text(
    model: GPT | Decoder, encoder: Encoder, prompt: str, max_new_tokens: int = 100, top_k: int = 40,
    temperature: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None,
    top_p: float = 1.0, min_new_tokens: int = 0, sample: int = 0,
) -> str:
    """One continuation of the prompt (sample number ``sample`` of ``seed``); ``on_text`` receives each
    new piece of text as soon as it decodes to whole characters."""
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_new_tokens=min_new_tokens)
    callback = (lambda _, piece: on_text(piece)) if on_text else None
    return generate_samples(model, encoder, prompt, max_new_tokens, sampling, seed, (sample,), callback)[0]
