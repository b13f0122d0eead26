"""Each pipeline stage as a plain function over (storage, config, upstream results).

No Prefect here: these run and test on their own. Every stage but crawl is a
step addressed by its inputs (see :mod:`corpus.steps`), so rerunning it with
unchanged inputs and settings is a no-op that returns the recorded stats.
"""

from __future__ import annotations

import logging
import os
import tempfile

from corpus.clean import clean
from corpus.dedup import dedup
from corpus.extract import extract_partition
from corpus.report import plot_composition
from corpus.steps import StepResult, run_step
from corpus.storage import Storage
from crawlers.crawl import CrawlResult, crawl_sources, partition_files, raw_partitions
from encoder import bpe
from encoder.shards import build_shards
from flows.config import Config
from model import checkpoint, registry
from model.generate import generate_text
from model.train import model_config_of, train

log = logging.getLogger(__name__)

STAGES = ["crawl", "extract", "clean", "dedup", "encoder", "shards", "train", "register", "generate"]

# Settings that change how fast a step runs, never what it writes: kept out of step keys.
RUNTIME_ONLY = {"workers", "pool_min_pages", "memory_limit", "batch_docs"}

# Bump a stage's version when its code changes what it writes: its outputs
# (and everything downstream) are then rebuilt instead of reused.
VERSIONS = {"extract": 2, "clean": 1, "dedup": 1, "encoder": 1, "shards": 1, "train": 1}


def crawl_all(storage: Storage, cfg: Config, names: list[str] | None = None) -> list[CrawlResult]:
    """Crawl the enabled sources, or exactly the ``names`` given (enabled or not)."""
    if names:
        by_name = {s.name: s for s in cfg.sources}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"no source named {', '.join(unknown)} in the config; it has {', '.join(by_name)}")
        sources = [by_name[n] for n in names]
    else:
        sources = cfg.enabled_sources()
    if not sources:
        raise ValueError("no source is enabled in the config; enable one or name it with --source")
    results = crawl_sources(storage, sources, cfg.crawl)
    for r in results:
        log.info("crawl %s: %s", r.source, r.stats)
    return results


def crawl_table(storage: Storage, crawls: list[CrawlResult], extracted: list[StepResult] | None = None) -> list[dict]:
    """One row per source, the figures of the crawl stats table (CLI and Prefect artifact)."""
    docs = {storage.marker(e.path)["inputs"]["raw"]: e.stats.get("extracted", 0) for e in extracted or []}
    rows = []
    for c in crawls:
        s = c.stats
        failed = s["failed"]
        row = {
            "source": c.source,
            "fetched": s["fetched"],
            "new": s["new"],
            "changed": s["changed"],
            "unchanged": s["unchanged"],
            "gone": s["gone"],
            "failed": sum(failed.values()),
            "failed by reason": ", ".join(f"{k} {v}" for k, v in failed.items()) or "-",
            "MB": round(s["bytes"] / 1e6, 2),
        }
        if extracted is not None:
            row["docs extracted"] = docs.get(c.partition, 0) if c.partition else 0
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def extract_all(storage: Storage, cfg: Config, force: bool = False) -> list[StepResult]:
    """Extract every published raw partition (each once per extract settings).

    ``force`` redoes partitions already extracted with these settings (``jagpt reextract``).
    """
    results = []
    for partition in raw_partitions(storage):
        files = partition_files(storage, partition)
        results.append(
            run_step(
                storage, "extract", VERSIONS["extract"], {"raw": partition}, cfg.extract.model_dump(exclude=RUNTIME_ONLY),
                lambda out, files=files, partition=partition: extract_partition(storage, files, cfg.extract, out, partition),
                force=force,
            )
        )
    if not results:
        raise RuntimeError(f"no raw pages under {storage.url('raw')}: the crawl stored nothing")
    return results


def clean_step(storage: Storage, cfg: Config, extracted: list[StepResult]) -> StepResult:
    ids = sorted(e.id for e in extracted)
    return run_step(
        storage, "corpus/clean", VERSIONS["clean"], {"extracted": ids}, cfg.clean.model_dump(exclude=RUNTIME_ONLY),
        lambda out: clean(
            storage,
            [f"{e.path}/extracted.parquet" for e in extracted],
            [f"{e.path}/dropped.parquet" for e in extracted],
            cfg.clean,
            out,
        ),
    )


