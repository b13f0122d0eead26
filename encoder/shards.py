"""Tokenize the corpus into fixed-size shards of token ids, and read them back.

The corpus is a chain of dedup links, one ``docs.parquet`` each. Each link is
encoded once, into its own *part* (:func:`encode_part`). A shard *set*
(:func:`assemble`) is a manifest listing the shards of its parts in chain
order. When a weekly run adds a link, only that link is encoded: the older
parts are reused as they are and never encoded again.

Layout::

    <part>/train/shard-00000.bin ...   token ids, little-endian uint16 (uint32 when
    <part>/val/shard-00000.bin ...     the vocabulary needs it), no header
    <part>/part.json                   per split: its shards, documents, tokens, characters
    <set>/manifest.json                every part's shards, paths relative to <set>

How a part is made:

1. *Encode*: the link's documents stream through ``workers`` processes, a
   batch at a time; each document's ids and ``<|endoftext|>`` go to a local
   scratch file, so memory does not grow with the link.
2. *Split*: a document goes to val when its doc id hashes below
   ``val_fraction`` (:func:`is_val`), so it never lands in both splits and the
   split is stable as the corpus grows. The train split follows the mixture
   (:mod:`corpus.mixture`): a document is written 0, 1 or more times; val
   keeps each held-out document once.
3. *Shuffle*: each split's documents (train: each copy) are ordered by a
   seeded hash of (doc id, copy), so the order is fixed by the data and the
   seed alone, not by batch sizes or worker counts.
4. *Write*: in that order, into shards of ``shard_tokens`` tokens (the last one
   shorter; documents may span shards). Each shard is written atomically and
   retried on failure; ``part.json`` and the set's ``manifest.json`` are
   written last, so a half-written set is never read as whole.

With ``dropout`` > 0 the train split is encoded with BPE-dropout
(:meth:`encoder.bpe.Encoder.dropout`, training-time augmentation), seeded by
``shuffle_seed`` and the doc id, so such shards are reproducible too; the
copies of a weighted document share one segmentation. Val is always encoded plainly.

:class:`ShardReader` reads any range of a split by global token offset (the
trainer's loader needs it for exact resume) and checks shards against their
SHA-256 on request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import tempfile
import time
from collections.abc import Iterator

import numpy as np
from pydantic import Field

from corpus.mixture import MixtureSettings, group_key
from corpus.pool import pool_map
from corpus.settings import Settings
from corpus.storage import Storage, retrying
from encoder.bpe import Encoder

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


class ShardSettings(Settings):
    shard_tokens: int = Field(default=16 * 1024 * 1024, gt=0)
    val_fraction: float = Field(default=0.05, gt=0, lt=1)
    shuffle_seed: int = Field(default=0, description="seeds the order of documents within each split")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="BPE-dropout for the train split; 0 = off")
    batch_docs: int = Field(default=256, gt=0)
    workers: int = Field(default=0, ge=0, description="encoding processes; 0 = one per core")
    write_retries: int = Field(default=4, ge=1, description="attempts per shard write")


def is_val(doc_id: str, fraction: float) -> bool:
    return int(doc_id[:8], 16) / 0x1_0000_0000 < fraction


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def shuffle_key(seed: int, doc_id: str, copy: int) -> int:
    digest = hashlib.blake2b(f"shuffle:{seed}:{doc_id}:{copy}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


# -- encoding, in worker processes --------------------------------------------

_worker: dict = {}


def _init_encoder(tokenizer_json: str, dropout: float, seed: int) -> None:
    # One core per process: the tokenizers library would otherwise start a thread per core in each.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(encoder=Encoder.from_json(tokenizer_json), dropout=dropout, seed=seed)


def _encode(batch: tuple[list[str], list[str], list[str]]) -> list[np.ndarray]:
    """Ids of each text; train documents with BPE-dropout (when on), seeded by their doc id."""
    texts, splits, doc_ids = batch
    encoder, dropout = _worker["encoder"], _worker["dropout"]
    out = []
    for ids, split, doc_id in zip(encoder.encode_arrays(texts), splits, doc_ids):
        if dropout and split == "train":
            ids = encoder.dropout(ids.tolist(), dropout, np.random.default_rng([_worker["seed"], int(doc_id[:16], 16)]))
        out.append(np.asarray(ids, dtype=np.uint32))
    return out


# -- writing --------------------------------------------------------------------


class _ShardWriter:
    """Cuts one split's token stream into shards of ``shard_tokens`` and writes them."""

    def __init__(self, storage: Storage, folder: str, split: str, settings: ShardSettings, dtype: np.dtype):
        self.storage, self.folder, self.split = storage, folder, split
        self.shard_tokens, self.retries, self.dtype = settings.shard_tokens, settings.write_retries, dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        while self.buffered >= self.shard_tokens:
            self._write(self.shard_tokens)

    def _write(self, n: int) -> None:
        flat = np.concatenate(self.buffer)
        shard, rest = flat[:n], flat[n:]
        self.buffer, self.buffered = [rest], len(rest)
        data = shard.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        rel = f"{self.split}/shard-{len(self.shards):05d}.bin"
        target = f"{self.folder}/{rel}"
        retrying(lambda: self.storage.write_bytes(target, data), self.retries, f"writing {self.storage.url(target)}")
        self.shards.append({"path": rel, "tokens": int(len(shard)), "sha256": hashlib.sha256(data).hexdigest()})

    def close(self) -> list[dict]:
        if self.buffered:
            self._write(self.buffered)
        return self.shards


