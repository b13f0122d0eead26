"""Fine-tuning a registered checkpoint on the user's own texts (``jagpt finetune``).

Two steps addressed by their inputs (:func:`corpus.steps.run_step`), like the
pipeline's shards and train steps, so running the same command again reuses
what is done and an interrupted run resumes from its checkpoints:

1. ``shards/ft-<key>``: the texts, read from the files (a ``.jsonl`` file holds
   one document per line, the ``text`` field of a JSON object, or a JSON
   string; any other file holds documents separated by blank lines), written as
   ``docs.parquet`` and encoded with the parent's tokenizer into a shard set
   (:func:`encoder.shards.build_shards`). A document goes to the validation
   split when its id (the SHA-256 of its text) hashes below ``val_fraction``,
   and at least one does. Keyed by the files' contents, the tokenizer and the
   split settings.
2. ``runs/ft-<key>``: :func:`model.train.train` on those shards, starting from
   the parent's parameters (``init``) with a fresh optimizer, the parent's
   preset, context and optimizer settings (the batch may be changed; the mesh is
   data parallel over this machine's devices); validation every ``eval_every`` steps, each saved, and
   early stopping after ``patience`` evaluations without a lower validation
   loss. The result is the best evaluated step. Keyed by the parent checkpoint,
   the shards and the settings.

The CLI then registers the result with ``parent`` set to the parent's
``RUN_ID-STEP`` (:func:`flows.stages.register_step`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re

import pyarrow as pa
from pydantic import Field

from corpus.settings import Settings
from corpus.steps import StepResult, run_step
from corpus.storage import Storage
from encoder.bpe import Encoder
from encoder.shards import ShardSettings, build_shards
from model.train import TrainSettings, train

log = logging.getLogger(__name__)

VERSION = 1
SOURCE, GENRE = "finetune", "other"


class FinetuneSettings(Settings):
    lr: float | None = Field(default=None, gt=0, description="peak learning rate; default: a tenth of the parent's")
    steps: int = Field(default=200, gt=0)
    warmup_steps: int = Field(default=10, ge=0)
    batch_size: int | None = Field(default=None, gt=0, description="sequences per step; default: the parent's")
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    eval_every: int = Field(default=20, gt=0)
    eval_batches: int = Field(default=4, gt=0)
    patience: int = Field(default=3, ge=1, description="evaluations without a lower validation loss before stopping")
    text_field: str = "text"
    seed: int = 0


def read_documents(paths: list[str], text_field: str = "text") -> list[str]:
    """The documents of the files (see the module doc); empty documents are left out."""
    docs: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
                    text = item if isinstance(item, str) else item.get(text_field) if isinstance(item, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{number}: expected a JSON string or an object with a string field "
                                         f"{text_field!r}")
                    docs.append(text)
            else:
                docs.extend(re.split(r"\n[ \t\u3000]*\n", f.read().replace("\r\n", "\n")))
    return [d.strip("\n") for d in docs if d.strip()]


def _file_ids(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        out.append({"name": os.path.basename(path), "sha256": digest.hexdigest()})
    return out


def data_step(storage: Storage, paths: list[str], encoder: Encoder, settings: FinetuneSettings) -> StepResult:
    """The user's texts as a shard set encoded with ``encoder`` (``shards/ft-<key>``)."""
    docs = read_documents(paths, settings.text_field)
    if len(docs) < 2:
        raise ValueError(f"fine-tuning needs at least 2 documents (one for validation); the files hold {len(docs)}")

    def run(out: str) -> dict:
        rows = {"doc_id": [], "source": [], "genre": [], "text": []}
        for text in docs:
            rows["doc_id"].append(hashlib.sha256(text.encode("utf-8")).hexdigest()[:32])
            rows["source"].append(SOURCE)
            rows["genre"].append(GENRE)
            rows["text"].append(text)
        storage.write_parquet(f"{out}/docs.parquet", pa.table(rows))
        shard = ShardSettings(shard_tokens=1 << 22, val_fraction=settings.val_fraction, workers=1)
        manifest = build_shards(storage, f"{out}/docs.parquet", encoder, shard, out, f"{out}/docs.parquet")
        s = manifest["splits"]
        return {"documents": len(docs), **{f"{k}_{f}": s[k][f] for k in ("train", "val") for f in ("documents", "tokens")}}

    return run_step(
        storage, "shards", VERSION, {"files": _file_ids(paths), "tokenizer": encoder.tokenizer_id},
        {"val_fraction": settings.val_fraction, "text_field": settings.text_field}, run, key_prefix="ft-",
    )


def train_settings(parent_run: dict, settings: FinetuneSettings) -> TrainSettings:
    """The parent's training settings (preset, context, batch, optimizer) with the fine-tuning ones."""
    base = TrainSettings(**parent_run["train"])
    batch = settings.batch_size or base.batch_size
    return base.model_copy(update={
        "steps": settings.steps, "total_steps": None, "lr": settings.lr or base.lr / 10,
        "warmup_steps": min(settings.warmup_steps, settings.steps - 1), "batch_size": batch,
        "grad_accum": base.grad_accum if batch % base.grad_accum == 0 else 1,
        "mesh": "",  # data parallel over this machine's devices, whatever the parent was trained on
        "eval_every": settings.eval_every, "eval_batches": settings.eval_batches, "checkpoint_every": settings.eval_every,
        "keep_checkpoints": max(2, settings.patience + 1), "seed": settings.seed,
    })


def finetune(storage: Storage, record: dict, encoder: Encoder, paths: list[str], settings: FinetuneSettings,
             progress=None, stop=None) -> tuple[StepResult, StepResult]:
    """Fine-tune the registered checkpoint ``record`` on the texts in ``paths``: (run, shards) steps."""
    data = data_step(storage, paths, encoder, settings)
    split = data.stats
    parent_run = storage.read_json(f"{record['run_dir']}/model.json")
    ts = train_settings(parent_run, settings)
    if split["train_tokens"] < ts.seq_len + 1:
        raise ValueError(f"the training texts have {split['train_tokens']} tokens, fewer than one window of "
                         f"{ts.seq_len + 1}: give more text")
    parent = f"{record['run_id']}-{record['step']}"
    log.info("finetune %s on %s: %d train / %d val documents (%d / %d tokens), lr %g, up to %d steps",
             parent, storage.url(data.path), split["train_documents"], split["val_documents"], split["train_tokens"],
             split["val_tokens"], ts.lr, ts.steps)
    run = run_step(
        storage, "runs", VERSION, {"parent": parent, "parent_path": record["path"], "shards": data.id},
        {**ts.model_dump(exclude={"log_every", "keep_checkpoints"}), "patience": settings.patience},
        lambda out: train(storage, data.path, ts, out, progress=progress, stop=stop, init=record["path"],
                          patience=settings.patience),
        key_prefix="ft-", resumable=True,
    )
    return run, data
