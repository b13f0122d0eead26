"""A small registered checkpoint for the tests of the model's verbs (generate, score, embed, finetune,
export, serve): a real encoder, real shards and a short real training run of the tiny preset on the
sample site's prose, registered like the pipeline registers one.

Built once per pytest session, under the session's base temporary folder, and reused by every test
module that asks for it (a module-scoped fixture calls :func:`registered`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from corpus.steps import StepResult
from corpus.storage import Storage
from encoder.bpe import Encoder, EncoderSettings, stats, train as train_encoder
from encoder.shards import ShardSettings, build_shards
from flows import stages
from flows.config import default_config_text
from model.train import TrainSettings, train
from tests.test_mixture import NEWS, NOVEL, paragraphs
from tests.test_shards import write_links

TOKENIZER = "tok-verbs"
TEXTS = NOVEL + NEWS + paragraphs("blog") + paragraphs("qa")
SETTINGS = TrainSettings(preset="tiny", seq_len=64, batch_size=8, steps=60, warmup_steps=5, lr=3e-3, eval_every=20,
                         eval_batches=2, checkpoint_every=60, log_every=20)


@dataclass
class Registered:
    root: Path
    config: Path  # a config file whose storage root is ``root``
    record: dict
    encoder: Encoder

    @property
    def storage(self) -> Storage:
        return Storage(str(self.root))

    @property
    def ref(self) -> str:
        return f"{self.record['run_id']}-{self.record['step']}"


def registered(tmp_path_factory) -> Registered:
    root = tmp_path_factory.getbasetemp() / "registered-model"
    config = root / "config.yaml"
    storage = Storage(str(root))
    if not (root / "READY").exists():
        files = write_links(storage, [NOVEL + paragraphs("blog"), NEWS + paragraphs("qa")])
        encoder = train_encoder(TEXTS, EncoderSettings(vocab_size=1200), TOKENIZER)
        storage.write_text(f"tokenizers/{TOKENIZER}/tokenizer.json", encoder.to_json())
        storage.write_json(f"tokenizers/{TOKENIZER}/report.json", {"tokenizer_id": TOKENIZER, **stats(encoder, TEXTS)})
        build_shards(storage, files, encoder, ShardSettings(shard_tokens=8000, val_fraction=0.1, workers=1), "shards/verbs",
                     "corpus/verbs")
        run_stats = train(storage, "shards/verbs", SETTINGS, "runs/run-verbs")
        stages.register_step(storage, StepResult("runs", "run-verbs", "runs/run-verbs", run_stats),
                             StepResult("shards", "verbs", "shards/verbs"))
        cfg = yaml.safe_load(default_config_text())
        cfg["storage"] = {"root": str(root)}
        config.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        (root / "READY").write_text("")
    encoder = Encoder.from_json(storage.read_text(f"tokenizers/{TOKENIZER}/tokenizer.json"), TOKENIZER)
    record = storage.read_json("registry/checkpoints/run-verbs-60.json")
    return Registered(root, config, record, encoder)


def copy_of(reg: Registered, dest: Path) -> Registered:
    """The registered storage root copied to ``dest``, for a test that registers more checkpoints
    (the shared root's newest checkpoint must stay the same for the other modules)."""
    shutil.copytree(reg.root, dest)
    cfg = yaml.safe_load(reg.config.read_text(encoding="utf-8"))
    cfg["storage"] = {"root": str(dest)}
    config = dest / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return Registered(dest, config, reg.record, reg.encoder)


def jagpt_env() -> dict[str, str]:
    """The environment for ``jagpt`` subprocesses: this checkout first on the path, no accelerators asked for."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env