def encode_part(
    storage: Storage,
    docs_file: str,
    encoder: Encoder,
    settings: ShardSettings,
    out: str,
    mixture: MixtureSettings | None = None,
    never_empty_val: bool = False,
) -> dict:
    """Encode one corpus link (``docs_file``) into shards under ``out``; returns its ``part.json``.

    ``never_empty_val``: if no document of this link hashes into val and it
    has at least two, the one with the smallest doc id goes to val (the
    pipeline asks this of the first link, so a tiny corpus still has a val split).
    """
    mixture = mixture or MixtureSettings()
    dtype = token_dtype(encoder.vocab_size)
    forced_val = None
    if never_empty_val:
        ids = [d for b in storage.iter_parquet([docs_file], columns=["doc_id"], batch_size=65536) for d in b.column(0).to_pylist()]
        if len(ids) >= 2 and not any(is_val(d, settings.val_fraction) for d in ids):
            forced_val = min(ids)
    doc_ids: list[str] = []
    groups: list[str] = []
    splits: list[str] = []
    copies: list[int] = []
    chars: list[int] = []
    lengths: list[int] = []
    columns = ["doc_id", "genre", "source", "text"]

    def batches() -> Iterator[tuple[list[str], list[str], list[str]]]:
        for b in storage.iter_parquet([docs_file], columns=columns, batch_size=settings.batch_docs):
            ids, genres, sources, texts = (b.column(c).to_pylist() for c in columns)
            split = ["val" if d == forced_val or is_val(d, settings.val_fraction) else "train" for d in ids]
            doc_ids.extend(ids)
            groups.extend(group_key(g, s) for g, s in zip(genres, sources))
            splits.extend(split)
            copies.extend(1 if sp == "val" else mixture.copies(d, g, s) for d, g, s, sp in zip(ids, genres, sources, split))
            chars.extend(len(t) for t in texts)
            yield texts, split, ids

    workers = settings.workers or os.cpu_count() or 1
    eot = np.array([encoder.eot_id], dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="jagpt-shards-") as tmp:
        scratch = os.path.join(tmp, "tokens.bin")
        with open(scratch, "wb") as f:
            for arrays in pool_map(_encode, batches(), workers, _init_encoder, (encoder.to_json(), settings.dropout, settings.shuffle_seed)):
                for a in arrays:
                    f.write(a.astype(dtype).tobytes())
                    f.write(eot.tobytes())
                    lengths.append(len(a) + 1)
        starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        tokens = np.memmap(scratch, dtype=dtype, mode="r") if starts[-1] else np.empty(0, dtype)
        part: dict = {"tokenizer_id": encoder.tokenizer_id, "vocab_size": encoder.vocab_size, "eot_id": encoder.eot_id,
                      "dtype": dtype.name, "source": docs_file, "splits": {}}
        for split in SPLITS:
            order = sorted(
                (shuffle_key(settings.shuffle_seed, doc_ids[i], c), i)
                for i in range(len(doc_ids)) if splits[i] == split for c in range(copies[i])
            )
            writer = _ShardWriter(storage, out, split, settings, dtype)
            for _, i in order:
                writer.add(np.asarray(tokens[starts[i]:starts[i + 1]]))
            shards = writer.close()
            composition: dict[str, dict[str, int]] = {}
            for i in (i for i in range(len(doc_ids)) if splits[i] == split):
                c = composition.setdefault(groups[i], {"documents": 0, "tokens": 0, "written_documents": 0, "written_tokens": 0})
                c["documents"] += 1
                c["tokens"] += lengths[i]
                c["written_documents"] += copies[i]
                c["written_tokens"] += copies[i] * lengths[i]
            part["splits"][split] = {
                "documents": len(order),
                "tokens": sum(s["tokens"] for s in shards),
                "chars": sum(chars[i] for _, i in order),
                "shards": shards,
                "composition": dict(sorted(composition.items())),
            }
        del tokens
    storage.write_json(f"{out}/part.json", part)
    return part


