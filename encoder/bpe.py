"""A lossless character-level BPE encoder for Japanese, stored in the HF ``tokenizers`` format.

* Training and encoding are jagpt's own, compiled (:mod:`encoder.trainer`,
  :mod:`encoder.kernels`): the library's trainer needs about 28 bytes of
  memory per byte of varied Japanese text and its encoder about 9 MB/s per
  core. The result is an ordinary ``tokenizer.json``: the library loads it,
  decodes with it, and encodes every text to the same ids (tested), so
  anyone can use a jagpt tokenizer without jagpt.

* Base tokens are characters, as in SentencePiece: a kanji seen in training is
  one token from the start, so the merges go to words. (A byte-level BPE
  spends two merges on every kanji before it can merge words; on Japanese it
  compresses measurably worse at the same vocabulary size.)
* Byte fallback: the 256 tokens ``<0x00>`` .. ``<0xFF>`` spell, as UTF-8
  bytes, any character not in the vocabulary, so no input is ever unknown and
  ``decode(encode(s)) == s`` for every valid string.
* No normalizer: normalization belongs to the corpus stage.
* Pre-tokenization does not look for spaces. It cuts text into pieces that BPE
  may merge within, never across: a run of Japanese script (kanji, hiragana
  and katakana together, with 々〆ゝゞー・), followed by any sentence
  punctuation and closing brackets (so ``ます。`` and ``した」`` can become
  tokens); Latin words; single digits; runs of spaces/tabs; U+3000 runs;
  newline runs; other punctuation runs.
* ``<|endoftext|>`` and ``<|pad|>`` are special tokens; text a user types that
  looks like them is encoded as plain text unless ``allow_special=True``.
* With ``reserved_tags``, the corpus stage's content tags (``<URL>`` ``<EMAIL>``
  ``<TEL>`` ``<DATE>`` ``<PRICE>``, :data:`corpus.normalize.CONTENT_TAGS`) are
  single added tokens that are *not* special: they are always matched, and
  decode to their own text, so a user who types ``<URL>`` gets the same token
  as a replaced URL and the encoder stays lossless.
* Ids: the added tokens come first, in a fixed order (``<|endoftext|>`` 0,
  ``<|pad|>`` 1, then the reserved tags 2-6 when enabled), then the 256 byte
  tokens, then the characters and merges in the order learned. A new special
  token is added to the end of :data:`SPECIAL_TOKENS` (before the tags); it
  shifts the later ids, which is safe because shards and checkpoints name
  their tokenizer id, and such a change bumps the encoder's step version.
* BPE-dropout (:meth:`Encoder.dropout`) re-segments an encoding with seeded
  random un-merges, for training-time augmentation (the shards' train split,
  ``shards.dropout``); :meth:`Encoder.encode` is always deterministic.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from functools import cached_property
from itertools import islice

import numpy as np
from pydantic import Field
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from corpus.normalize import CONTENT_TAGS
from corpus.settings import Settings

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOT, PAD]
# The corpus stage's content tags; reserved as plain (not special) added tokens when enabled.
RESERVED_TAGS = [tag for tag, _ in CONTENT_TAGS]
_TAG_SPLIT = re.compile("|".join(re.escape(t) for t in RESERVED_TAGS))

log = logging.getLogger(__name__)

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")

# The pre-tokenizer's character classes; encoder.kernels implements the same pattern.
NUMBER = r"\p{N}"
JAPANESE = r"[\p{Han}\p{Hiragana}\p{Katakana}々〆ゝゞー・]"
CLOSING = r"[、。！？!?…‥」』）)]"
LATIN = r"[A-Za-z]"
SYMBOL = r"[^\s\p{L}\p{N}]"
PRETOKENIZE_PATTERN = (
    rf"{NUMBER}|{JAPANESE}+{CLOSING}*|{LATIN}+|\r\n|\n+|[ \t]+|\x{{3000}}+|{SYMBOL}+"
)


class EncoderSettings(Settings):
    vocab_size: int = Field(default=32000, ge=len(SPECIAL_TOKENS) + len(RESERVED_TAGS) + 256 + 1, le=65536)
    min_frequency: int = Field(default=2, ge=1)
    max_token_length: int = Field(default=16, ge=1, description="characters, as the BPE trainer counts them")
    sample_chars: int = Field(
        default=100_000_000, gt=0, le=450_000_000,
        description="training text is cut at this many characters (at most 450 million, which the trainer's "
        "32-bit positions hold); the trainer needs about 9-11 bytes of memory per byte of varied UTF-8 text "
        "(100 million characters, about 300 MB of Japanese: about 3 GB)",
    )
    reserved_tags: bool = Field(
        default=False,
        description="reserve <URL> <EMAIL> <TEL> <DATE> <PRICE> as single tokens; "
        "the encoder stage also does when clean.content_tags is on",
    )
    tokenizer: str | None = Field(
        default=None,
        pattern=r"^tok-[0-9a-f]+$",
        description="use this stored tokenizer instead of training one on the corpus; "
        "pinned, a grown corpus encodes only its new links",
    )


class Encoder:
    """Encode and decode with a trained tokenizer."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_id: str = ""):
        self.tokenizer = tokenizer
        self.tokenizer_id = tokenizer_id
        self.eot_id = tokenizer.token_to_id(EOT)
        self.pad_id = tokenizer.token_to_id(PAD)

    @classmethod
    def from_json(cls, text: str, tokenizer_id: str = "") -> Encoder:
        return cls(Tokenizer.from_str(text), tokenizer_id)

    @cached_property
    def _merged_from(self) -> dict[int, tuple[int, int]]:
        """For each token a merge made, the two tokens it joined."""
        model = json.loads(self.tokenizer.to_str())["model"]
        vocab = model["vocab"]
        pairs = (m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"])
        return {vocab[a + b]: (vocab[a], vocab[b]) for a, b in pairs}

    def dropout(self, ids: list[int], p: float, rng: np.random.Generator) -> list[int]:
        """BPE-dropout on an encoding, for training-time augmentation: each merged token is
        undone, with probability ``p``, into the two tokens its merge joined, and so on down
        (a single character is never split). The same vocabulary, and still lossless: the
        pieces decode to the same text. Seeded by ``rng``, so it is reproducible.

        (The tokenizers library's own ``dropout`` puts a skipped merge back in the queue,
        so on a character-level vocabulary it almost never changes the result.)
        """
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        if p == 0.0:
            return list(ids)
        merged_from = self._merged_from
        out: list[int] = []
        stack = list(reversed(ids))
        while stack:
            token = stack.pop()
            pair = merged_from.get(token)
            if pair is not None and rng.random() < p:
                stack += (pair[1], pair[0])
            else:
                out.append(token)
        return out

    @property
    def reserved_tags(self) -> list[str]:
        """The content tags this encoder holds as single tokens (empty if none)."""
        return [t for t in RESERVED_TAGS if self.tokenizer.token_to_id(t) is not None]

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @cached_property
    def compiled(self):
        """The compiled encoder (:mod:`encoder.kernels`) for this tokenizer, or None where it
        does not implement the tokenizer and the library encodes."""
        try:
            return CompiledBPE(self.tokenizer)
        except Unsupported:
            return None

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        return self.encode_arrays([text], allow_special)[0].tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [a.tolist() for a in self.encode_arrays(texts)]

    def encode_arrays(self, texts: list[str], allow_special: bool = False) -> list[np.ndarray]:
        """The ids of each text as an int32 array; special tokens typed in the text are
        text unless ``allow_special``."""
        if self.compiled is not None:
            return self.compiled.encode_batch(texts, allow_special)
        return [np.array(e, np.int32) for e in self.reference_encode(texts, allow_special)]

    def reference_encode(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """The tokenizers library's encoding, which the compiled one must equal."""
        before = self.tokenizer.encode_special_tokens
        self.tokenizer.encode_special_tokens = not allow_special
        try:
            # encode_batch_fast: the same ids without character offsets, nearly twice as fast.
            return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            self.tokenizer.encode_special_tokens = before

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def _overlap(a: str, b: str) -> bool:
    """Whether an occurrence of ``a`` and one of ``b`` can share characters."""
    return a in b or b in a or any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))


