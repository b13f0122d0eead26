"""Each pipeline stage as a plain function over (storage, config, upstream results).

No Prefect here: these run and test on their own. Every stage but crawl is a
step addressed by its inputs (see :mod:`corpus.steps`), so rerunning it with
unchanged inputs and settings is a no-op that returns the recorded stats.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator

from corpus.clean import clean
from corpus.dedup import dedup_partition
from corpus.explain import write_current
from corpus.extract import extract_partition
from corpus.mixture import MixtureSettings
from corpus.report import composition_table, growth_markdown, plot_composition, write_report
from corpus.steps import StepResult, run_step
from corpus.storage import Storage
from crawlers.crawl import CrawlResult, crawl_sources, partition_files, raw_partitions
from encoder import bpe
from encoder.shards import assemble, encode_part
from flows.config import Config
from model import checkpoint, registry
from model.generate import generate_text
from model.gpt import GPT
from model.train import model_config_of, train

log = logging.getLogger(__name__)

STAGES = ["crawl", "extract", "clean", "dedup", "encoder", "shards", "train", "register", "generate"]

# Settings that change how fast a step runs, never what it writes: kept out of step keys.
RUNTIME_ONLY = {"workers", "pool_min_pages", "memory_limit", "batch_docs", "batch_pages", "write_retries",
                "log_every", "keep_checkpoints"}

# Bump a stage's version when its code changes what it writes: its outputs
# (and everything downstream) are then rebuilt instead of reused.
VERSIONS = {"extract": 3, "clean": 1, "dedup": 2, "encoder": 4, "shards": 3, "train": 2, "reports": 1,
            "encoder_eval": 3}


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


def partitions_to_extract(storage: Storage) -> list[str]:
    """The published raw partitions the extract stage reads; raises if there are none."""
    partitions = raw_partitions(storage)
    if not partitions:
        raise RuntimeError(f"no raw pages under {storage.url('raw')}: the crawl stored nothing")
    return partitions


def extract_step(storage: Storage, cfg: Config, partition: str, force: bool = False) -> StepResult:
    """Extract one raw partition (once per extract settings); ``force`` redoes it (``jagpt reextract``)."""
    files = partition_files(storage, partition)
    return run_step(
        storage, "extract", VERSIONS["extract"], {"raw": partition}, cfg.extract.model_dump(exclude=RUNTIME_ONLY),
        lambda out: extract_partition(storage, files, cfg.extract, out, partition),
        force=force,
    )


def extract_all(storage: Storage, cfg: Config, force: bool = False) -> list[StepResult]:
    """Extract every published raw partition, one after the other (:func:`extract_step` each)."""
    return [extract_step(storage, cfg, partition, force) for partition in partitions_to_extract(storage)]


_RUN_TIME = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z")
_PARTITION = re.compile(r"source=([^/]+)/run=([^/]+)$")


def chain_order(partition: str) -> tuple[str, str, str]:
    """Where a raw partition goes in the corpus chain: by the time its run id starts with, then source, then run id.

    Crawl run ids begin with their start time (``YYYYMMDDTHHMMSSZ-...``), so a
    week's partitions come after the weeks before. A run id without a time
    (``bulk-...`` imports) sorts first.
    """
    m = _PARTITION.search(partition)
    source, run = (m.group(1), m.group(2)) if m else ("", partition)
    t = _RUN_TIME.match(run)
    when = "{}-{}-{}T{}:{}:{}Z".format(*t.groups()) if t else ""
    return when, source, run


def partition_of(storage: Storage, extracted: StepResult) -> str:
    """The raw partition an extract step read (from its marker)."""
    return storage.marker(extracted.path)["inputs"]["raw"]


def clean_all(storage: Storage, cfg: Config, extracted: list[StepResult], force: bool = False) -> list[StepResult]:
    """Clean each extracted partition on its own; the results come in chain order (:func:`chain_order`).

    ``force`` redoes steps that already finished (``jagpt corpus rebuild``).
    """
    ordered = sorted(extracted, key=lambda e: chain_order(partition_of(storage, e)))
    return [clean_step(storage, cfg, e, force) for e in ordered]


def clean_step(storage: Storage, cfg: Config, extracted: StepResult, force: bool = False) -> StepResult:
    """Clean one extracted partition (once per clean settings); ``force`` redoes it."""
    e = extracted
    return run_step(
        storage, "corpus/clean", VERSIONS["clean"], {"extracted": e.id}, cfg.clean.model_dump(exclude=RUNTIME_ONLY),
        lambda out: clean(storage, [f"{e.path}/extracted.parquet"], [f"{e.path}/dropped.parquet"], cfg.clean, out),
        force=force,
    )


def dedup_chain(storage: Storage, cfg: Config, cleaned: list[StepResult], force: bool = False) -> list[StepResult]:
    """Dedup the cleaned partitions (in chain order) as a chain of steps, one link each.

    Link ``i`` is keyed by its clean step and link ``i-1``, so a rerun reuses
    every link, a new partition adds one link at the end, and a changed setting
    rebuilds the whole chain. The corpus is the union of the links' docs.parquet;
    the last link's id names it, and its composition.png pictures all of it.
    """
    links: list[StepResult] = []
    for c in cleaned:
        previous = links[-1] if links else None
        earlier = [link.path for link in links]

        def run(out: str, c: StepResult = c, previous: StepResult | None = previous, earlier: list[str] = earlier) -> dict:
            stats = dedup_partition(storage, c.path, earlier, cfg.dedup, out, previous.stats if previous else None)
            with tempfile.TemporaryDirectory() as tmp:
                png = os.path.join(tmp, "composition.png")
                plot_composition(stats["corpus"], png)
                with open(png, "rb") as f:
                    storage.write_bytes(f"{out}/composition.png", f.read())
            return stats

        links.append(
            run_step(
                storage, "corpus/dedup", VERSIONS["dedup"], {"clean": c.id, "previous": previous.id if previous else None},
                cfg.dedup.model_dump(exclude=RUNTIME_ONLY), run, force=force,
            )
        )
    if not links:
        raise RuntimeError("no cleaned partitions to dedup")
    write_current(storage, [storage.marker(c.path)["inputs"]["extracted"] for c in cleaned], [c.path for c in cleaned],
                  [link.path for link in links])
    return links


def current_corpus(storage: Storage) -> list[StepResult]:
    """The dedup links of the corpus last built (``corpus/current.json``), as the finished steps they are."""
    from corpus.explain import Corpus

    links = []
    for path in Corpus.current(storage).dedup:
        if not storage.is_published(path):
            raise LookupError(f"corpus/current.json names {storage.url(path)}, which is not a finished dedup link")
        stage, key = path.rsplit("/", 1)
        links.append(StepResult(stage, key, path, storage.marker(path).get("stats", {}), cached=True))
    if not links:
        raise LookupError(f"the corpus under {storage.url('corpus')} has no dedup link")
    return links


def corpus_docs(corpus: list[StepResult]) -> list[str]:
    """The docs.parquet files that make up the corpus (one per dedup link)."""
    return [f"{link.path}/docs.parquet" for link in corpus]


def corpus_texts(storage: Storage, corpus: list[StepResult], batch: int = 1024) -> Iterator[str]:
    """Every text of the corpus, streamed a batch at a time."""
    for b in storage.iter_parquet(corpus_docs(corpus), columns=["text"], batch_size=batch):
        yield from b.column(0).to_pylist()


def mixed_texts(storage: Storage, corpus: list[StepResult], mixture: MixtureSettings, batch: int = 1024) -> Iterator[str]:
    """The corpus texts as the mixture weighs them: each document ``mixture.copies(...)`` times, copies adjacent."""
    if mixture.is_natural():
        yield from corpus_texts(storage, corpus, batch)
        return
    columns = ["doc_id", "genre", "source", "text"]
    for b in storage.iter_parquet(corpus_docs(corpus), columns=columns, batch_size=batch):
        for d, g, s, t in zip(*(b.column(c).to_pylist() for c in columns)):
            for _ in range(mixture.copies(d, g, s)):
                yield t


def total_stats(steps: list[StepResult]) -> dict:
    """Figures summed over steps (nested counts too); a ``corpus`` entry is the last step's running total."""

    def add(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            if k == "corpus":
                continue
            if isinstance(v, dict):
                out[k] = add(out.get(k, {}), v)
            elif isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
        return out

    total: dict = {}
    for step in steps:
        total = add(total, step.stats)
    if steps and "corpus" in steps[-1].stats:
        total["corpus"] = steps[-1].stats["corpus"]
    return total


def encoder_settings(cfg: Config) -> bpe.EncoderSettings:
    """The encoder settings in force: ``reserved_tags`` is on when the config
    says so or when the clean stage writes content tags (``clean.content_tags``)."""
    return cfg.encoder.model_copy(update={"reserved_tags": cfg.encoder.reserved_tags or cfg.clean.content_tags})


def encoder_step(storage: Storage, cfg: Config, corpus: list[StepResult]) -> StepResult:
    """A tokenizer trained on the corpus, or the stored one ``encoder.tokenizer`` names (pinned)."""
    settings = encoder_settings(cfg)
    if settings.tokenizer:
        pinned = f"tokenizers/{settings.tokenizer}"
        if not storage.is_published(pinned):
            raise ValueError(f"encoder.tokenizer names {settings.tokenizer}, but {storage.url(pinned)} holds no finished tokenizer")
        log.info("encoder: using the pinned tokenizer %s", settings.tokenizer)
        return StepResult("tokenizers", settings.tokenizer, pinned, storage.marker(pinned).get("stats", {}), cached=True)

    def run(out: str) -> dict:
        tokenizer_id = out.rsplit("/", 1)[1]
        # The training texts follow the mixture, like the shards' train split.
        encoder = bpe.train(mixed_texts(storage, corpus, cfg.mixture), settings, tokenizer_id)
        storage.write_text(f"{out}/tokenizer.json", encoder.to_json())
        report = bpe.stats(encoder, mixed_texts(storage, corpus, cfg.mixture))
        storage.write_json(f"{out}/report.json", {"tokenizer_id": tokenizer_id, **report})
        return {"tokenizer_id": tokenizer_id, **report}

    return run_step(
        storage, "tokenizers", VERSIONS["encoder"], {"corpus": corpus[-1].id},
        {**settings.model_dump(exclude={"tokenizer"}), "mixture": cfg.mixture.key()}, run,
        key_prefix="tok-",
    )


def encoder_eval_step(
    storage: Storage, cfg: Config, tokenizer_id: str | None = None, train_chars: int | None = None,
    eval_chars: int = 10_000_000, force: bool = False,
) -> StepResult:
    """``jagpt encoder eval``: jagpt's encoder against baselines on the held-out split of the current corpus.

    See :func:`encoder.evaluate.evaluate`. Keyed by the corpus (its last dedup
    link), the tokenizer evaluated (a stored one, or ``None``: one trained here
    on the train split) and the settings, so a rerun prints the stored table
    unless ``force``.
    """
    from corpus.explain import Corpus
    from encoder import evaluate

    current = Corpus.current(storage)
    files = [f"{d}/docs.parquet" for d in current.dedup]
    settings = encoder_settings(cfg)
    train_chars = train_chars or min(settings.sample_chars, evaluate.DEFAULT_TRAIN_CHARS)
    encoder = None
    if tokenizer_id:
        tokenizer_id = evaluate.newest_tokenizer(storage) if tokenizer_id == "newest" else tokenizer_id
        encoder = load_encoder(storage, tokenizer_id)

    def run(out: str) -> dict:
        result = evaluate.evaluate(
            storage, files, settings, cfg.shards.val_fraction, cfg.mixture, encoder=encoder,
            train_chars=train_chars, eval_chars=eval_chars, tokenizer_id=out.rsplit("/", 1)[1],
        )
        return evaluate.write_eval(storage, out, result)

    step = run_step(
        storage, "evals/encoder", VERSIONS["encoder_eval"],
        {"corpus": current.dedup[-1], "tokenizer": f"tokenizers/{tokenizer_id}" if tokenizer_id else None},
        {**settings.model_dump(exclude={"tokenizer"}), "encoder_version": VERSIONS["encoder"],
         "mixture": cfg.mixture.key(), "val_fraction": cfg.shards.val_fraction,
         "train_chars": train_chars, "eval_chars": eval_chars},
        run, key_prefix="ev-", force=force,
    )
    evaluate.table_artifact(step.stats["rows"])  # only inside a Prefect flow or task run
    return step


def load_encoder(storage: Storage, tokenizer_id: str) -> bpe.Encoder:
    return bpe.Encoder.from_json(storage.read_text(f"tokenizers/{tokenizer_id}/tokenizer.json"), tokenizer_id)


def shards_step(storage: Storage, cfg: Config, tokenizer: StepResult, corpus: list[StepResult]) -> StepResult:
    """The shard set of the corpus: one part step per dedup link (a grown corpus encodes only its
    new links), then the set's manifest over them."""
    encoder = load_encoder(storage, tokenizer.key)
    settings = {**cfg.shards.model_dump(exclude=RUNTIME_ONLY), "mixture": cfg.mixture.key()}
    parts = []
    for i, link in enumerate(corpus):
        part = run_step(
            storage, "shards", VERSIONS["shards"], {"tokenizer": tokenizer.id, "link": link.id, "first": i == 0}, settings,
            lambda out, link=link, i=i: _part_stats(
                encode_part(storage, f"{link.path}/docs.parquet", encoder, cfg.shards, out, cfg.mixture, never_empty_val=i == 0)
            ),
            key_prefix="part-",
        )
        parts.append(part)

    def run(out: str) -> dict:
        manifest = assemble(storage, [p.path for p in parts], out, corpus[-1].id, cfg.shards, cfg.mixture)
        encoded = sum(not p.cached for p in parts)
        log.info("shards: %d of %d parts encoded now, %d reused", encoded, len(parts), len(parts) - encoded)
        return _part_stats(manifest)

    return run_step(
        storage, "shards", VERSIONS["shards"], {"tokenizer": tokenizer.id, "parts": [p.id for p in parts]}, settings, run,
    )


def _part_stats(manifest: dict) -> dict:
    return {s: {k: v for k, v in m.items() if k not in ("shards", "composition")} for s, m in manifest["splits"].items()}


def report_step(storage: Storage, cfg: Config, corpus: list[StepResult], shards: StepResult | None = None) -> StepResult:
    """The corpus report (``reports/<key>/``): composition and growth, as JSON tables and PNG charts.

    Keyed by the corpus (its last link), the shards step (tokens per genre and
    source, when it exists) and the mixture, so a rerun is a no-op.
    """

    def run(out: str) -> dict:
        links = []
        for link in corpus:
            partition = _partition_of_link(storage, link)
            when, source, run_id = chain_order(partition) if partition else ("", "", "")
            links.append({"id": link.id, "path": link.path, "stats": link.stats, "partition": partition,
                          "source": source, "run": run_id, "when": when})
        manifest = storage.read_json(f"{shards.path}/manifest.json") if shards else None
        return write_report(storage, out, links, cfg.mixture, manifest, shards.id if shards else None)

    return run_step(
        storage, "reports", VERSIONS["reports"], {"corpus": corpus[-1].id, "shards": shards.id if shards else None},
        {"mixture": cfg.mixture.key()}, run,
    )


def _partition_of_link(storage: Storage, link: StepResult) -> str | None:
    """The raw partition behind a dedup link (link -> clean -> extract markers), or None if one is missing."""
    try:
        clean_id = storage.marker(link.path)["inputs"]["clean"]
        extract_id = storage.marker(clean_id)["inputs"]["extracted"]
        return storage.marker(extract_id)["inputs"]["raw"]
    except (FileNotFoundError, KeyError, TypeError):
        return None


def report_artifacts(storage: Storage, report: StepResult) -> tuple[list[dict], str]:
    """The composition table and the growth markdown of a report step (for Prefect artifacts)."""
    urls = {name: storage.url(f"{report.path}/{name}") for name in ("composition.png", "growth.png", "composition.json", "growth.json")}
    composition = storage.read_json(f"{report.path}/composition.json")
    growth = storage.read_json(f"{report.path}/growth.json")
    return composition_table(composition), growth_markdown(growth, urls)


def train_step(storage: Storage, cfg: Config, shards: StepResult, progress=None, stop=None) -> StepResult:
    """Train on ``shards`` (``runs/run-<key>``); an unfinished run with the same key resumes from its checkpoints."""
    return run_step(
        storage, "runs", VERSIONS["train"], {"shards": shards.id}, cfg.train.model_dump(exclude=RUNTIME_ONLY),
        lambda out: train(storage, shards.path, cfg.train, out, progress=progress, stop=stop),
        key_prefix="run-", resumable=True,
    )


def register_step(storage: Storage, run: StepResult, shards: StepResult, parent: str | None = None) -> tuple[dict, bool]:
    """Register the run's last checkpoint (see :mod:`model.registry`); a no-op if it is registered already."""
    s = run.stats
    val = storage.read_json(f"{shards.path}/manifest.json")["splits"].get("val", {})
    bpc = s.get("bits_per_char")
    if bpc is None:  # nats per token -> bits per character, with the val split's tokens and characters
        bpc = registry.bits_per_char(s["final_val_loss"], val.get("tokens"), val.get("chars"))
    preset = s.get("preset")
    if preset is None and storage.exists(f"{run.path}/model.json"):
        preset = storage.read_json(f"{run.path}/model.json").get("train", {}).get("preset")
    return registry.register(
        storage,
        {
            "run_id": run.key,
            "parent": parent,
            "step": s["steps"],
            "tokens_seen": s["tokens_seen"],
            "val_loss": s["final_val_loss"],
            "bits_per_char": bpc,
            "first_val_loss": s["first_val_loss"],
            "preset": preset,
            "model": s["model"],
            "tokenizer_id": s["tokenizer_id"],
            "shards": shards.id,
            "run_dir": run.path,
            "path": s["checkpoint"],
        },
    )


def load_checkpoint(storage: Storage, ref: str | None = None) -> tuple[dict, bpe.Encoder, GPT]:
    """A registered checkpoint (``ref``: ``RUN_ID`` or ``RUN_ID-STEP``; default: the newest): its record,
    its tokenizer and the model with its parameters."""
    record = registry.find(storage, ref) if ref else registry.newest(storage)
    encoder = load_encoder(storage, record["tokenizer_id"])
    model = checkpoint.restore_model(checkpoint.fetch(storage, record["path"]), model_config_of(storage, record["run_dir"]))
    return record, encoder, model


def generate(storage: Storage, cfg: Config, prompt: str | None = None, ref: str | None = None, on_text=None,
             top_p: float = 1.0, min_new_tokens: int = 0, sample: int = 0, **overrides) -> tuple[str, dict]:
    """Generate from checkpoint ``ref`` (default: the newest registered one)."""
    record, encoder, model = load_checkpoint(storage, ref)
    g = cfg.generate.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    text = generate_text(
        model, encoder, prompt if prompt is not None else g.prompt, g.max_new_tokens, g.top_k, g.temperature, g.seed,
        on_text=on_text, top_p=top_p, min_new_tokens=min_new_tokens, sample=sample,
    )
    return text, record