def assemble(storage: Storage, parts: list[str], out: str, corpus_id: str, settings: ShardSettings,
             mixture: MixtureSettings | None = None) -> dict:
    """The shard set of ``parts`` (folders with a ``part.json``, in chain order): writes ``out/manifest.json``."""
    mixture = mixture or MixtureSettings()
    infos = [storage.read_json(f"{p}/part.json") for p in parts]
    if not infos:
        raise ValueError("a shard set needs at least one part")
    first = infos[0]
    for p, info in zip(parts, infos):
        if (info["tokenizer_id"], info["dtype"]) != (first["tokenizer_id"], first["dtype"]):
            raise ValueError(
                f"part {storage.url(p)} was encoded with tokenizer {info['tokenizer_id']} ({info['dtype']}), "
                f"the first part with {first['tokenizer_id']} ({first['dtype']}): they cannot form one shard set"
            )
    splits = {}
    for split in SPLITS:
        composition: dict[str, dict[str, int]] = {}
        for info in infos:
            for k, v in info["splits"][split]["composition"].items():
                c = composition.setdefault(k, dict.fromkeys(v, 0))
                for field, n in v.items():
                    c[field] += n
        splits[split] = {
            "documents": sum(i["splits"][split]["documents"] for i in infos),
            "tokens": sum(i["splits"][split]["tokens"] for i in infos),
            "chars": sum(i["splits"][split]["chars"] for i in infos),
            "shards": [
                {**s, "path": posixpath.relpath(f"{p}/{s['path']}", out)}
                for p, info in zip(parts, infos) for s in info["splits"][split]["shards"]
            ],
            "composition": dict(sorted(composition.items())),
        }
    train = splits["train"]
    if not train["documents"] and any(c["documents"] for c in train["composition"].values()):
        raise ValueError(
            "the mixture leaves the train split empty: every train document has weight 0 "
            f"(mixture: {mixture.key()}, train documents by genre / source: "
            f"{ {k: v['documents'] for k, v in train['composition'].items()} })"
        )
    manifest = {
        "tokenizer_id": first["tokenizer_id"],
        "vocab_size": first["vocab_size"],
        "eot_id": first["eot_id"],
        "dtype": first["dtype"],
        "corpus": corpus_id,
        "parts": [posixpath.relpath(p, out) for p in parts],
        "mixture": mixture.model_dump(),
        "shuffle_seed": settings.shuffle_seed,
        "dropout": settings.dropout,
        "splits": splits,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_json(f"{out}/manifest.json", manifest)
    return manifest


def build_shards(
    storage: Storage,
    corpus_docs: list[str] | str,
    encoder: Encoder,
    settings: ShardSettings,
    out: str,
    corpus_id: str,
    mixture: MixtureSettings | None = None,
) -> dict:
    """Every docs file as a part under ``out/part-NNNNN``, and the set's manifest in ``out``.

    The whole corpus at once; the pipeline instead keeps each link's part as
    its own step, so that a grown corpus encodes only its new links.
    """
    files = [corpus_docs] if isinstance(corpus_docs, str) else list(corpus_docs)
    parts = []
    for i, docs_file in enumerate(files):
        part = f"{out}/part-{i:05d}"
        encode_part(storage, docs_file, encoder, settings, part, mixture, never_empty_val=i == 0)
        parts.append(part)
    return assemble(storage, parts, out, corpus_id, settings, mixture)


# -- reading ----------------------------------------------------------------------


class ShardReader:
    """One split of a shard set, addressed by global token offset.

    Local shards are memory-mapped; remote ones (``gs://``) are read by byte
    range, so a read costs only the tokens it returns.
    """

    def __init__(self, storage: Storage, shards_dir: str, split: str, verify: bool = False):
        self.storage, self.shards_dir, self.split = storage, shards_dir, split
        self.manifest = storage.read_json(f"{shards_dir}/manifest.json")
        if split not in self.manifest["splits"]:
            raise ValueError(f"{storage.url(shards_dir)} has no split {split!r}; it has {', '.join(self.manifest['splits'])}")
        self.shards = self.manifest["splits"][split]["shards"]
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.starts = np.concatenate([[0], np.cumsum([s["tokens"] for s in self.shards], dtype=np.int64)])
        self.num_tokens = int(self.starts[-1])
        self._maps: dict[int, np.ndarray] = {}
        if verify:
            self.verify()

    def _rel(self, i: int) -> str:
        return posixpath.normpath(posixpath.join(self.shards_dir, self.shards[i]["path"]))

    def _local(self, i: int) -> np.ndarray:
        if i not in self._maps:
            path = self.storage.path(self._rel(i))
            expected = self.shards[i]["tokens"] * self.dtype.itemsize
            size = os.path.getsize(path)
            if size != expected:
                raise ValueError(f"shard {self.storage.url(self._rel(i))} has {size} bytes; its manifest says {expected}")
            self._maps[i] = np.memmap(path, dtype=self.dtype, mode="r")
        return self._maps[i]

    def _range(self, i: int, start: int, stop: int) -> np.ndarray:
        if self.storage.is_local:
            return np.asarray(self._local(i)[start:stop])
        size = self.dtype.itemsize
        data = self.storage.fs.cat_file(self.storage.path(self._rel(i)), start=start * size, end=stop * size)
        if len(data) != (stop - start) * size:
            raise ValueError(f"shard {self.storage.url(self._rel(i))} is shorter than its manifest says")
        return np.frombuffer(data, dtype=self.dtype)

    def read(self, offset: int, length: int) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of the split, across shard boundaries."""
        if offset < 0 or length < 0 or offset + length > self.num_tokens:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside the {self.split} split's {self.num_tokens}")
        pieces = []
        i = int(np.searchsorted(self.starts, offset, side="right")) - 1
        end = offset + length
        while offset < end:
            stop = min(end, int(self.starts[i + 1]))
            pieces.append(self._range(i, offset - int(self.starts[i]), stop - int(self.starts[i])))
            offset = stop
            i += 1
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)

    def read_all(self) -> np.ndarray:
        if not self.num_tokens:
            raise ValueError(f"split {self.split!r} of {self.storage.url(self.shards_dir)} has no tokens")
        return self.read(0, self.num_tokens)

    def verify(self) -> None:
        """Check every shard against its SHA-256 in the manifest; raises ValueError naming the first bad one."""
        for i, shard in enumerate(self.shards):
            digest = hashlib.sha256()
            with self.storage.fs.open(self.storage.path(self._rel(i)), "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            if digest.hexdigest() != shard["sha256"]:
                raise ValueError(
                    f"shard {self.storage.url(self._rel(i))} does not match its manifest sha256 "
                    f"({digest.hexdigest()[:12]}…, manifest {shard['sha256'][:12]}…): it is corrupted or was replaced"
                )


def load_split(storage: Storage, shards_dir: str, split: str, verify: bool = True) -> np.ndarray:
    """All tokens of one split (checked against the manifest's sha256 unless ``verify=False``)."""
    return ShardReader(storage, shards_dir, split, verify=verify).read_all()