class Unsupported(ValueError):
    """The tokenizer uses something :class:`CompiledBPE` does not implement."""


class CompiledBPE:
    """Encode with a jagpt tokenizer's vocabulary and merges, without the library
    (:mod:`encoder.kernels` says how), to the library's ids.

    Added tokens (``<|endoftext|>`` and ``<|pad|>`` when special tokens are
    allowed, the content tags always) are cut out first with a regex, longest
    first, and are single ids. A tokenizer that needs anything else (another
    pattern, a normalizer, truncation, added tokens that overlap) is refused
    with :class:`Unsupported`, and :class:`Encoder` uses the library for it.
    """

    def __init__(self, tokenizer: Tokenizer):
        from encoder import kernels  # numba: imported when first needed

        data = json.loads(tokenizer.to_str())
        model = data["model"]
        pre = data.get("pre_tokenizer") or {}
        checks = {
            "a BPE model": model.get("type") == "BPE",
            "byte fallback": model.get("byte_fallback") is True,
            "no dropout": model.get("dropout") is None,
            "merges applied to whole-vocabulary words too": not model.get("ignore_merges"),
            "no subword prefix or suffix": not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix"),
            "no normalizer": data.get("normalizer") is None,
            "jagpt's pre-tokenizer": pre.get("type") == "Split" and pre.get("behavior") == "Isolated"
            and not pre.get("invert") and pre.get("pattern") == {"Regex": PRETOKENIZE_PATTERN},
            "added tokens matched as typed": all(
                not (t["single_word"] or t["lstrip"] or t["rstrip"] or t["normalized"]) for t in data["added_tokens"]),
            # The library matches special tokens even when it then encodes them as text, so
            # one would hide a non-special token it overlaps; the regex here would not.
            "added tokens that do not overlap": not any(
                _overlap(s["content"], t["content"]) for s in data["added_tokens"] for t in data["added_tokens"]
                if s["special"] and not t["special"]),
            "no truncation or padding": data.get("truncation") is None and data.get("padding") is None,
        }
        missing = [what for what, ok in checks.items() if not ok]
        vocab: dict[str, int] = model["vocab"]
        missing += [f"byte token {t}" for t in BYTE_TOKENS if t not in vocab][:1]
        if missing:
            raise Unsupported("the compiled encoder needs " + ", ".join(missing))
        self.char_id = np.full(0x110000, -1, np.int32)
        for token, i in vocab.items():
            if len(token) == 1:
                self.char_id[ord(token)] = i
        self.byte_id = np.array([vocab[t] for t in BYTE_TOKENS], np.int32)
        pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        self.keys, self.values, self.shift = kernels.merge_table(
            [(vocab[a], vocab[b]) for a, b in pairs], [vocab[a + b] for a, b in pairs])
        self.classes = kernels.char_classes()
        self._encode_segments = kernels.encode_segments
        added = sorted(data["added_tokens"], key=lambda t: -len(t["content"]))
        self.added_ids = {t["content"]: t["id"] for t in added}
        self._always = self._pattern([t["content"] for t in added if not t["special"]])
        self._with_special = self._pattern([t["content"] for t in added])

    @staticmethod
    def _pattern(contents: list[str]) -> re.Pattern | None:
        return re.compile("|".join(map(re.escape, contents))) if contents else None

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[np.ndarray]:
        """The ids of each text (int32 arrays)."""
        if not texts:
            return []
        pattern = self._with_special if allow_special else self._always
        joined = "".join(texts)
        segments: list[tuple[int, int, int]] = []  # (start, end, added token id or -1) in ``joined``
        last = []
        pos = 0
        for text in texts:
            stop = pos + len(text)
            if pattern is not None:
                for m in pattern.finditer(joined, pos, stop):  # within this text only
                    if m.start() > pos:
                        segments.append((pos, m.start(), -1))
                    segments.append((m.start(), m.end(), self.added_ids[m.group()]))
                    pos = m.end()
            segments.append((pos, stop, -1))
            last.append(len(segments) - 1)
            pos = stop
        starts, ends, tokens = np.array(segments, np.int64).T.copy()
        ids, seg_ends = self._encode_segments(
            np.frombuffer(joined.encode("utf-32-le"), np.uint32), starts, ends, tokens,
            self.classes, self.char_id, self.byte_id, self.keys, self.values, self.shift)
        return np.split(ids, seg_ends[last][:-1])


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tok


