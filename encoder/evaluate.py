"""``jagpt encoder eval``: jagpt's encoder against baselines, on held-out text of the current corpus.

The corpus is split like the shards split it (:func:`encoder.shards.is_val`
on the doc id, ``shards.val_fraction``). Every tokenizer is trained on the
same training sample (the train documents, weighted by the mixture, cut at
``train_chars`` characters) with the same vocabulary size, and measured on the
same held-out documents (cut at ``eval_chars`` characters):

* ``jagpt``: :func:`encoder.bpe.train` with the config's encoder settings (or
  a stored tokenizer, which may have seen the held-out documents);
* ``tokenizers-library-bpe``: the same design trained and encoded by the
  tokenizers library (:class:`LibraryBPETokenizer`), which jagpt's compiled
  trainer and encoder replaced;
* SentencePiece BPE and unigram, with their default normalizer (NFKC plus
  whitespace folding) and with the identity normalizer; every other setting is
  SentencePiece's default (so no byte fallback: unseen characters become
  ``<unk>``), except ``hard_vocab_limit=False`` so a small corpus still trains;
* ``char-pair``: the seed's V1 idea, small and readable here
  (:class:`CharPairTokenizer`).

Figures per tokenizer (one row each): characters and UTF-8 bytes per token,
overall and on Japanese-only lines (lines whose letters are all kana or
kanji, each line encoded on its own); the share of byte-fallback tokens
(tokens whose bytes are not whole characters, such as a single raw byte of a
kanji); the share of unknown tokens; the share of the vocabulary seen; the
share of documents that decode to exactly their text; single-core encode speed
(one document at a time, in this process). The speed depends on the machine
and its load: compare rows of one run, not runs.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from collections.abc import Iterable

import numpy as np

from corpus.mixture import MixtureSettings
from corpus.storage import Storage
from encoder import bpe
from encoder.shards import is_val

DEFAULT_TRAIN_CHARS = 20_000_000
COLUMNS = [
    "tokenizer", "vocab_size", "chars_per_token", "bytes_per_token", "ja_chars_per_token", "ja_bytes_per_token",
    "byte_fallback", "unknown", "vocab_used", "round_trip_docs", "encode_mb_s",
]


# --- the held-out split -------------------------------------------------------------------------


def split_corpus(
    storage: Storage, files: list[str], val_fraction: float, mixture: MixtureSettings | None = None,
    train_chars: int = DEFAULT_TRAIN_CHARS, eval_chars: int = 10_000_000, batch: int = 1024,
) -> tuple[list[str], list[str]]:
    """(training sample, held-out texts) of the corpus in ``files``, split as the shards split it.

    The training sample holds each train document ``mixture.copies(...)`` times
    and is cut at ``train_chars`` characters; the held-out texts are whole val
    documents up to ``eval_chars`` characters (at least one). If the hash puts
    no document in val, the one with the smallest doc id goes there, as in the shards.
    """
    mixture = mixture or MixtureSettings()
    train: list[tuple[str, str]] = []
    val: list[str] = []
    train_left, val_left = train_chars, eval_chars
    smallest: tuple[str, str] | None = None
    any_val = False
    columns = ["doc_id", "genre", "source", "text"]
    for b in storage.iter_parquet(files, columns=columns, batch_size=batch):
        for d, g, s, t in zip(*(b.column(c).to_pylist() for c in columns)):
            t = t or ""
            if smallest is None or d < smallest[0]:
                smallest = (d, t)
            if is_val(d, val_fraction):
                any_val = True
                if val_left > 0 or not val:
                    val.append(t)
                    val_left -= len(t)
                continue
            for _ in range(mixture.copies(d, g, s)):
                if train_left <= 0:
                    break
                train.append((d, t[:train_left]))
                train_left -= len(t)
    if not any_val and smallest is not None and len({d for d, _ in train}) >= 2:
        val = [smallest[1]]
        train = [(d, t) for d, t in train if d != smallest[0]]
    if not train or not val:
        raise ValueError(
            f"the corpus has too few documents for a train and a held-out split ({len(train)} train, {len(val)} val)"
        )
    return [t for _, t in train], val


# --- tokenizers under one interface -------------------------------------------------------------


class Evaluated:
    """What the eval needs of a tokenizer: encode, decode, and which ids are byte fallback or unknown."""

    name: str
    vocab_size: int
    fallback: np.ndarray  # bool per id: the id's bytes are not whole characters
    unk_id: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class JagptTokenizer(Evaluated):
    def __init__(self, encoder: bpe.Encoder, name: str = "jagpt"):
        self.name, self.encoder = name, encoder
        self.tokenizer = encoder.tokenizer
        self.tokenizer.encode_special_tokens = True  # text is text
        self.vocab_size = encoder.vocab_size
        self.fallback = np.array([bpe.is_byte_token(self.tokenizer.id_to_token(i)) for i in range(self.vocab_size)])

    def encode(self, text: str) -> list[int]:
        return self.encoder.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoder.decode(ids)


class LibraryBPETokenizer(JagptTokenizer):
    """jagpt's encoder design (pieces, alphabet, byte fallback, ids) trained and encoded by the
    tokenizers library, as jagpt did before its own trainer and encoder (:mod:`encoder.trainer`,
    :mod:`encoder.kernels`): the row they must match or beat."""

    def __init__(self, texts: Iterable[str], settings: bpe.EncoderSettings):
        from tokenizers import trainers

        texts = list(texts)
        added = list(bpe.SPECIAL_TOKENS)
        room = settings.vocab_size - len(bpe.BYTE_TOKENS)
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(t)
        # The library's own limit_alphabet breaks ties in hash-map order; give it jagpt's alphabet.
        alphabet = sorted(counts, key=lambda c: (-counts[c], c))[: max(1, (room - len(added)) * 3 // 4)]
        tok = bpe.build_tokenizer()
        tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
            vocab_size=room, min_frequency=settings.min_frequency, special_tokens=added,
            initial_alphabet=alphabet, limit_alphabet=len(alphabet), max_token_length=settings.max_token_length,
            show_progress=False))
        model = json.loads(tok.to_str())["model"]
        tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in added]
        index = {t: i for i, t in enumerate(tokens)}
        pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        merges = [(index[a], index[b], index[a + b]) for a, b in pairs]
        super().__init__(bpe.Encoder(bpe.assemble(added, tokens, merges)), "tokenizers-library-bpe")

    def encode(self, text: str) -> list[int]:
        return self.encoder.reference_encode([text])[0]


class SentencePieceTokenizer(Evaluated):
    """A SentencePiece model trained in memory (``model_type`` bpe or unigram)."""

    def __init__(self, texts: Iterable[str], vocab_size: int, model_type: str, normalization: str | None, threads: int):
        import sentencepiece as spm

        # SentencePiece trains on sentences: feed it lines (it skips lines over 4192 bytes).
        lines = (line for t in texts for line in t.split("\n") if line.strip())
        model = io.BytesIO()
        options = {"model_type": model_type, "vocab_size": vocab_size, "hard_vocab_limit": False,
                   "num_threads": threads, "minloglevel": 2}
        if normalization:
            options["normalization_rule_name"] = normalization
        spm.SentencePieceTrainer.train(sentence_iterator=lines, model_writer=model, **options)
        self.sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
        self.name = f"sentencepiece-{model_type}-{normalization or 'default'}"
        self.vocab_size = self.sp.get_piece_size()
        self.unk_id = self.sp.unk_id()
        self.fallback = np.array([self.sp.is_byte(i) for i in range(self.vocab_size)], dtype=bool)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class CharPairTokenizer(Evaluated):
    """The seed's V1: frequent characters and character pairs, greedy longest match, byte fallback.

    Ids 0-255 are the bytes (an ASCII character is its byte); then the most
    frequent other characters, up to half of the ids left; then the most
    frequent pairs of adjacent characters fill the vocabulary. Encoding takes
    a known pair if one starts here, else a known character, else the
    character's UTF-8 bytes. Lossless, as every character has its bytes.
    """

    name = "char-pair"

    def __init__(self, texts: Iterable[str], vocab_size: int):
        chars: Counter[str] = Counter()
        pairs: Counter[str] = Counter()
        for t in texts:
            chars.update(t)
            pairs.update(a + b for a, b in zip(t, t[1:]))
        self.pieces: list[bytes] = [bytes([b]) for b in range(256)]
        self.chars = {chr(b): b for b in range(128)}
        for c, _ in chars.most_common():
            if len(self.pieces) >= 256 + (vocab_size - 256) // 2:
                break
            if c not in self.chars:
                self.chars[c] = len(self.pieces)
                self.pieces.append(c.encode("utf-8", "surrogatepass"))
        self.pairs: dict[str, int] = {}
        for p, _ in pairs.most_common(vocab_size - len(self.pieces)):
            self.pairs[p] = len(self.pieces)
            self.pieces.append(p.encode("utf-8", "surrogatepass"))
        self.vocab_size = len(self.pieces)
        self.fallback = np.zeros(self.vocab_size, dtype=bool)
        self.fallback[128:256] = True

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        i, n = 0, len(text)
        while i < n:
            pair = self.pairs.get(text[i : i + 2])
            if pair is not None:
                out.append(pair)
                i += 2
                continue
            c = text[i]
            known = self.chars.get(c)
            if known is not None:
                out.append(known)
            else:
                out.extend(c.encode("utf-8", "surrogatepass"))
            i += 1
        return out

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", "surrogatepass")


# --- the figures --------------------------------------------------------------------------------


def _is_japanese(c: str) -> bool:
    o = ord(c)
    return (
        0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9F  # kana, half-width kana
        or 0x3005 <= o <= 0x3007 or 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF  # 々〆〇, kanji
        or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x3FFFF
    )


def japanese_lines(texts: Iterable[str]) -> list[str]:
    """Lines with at least one letter, whose letters are all kana or kanji."""
    out = []
    for t in texts:
        for line in t.split("\n"):
            letters = [c for c in line if c.isalpha()]
            if letters and all(_is_japanese(c) for c in letters):
                out.append(line)
    return out


WARMUP_CHARS = 1_000_000


def measure(tok: Evaluated, texts: list[str], ja_lines: list[str], warmup: Iterable[str] = ()) -> dict:
    """One row of the table: ``tok`` on ``texts`` (and on ``ja_lines``).

    ``encode_mb_s`` is timed after encoding ``warmup`` (the training sample, up
    to ``WARMUP_CHARS``) untimed, as an encoder that has been sharding a corpus
    would be: thread pools started, buffers allocated, and a word cache (the
    BPE tokenizers keep one) holding the training text's words, not the
    held-out text's. A held-out document is encoded once, so no timing sees
    its own words cached.
    """
    for t in bpe.sample_texts(warmup, WARMUP_CHARS):
        tok.encode(t)
    n_tokens = fallback = unknown = exact = 0
    seconds = 0.0
    seen = np.zeros(tok.vocab_size, dtype=bool)
    for t in texts:
        start = time.perf_counter()
        ids = tok.encode(t)
        seconds += time.perf_counter() - start
        n_tokens += len(ids)
        if ids:
            a = np.asarray(ids)
            seen[a] = True
            fallback += int(tok.fallback[a].sum())
            if tok.unk_id is not None:
                unknown += int((a == tok.unk_id).sum())
        exact += tok.decode(ids) == t
    n_chars = sum(len(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    ja_tokens = sum(len(tok.encode(line)) for line in ja_lines)
    ja_chars = sum(len(line) for line in ja_lines)
    ja_bytes = sum(len(line.encode("utf-8")) for line in ja_lines)
    return {
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "chars_per_token": round(n_chars / max(n_tokens, 1), 3),
        "bytes_per_token": round(n_bytes / max(n_tokens, 1), 3),
        "ja_chars_per_token": round(ja_chars / max(ja_tokens, 1), 3),
        "ja_bytes_per_token": round(ja_bytes / max(ja_tokens, 1), 3),
        "byte_fallback": round(fallback / max(n_tokens, 1), 5),
        "unknown": round(unknown / max(n_tokens, 1), 5),
        "vocab_used": round(float(seen.mean()), 4),
        "round_trip_docs": round(exact / max(len(texts), 1), 4),
        "encode_mb_s": round(n_bytes / 1e6 / seconds, 3) if seconds else None,
    }


def evaluate(
    storage: Storage, files: list[str], settings: bpe.EncoderSettings, val_fraction: float,
    mixture: MixtureSettings | None = None, encoder: bpe.Encoder | None = None,
    train_chars: int = DEFAULT_TRAIN_CHARS, eval_chars: int = 10_000_000, tokenizer_id: str = "",
    threads: int | None = None,
) -> dict:
    """The eval table for the corpus in ``files``: jagpt's encoder (``encoder``, or one trained here
    with ``settings`` on the training sample) and the baselines, trained on that same sample with
    ``settings.vocab_size`` ids. Returns ``{"rows": [...], ...}``; ``"encoder"`` is the jagpt encoder."""
    sample, held_out = split_corpus(storage, files, val_fraction, mixture, train_chars, eval_chars)
    threads = threads or min(os.cpu_count() or 1, 16)
    trained_here = encoder is None
    if encoder is None:
        encoder = bpe.train(sample, settings.model_copy(update={"sample_chars": train_chars}), tokenizer_id)
    vocab = settings.vocab_size
    tokenizers: list[Evaluated] = [JagptTokenizer(encoder, "jagpt" if trained_here else f"jagpt {encoder.tokenizer_id}")]
    tokenizers.append(LibraryBPETokenizer(sample, settings))
    errors: dict[str, str] = {}
    for model_type in ("bpe", "unigram"):
        for normalization in (None, "identity"):
            try:
                tokenizers.append(SentencePieceTokenizer(sample, vocab, model_type, normalization, threads))
            except RuntimeError as e:  # e.g. a vocabulary smaller than the corpus's characters
                errors[f"sentencepiece-{model_type}-{normalization or 'default'}"] = str(e)
    tokenizers.append(CharPairTokenizer(sample, vocab))
    ja = japanese_lines(held_out)
    rows = [measure(t, held_out, ja, warmup=sample) for t in tokenizers]
    return {
        "tokenizer_id": encoder.tokenizer_id,
        "trained_here": trained_here,
        "vocab_size": vocab,
        "train_documents": len(sample),
        "train_chars": sum(len(t) for t in sample),
        "eval_documents": len(held_out),
        "eval_chars": sum(len(t) for t in held_out),
        "japanese_lines": len(ja),
        "rows": rows,
        "errors": errors,
        "encoder": encoder,
    }


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_eval(storage: Storage, out: str, result: dict) -> dict:
    """``eval.json`` and ``eval.md`` under ``out``, and ``tokenizer.json`` when the jagpt encoder was trained here."""
    result = dict(result)
    encoder = result.pop("encoder")
    if result["trained_here"]:
        storage.write_text(f"{out}/tokenizer.json", encoder.to_json())
    storage.write_json(f"{out}/eval.json", result)
    notes = "".join(f"\n{name} did not train: {e}\n" for name, e in result["errors"].items())
    storage.write_text(
        f"{out}/eval.md",
        f"# Encoder eval\n\nTrained on {result['train_documents']} documents ({result['train_chars']} characters), "
        f"measured on {result['eval_documents']} held-out documents ({result['eval_chars']} characters, "
        f"{result['japanese_lines']} Japanese-only lines); {result['vocab_size']} ids each.\n\n"
        + markdown_table(result["rows"]) + notes,
    )
    return result


def newest_tokenizer(storage: Storage) -> str:
    """The id of the newest finished encoder step (``tokenizers/<id>``)."""
    markers = storage.glob("tokenizers/*/_SUCCESS.json")
    if not markers:
        raise LookupError(f"no trained encoder under {storage.url('tokenizers')}: run `jagpt pipeline` first")
    found = [(storage.marker(m.rsplit("/", 1)[0]).get("finished_at", ""), m.rsplit("/", 2)[1]) for m in markers]
    return max(found)[1]


def table_artifact(rows: list[dict]) -> bool:
    """Publish the table as the Prefect artifact ``encoder-eval`` when inside a Prefect flow or task run."""
    try:
        from prefect.artifacts import create_table_artifact
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:
        return False
    if not (FlowRunContext.get() or TaskRunContext.get()):
        return False
    create_table_artifact(rows, key="encoder-eval", description="jagpt encoder eval: jagpt vs baselines on held-out text")
    return True
