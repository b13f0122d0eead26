"""Tokenize the corpus into fixed-size shards of token ids, with a manifest.

Layout under the step's folder::

    train/shard-00000.npy ...   uint16 (uint32 if the vocabulary needs it)
    val/shard-00000.npy ...
    manifest.json               token counts, sha256 per shard, tokenizer id

Documents go to train or val by a hash of their doc id, so the split is stable
as the corpus grows. Each document is followed by ``<|endoftext|>``. The
train split follows the corpus mixture (:mod:`corpus.mixture`): a document is
written as many times as its weight says (0, 1 or more, copies adjacent); val
keeps every held-out document once. The manifest counts documents and tokens
per ``"genre / source"`` and split, before and after the mixture.
"""

from __future__ import annotations

import hashlib
import io
import time

import numpy as np
from pydantic import Field

from corpus.mixture import MixtureSettings, group_key
from corpus.settings import Settings
from corpus.storage import Storage
from encoder.bpe import Encoder


class ShardSettings(Settings):
    shard_tokens: int = Field(default=16 * 1024 * 1024, gt=0)
    val_fraction: float = Field(default=0.05, gt=0, lt=1)
    batch_docs: int = Field(default=256, gt=0)


def is_val(doc_id: str, fraction: float) -> bool:
    return int(doc_id[:8], 16) / 0x1_0000_0000 < fraction


class _ShardWriter:
    def __init__(self, storage: Storage, folder: str, split: str, shard_tokens: int, dtype):
        self.storage, self.folder, self.split = storage, folder, split
        self.shard_tokens, self.dtype = shard_tokens, dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.documents = 0
        # Per "genre / source": the split's distinct documents and their tokens (each once),
        # and the documents and tokens written (copies included).
        self.composition: dict[str, dict[str, int]] = {}

    def add(self, ids: list[int], group: str = "", copies: int = 1) -> None:
        c = self.composition.setdefault(group, {"documents": 0, "tokens": 0, "written_documents": 0, "written_tokens": 0})
        c["documents"] += 1
        c["tokens"] += len(ids)
        c["written_documents"] += copies
        c["written_tokens"] += copies * len(ids)
        if not copies:
            return
        array = np.asarray(ids, dtype=self.dtype)
        for _ in range(copies):
            self.buffer.append(array)
            self.buffered += len(array)
            self.documents += 1
            while self.buffered >= self.shard_tokens:
                self._write(self.shard_tokens)

    def _write(self, n: int) -> None:
        flat = np.concatenate(self.buffer)
        shard, rest = flat[:n], flat[n:]
        self.buffer, self.buffered = [rest], len(rest)
        buf = io.BytesIO()
        np.save(buf, shard, allow_pickle=False)
        data = buf.getvalue()
        rel = f"{self.split}/shard-{len(self.shards):05d}.npy"
        self.storage.write_bytes(f"{self.folder}/{rel}", data)
        self.shards.append({"path": rel, "tokens": int(len(shard)), "sha256": hashlib.sha256(data).hexdigest()})

    def close(self) -> dict:
        if self.buffered:
            self._write(self.buffered)
        return {
            "documents": self.documents,
            "tokens": sum(s["tokens"] for s in self.shards),
            "shards": self.shards,
            "composition": dict(sorted(self.composition.items())),
        }


def build_shards(
    storage: Storage,
    corpus_docs: list[str] | str,
    encoder: Encoder,
    settings: ShardSettings,
    out: str,
    corpus_id: str,
    mixture: MixtureSettings | None = None,
) -> dict:
    """Tokenize the corpus (its docs.parquet files, in order) into shards under ``out``; returns the manifest.

    Streams: documents are read and encoded ``batch_docs`` at a time, so memory
    does not grow with the corpus. A first pass over the doc ids only finds
    whether the hash split left ``val`` empty. Train documents are written
    ``mixture.copies(...)`` times each (the natural mixture: once).
    """
    mixture = mixture or MixtureSettings()
    files = [corpus_docs] if isinstance(corpus_docs, str) else list(corpus_docs)
    documents, any_val, smallest = 0, False, None
    for batch in storage.iter_parquet(files, columns=["doc_id"], batch_size=max(settings.batch_docs, 4096)):
        for d in batch.column(0).to_pylist():
            documents += 1
            any_val = any_val or is_val(d, settings.val_fraction)
            smallest = d if smallest is None or d < smallest else smallest
    forced_val = smallest if documents >= 2 and not any_val else None  # never an empty val split
    dtype = np.uint16 if encoder.vocab_size <= 65536 else np.uint32
    writers = {s: _ShardWriter(storage, out, s, settings.shard_tokens, dtype) for s in ("train", "val")}
    columns = ["doc_id", "genre", "source", "text"]
    for batch in storage.iter_parquet(files, columns=columns, batch_size=settings.batch_docs):
        doc_ids, genres, sources, texts = (batch.column(c).to_pylist() for c in columns)
        # Every document is encoded, dropped ones too: the manifest counts the natural tokens.
        for d, g, s, ids in zip(doc_ids, genres, sources, encoder.encode_batch(texts)):
            if d == forced_val or is_val(d, settings.val_fraction):
                writers["val"].add(ids + [encoder.eot_id], group_key(g, s))
            else:
                writers["train"].add(ids + [encoder.eot_id], group_key(g, s), mixture.copies(d, g, s))
    splits = {s: w.close() for s, w in writers.items()}
    if documents and not splits["train"]["documents"] and any(c["documents"] for c in splits["train"]["composition"].values()):
        raise ValueError(
            "the mixture leaves the train split empty: every train document has weight 0 "
            f"(mixture: {mixture.key()}, train documents by genre / source: "
            f"{ {k: v['documents'] for k, v in splits['train']['composition'].items()} })"
        )
    manifest = {
        "tokenizer_id": encoder.tokenizer_id,
        "vocab_size": encoder.vocab_size,
        "eot_id": encoder.eot_id,
        "dtype": np.dtype(dtype).name,
        "corpus": corpus_id,
        "mixture": mixture.model_dump(),
        "splits": splits,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(f"{out}/manifest.json", manifest)
    return manifest


def load_split(storage: Storage, shards_dir: str, split: str, verify: bool = True) -> np.ndarray:
    """All tokens of one split, checked against the manifest's sha256."""
    manifest = storage.read_json(f"{shards_dir}/manifest.json")
    arrays = []
    for shard in manifest["splits"][split]["shards"]:
        data = storage.read_bytes(f"{shards_dir}/{shard['path']}")
        if verify and hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise ValueError(f"shard {shard['path']} in {storage.url(shards_dir)} does not match its manifest sha256")
        arrays.append(np.load(io.BytesIO(data), allow_pickle=False))
    if not arrays:
        raise ValueError(f"split {split!r} of {storage.url(shards_dir)} has no tokens")
    return np.concatenate(arrays)