def dedup_step(storage: Storage, cfg: Config, cleaned: StepResult) -> StepResult:
    def run(out: str) -> dict:
        stats = dedup(storage, cleaned.path, cfg.dedup, out)
        with tempfile.TemporaryDirectory() as tmp:
            png = os.path.join(tmp, "composition.png")
            plot_composition(storage, out, png)
            with open(png, "rb") as f:
                storage.write_bytes(f"{out}/composition.png", f.read())
        return stats

    return run_step(storage, "corpus/dedup", VERSIONS["dedup"], {"clean": cleaned.id}, cfg.dedup.model_dump(), run)


def encoder_step(storage: Storage, cfg: Config, corpus: StepResult) -> StepResult:
    def run(out: str) -> dict:
        texts = storage.read_parquet([f"{corpus.path}/docs.parquet"], columns=["text"])["text"].to_pylist()
        tokenizer_id = out.rsplit("/", 1)[1]
        encoder = bpe.train(texts, cfg.encoder, tokenizer_id)
        storage.write_text(f"{out}/tokenizer.json", encoder.to_json())
        report = bpe.stats(encoder, texts)
        storage.write_json(f"{out}/report.json", {"tokenizer_id": tokenizer_id, **report})
        return {"tokenizer_id": tokenizer_id, **report}

    return run_step(
        storage, "tokenizers", VERSIONS["encoder"], {"corpus": corpus.id}, cfg.encoder.model_dump(), run,
        key_prefix="tok-",
    )


def load_encoder(storage: Storage, tokenizer_id: str) -> bpe.Encoder:
    return bpe.Encoder.from_json(storage.read_text(f"tokenizers/{tokenizer_id}/tokenizer.json"), tokenizer_id)


def shards_step(storage: Storage, cfg: Config, tokenizer: StepResult, corpus: StepResult) -> StepResult:
    def run(out: str) -> dict:
        encoder = load_encoder(storage, tokenizer.key)
        manifest = build_shards(storage, f"{corpus.path}/docs.parquet", encoder, cfg.shards, out, corpus.id)
        return {s: {k: v for k, v in m.items() if k != "shards"} for s, m in manifest["splits"].items()}

    return run_step(
        storage, "shards", VERSIONS["shards"], {"tokenizer": tokenizer.id, "corpus": corpus.id},
        cfg.shards.model_dump(exclude=RUNTIME_ONLY), run,
    )


def train_step(storage: Storage, cfg: Config, shards: StepResult, progress=None) -> StepResult:
    return run_step(
        storage, "runs", VERSIONS["train"], {"shards": shards.id}, cfg.train.model_dump(),
        lambda out: train(storage, shards.path, cfg.train, out, progress=progress),
        key_prefix="run-",
    )


def register_step(storage: Storage, run: StepResult, shards: StepResult) -> tuple[dict, bool]:
    s = run.stats
    return registry.register(
        storage,
        {
            "run_id": run.key,
            "parent": None,
            "step": s["steps"],
            "tokens_seen": s["tokens_seen"],
            "val_loss": s["final_val_loss"],
            "first_val_loss": s["first_val_loss"],
            "preset": s["model"],
            "tokenizer_id": s["tokenizer_id"],
            "shards": shards.id,
            "run_dir": run.path,
            "path": s["checkpoint"],
        },
    )


def generate(storage: Storage, cfg: Config, prompt: str | None = None, ref: str | None = None, on_text=None, **overrides) -> tuple[str, dict]:
    """Generate from checkpoint ``ref`` (default: the newest registered one)."""
    record = registry.find(storage, ref) if ref else registry.newest(storage)
    encoder = load_encoder(storage, record["tokenizer_id"])
    model = checkpoint.restore_model(checkpoint.fetch(storage, record["path"]), model_config_of(storage, record["run_dir"]))
    g = cfg.generate.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    text = generate_text(
        model, encoder, prompt if prompt is not None else g.prompt, g.max_new_tokens, g.top_k, g.temperature, g.seed,
        on_text=on_text,
    )
    return text, record