def is_byte_token(token: str) -> bool:
    return bool(_BYTE_TOKEN.fullmatch(token))


def sample_texts(texts: Iterable[str], sample_chars: int) -> Iterator[str]:
    """``texts`` cut at ``sample_chars`` characters in all: the training sample."""
    budget = sample_chars
    for t in texts:
        if budget <= 0:
            return
        yield t[:budget]
        budget -= len(t)


FEED_CHARS = 4_000_000
LOG_EVERY_CHARS = 50_000_000


def train(texts: Iterable[str], settings: EncoderSettings, tokenizer_id: str = "") -> Encoder:
    """Train a BPE encoder on ``texts`` (cut at ``settings.sample_chars`` characters) with
    jagpt's compiled trainer (:mod:`encoder.trainer`), streaming: the text is counted as
    distinct pieces a few million characters at a time."""
    from encoder.trainer import PieceCounter, learn

    added = SPECIAL_TOKENS + (RESERVED_TAGS if settings.reserved_tags else [])
    counter = PieceCounter()
    batch: list[str] = []
    chars = fed = 0
    next_log = LOG_EVERY_CHARS
    start = time.perf_counter()
    for t in sample_texts(texts, settings.sample_chars):
        if settings.reserved_tags:
            # Encoding matches added tokens before pre-tokenizing, so the
            # text between tags is what BPE sees: train on the same pieces.
            batch.extend(p for p in _TAG_SPLIT.split(t) if p)
        else:
            batch.append(t)
        chars += len(t)
        if chars >= FEED_CHARS:
            counter.feed(batch)
            fed += chars
            batch, chars = [], 0
            if fed >= next_log:
                log.info("encoder: %d characters counted, %d distinct pieces", fed, counter.n)
                next_log += LOG_EVERY_CHARS
    counter.feed(batch)
    fed += chars
    log.info("encoder: %d characters in %d distinct pieces (%.1f s); learning merges", fed, counter.n,
             time.perf_counter() - start)
    room = settings.vocab_size - len(BYTE_TOKENS) - len(added)
    tokens, merges = learn(counter, max(1, room * 3 // 4), room, settings.min_frequency, settings.max_token_length)
    log.info("encoder: %d tokens, %d merges (%.1f s in all)", len(tokens), len(merges), time.perf_counter() - start)
    return Encoder(assemble(added, tokens, merges), tokenizer_id)


def assemble(added: list[str], tokens: list[str], merges: list[tuple[int, int, int]]) -> Tokenizer:
    """The tokenizers library's form of a trained vocabulary: ids in the order the module
    docstring gives, ``merges`` as (left, right, merged) indexes into ``tokens``."""
    order = added + BYTE_TOKENS + tokens
    vocab = {t: i for i, t in enumerate(order)}
    if len(vocab) != len(order):
        raise ValueError("a learned token spells an added or byte token")
    data = json.loads(build_tokenizer().to_str())
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [[tokens[a], tokens[b]] for a, b, _ in merges]
    data["added_tokens"] = [
        # The tags are not special: always matched, even when special tokens are encoded as text.
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": t not in RESERVED_TAGS}
        for i, t in enumerate(added)
    ]
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def stats(encoder: Encoder, texts: Iterable[str], batch: int = 1024) -> dict:
    """Characters and bytes per token on ``texts``, and whether they round-trip (streamed in batches)."""
    n_tokens = n_chars = n_bytes = 0
    exact = True
    it = iter(texts)
    while chunk := list(islice(it, batch)):
        ids = encoder.encode_batch(chunk)
        n_tokens += sum(len(i) for i in ids)
        n_chars += sum(len(t) for t in chunk)
        n_bytes += sum(len(t.encode("utf-8")) for t in chunk)
        exact = exact and all(encoder.decode(i) == t for i, t in zip(ids, chunk))
    return {
        "vocab_size": encoder.vocab_size,
        "tokens": n_tokens,
        "chars_per_token": round(n_chars / max(n_tokens, 1), 3),
        "bytes_per_token": round(n_bytes / max(n_tokens, 1), 3),
        "round_trip_exact": exact,
    }


def report_json(encoder: Encoder, texts: list[str]) -> str:
    return json.dumps({"tokenizer_id": encoder.tokenizer_id, **stats(encoder, texts)}, indent=2)
