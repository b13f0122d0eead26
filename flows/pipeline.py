"""The ``pipeline`` flow: crawl -> extract -> clean -> dedup -> encoder -> shards -> train -> register -> generate.

Thin Prefect wiring over :mod:`flows.stages`. Tasks use no Prefect cache
policy: the stages skip themselves when their inputs and settings are
unchanged (outputs addressed by inputs, with success markers; docs/architecture.md
says why), which works the same with or without Prefect.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from flows import stages
from flows.stages import STAGES
from flows.config import Config, load_config

def _logged(result, name: str):
    logger = get_run_logger()
    verb = "skipped: inputs and settings unchanged, reusing" if result.cached else "done in %.1fs ->" % result.seconds
    logger.info("%s %s %s | %s", name, verb, result.path, result.stats)
    return result


@task(name="crawl", cache_policy=NO_CACHE)
def crawl_task(cfg: Config):
    results = stages.crawl_all(cfg.storage_root(), cfg)
    for r in results:
        get_run_logger().info("crawl %s: %s", r.source, r.stats)
    return results


@task(name="extract", cache_policy=NO_CACHE)
def extract_task(cfg: Config):
    return [_logged(r, "extract") for r in stages.extract_all(cfg.storage_root(), cfg)]


@task(name="clean", cache_policy=NO_CACHE)
def clean_task(cfg: Config, extracted):
    return [_logged(r, "clean") for r in stages.clean_all(cfg.storage_root(), cfg, extracted)]


@task(name="near-dedup", cache_policy=NO_CACHE)
def dedup_task(cfg: Config, cleaned):
    return [_logged(r, "near-dedup") for r in stages.dedup_chain(cfg.storage_root(), cfg, cleaned)]


@task(name="encoder", cache_policy=NO_CACHE)
def encoder_task(cfg: Config, corpus):
    return _logged(stages.encoder_step(cfg.storage_root(), cfg, corpus), "encoder")


@task(name="shards", cache_policy=NO_CACHE)
def shards_task(cfg: Config, tokenizer, corpus):
    return _logged(stages.shards_step(cfg.storage_root(), cfg, tokenizer, corpus), "shards")


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg: Config, shards):
    artifact = create_progress_artifact(progress=0.0, description="jagpt training progress")

    def progress(step: int, total: int, row: dict) -> None:
        update_progress_artifact(artifact_id=artifact, progress=100.0 * step / total)

    result = stages.train_step(cfg.storage_root(), cfg, shards, progress=progress)
    update_progress_artifact(artifact_id=artifact, progress=100.0)
    return _logged(result, "train")


@task(name="register", cache_policy=NO_CACHE)
def register_task(cfg: Config, run, shards):
    record, created = stages.register_step(cfg.storage_root(), run, shards)
    get_run_logger().info("register: %s %s-%s", "new record" if created else "already registered", record["run_id"], record["step"])
    return record, created


@task(name="generate", cache_policy=NO_CACHE)
def generate_task(cfg: Config):
    text, record = stages.generate(cfg.storage_root(), cfg)
    get_run_logger().info("generate (%s): %s%s", record["run_id"], cfg.generate.prompt, text)
    return text


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = ["# jagpt pipeline run", "", f"Storage root: `{summary['storage']}`", "", "| stage | status | figures |", "|---|---|---|"]
    for row in summary["stages"]:
        lines.append(f"| {row['stage']} | {row['status']} | {row['figures']} |")
    if "sample" in summary:
        lines += ["", "## Sample", "", f"> {summary['prompt']}{summary['sample']}"]
    return "\n".join(lines)


@flow(name="pipeline", log_prints=True)
def pipeline(config_path: str | None = None, skip_crawl: bool = False, until: str = "generate") -> dict[str, Any]:
    """Run the whole DAG on the config at ``config_path`` (default: the embedded sample site)."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    cfg = load_config(config_path)
    return run_pipeline(cfg, skip_crawl=skip_crawl, until=until)


def run_pipeline(cfg: Config, skip_crawl: bool = False, until: str = "generate") -> dict[str, Any]:
    stop = STAGES.index(until)
    summary: dict[str, Any] = {"storage": cfg.storage_root().url(), "stages": []}
    rows = summary["stages"]

    def add(stage: str, status: str, figures: Any) -> None:
        rows.append({"stage": stage, "status": status, "figures": figures})

    if not skip_crawl:
        crawls = crawl_task(cfg)
        for c in crawls:
            add(f"crawl {c.source}", "stored " + (c.partition or "nothing new"), c.stats)
        summary["crawl"] = [c.stats for c in crawls]
    if stop < STAGES.index("extract"):
        return summary
    steps: dict[str, Any] = {}
    extracted = extract_task(cfg)
    for e in extracted:
        add("extract", _status(e), e.stats)
    if not skip_crawl:
        table = stages.crawl_table(cfg.storage_root(), crawls, extracted)
        summary["crawl_table"] = table
        create_table_artifact(table, key="crawl-stats", description="jagpt crawl: per-source figures of this run")
    steps["clean"] = clean_task(cfg, extracted)
    plan = [
        ("dedup", lambda: dedup_task(cfg, steps["clean"])),
        ("encoder", lambda: encoder_task(cfg, steps["dedup"])),
        ("shards", lambda: shards_task(cfg, steps["encoder"], steps["dedup"])),
        ("train", lambda: train_task(cfg, steps["shards"])),
    ]
    add("clean", _status(steps["clean"]), _figures(steps["clean"]))
    for name, run in plan:
        if stop < STAGES.index(name):
            break
        steps[name] = run()
        add(name, _status(steps[name]), _figures(steps[name]))
    # clean and dedup are one step per partition; the last dedup link names the corpus.
    summary["steps"] = {k: (v[-1] if isinstance(v, list) else v).path for k, v in steps.items()}
    if stop >= STAGES.index("register"):
        record, created = register_task(cfg, steps["train"], steps["shards"])
        add("register", "new record" if created else "already registered", f"{record['run_id']}-{record['step']}")
        summary["checkpoint"] = record
    if stop >= STAGES.index("generate"):
        summary["prompt"] = cfg.generate.prompt
        summary["sample"] = generate_task(cfg)
    create_markdown_artifact(summary_markdown(summary), key="pipeline-summary", description="jagpt pipeline run")
    return summary


def _status(step) -> str:
    if isinstance(step, list):  # one step per partition: say how many ran
        ran = [s for s in step if not s.cached]
        if not ran:
            return f"cached ({len(step)} partitions, last {step[-1].path})"
        seconds = sum(s.seconds for s in ran)
        return f"ran {seconds:.1f}s ({len(ran)} of {len(step)} partitions, last {step[-1].path})"
    return f"cached ({step.path})" if step.cached else f"ran {step.seconds:.1f}s ({step.path})"


def _figures(step) -> dict:
    """A step's stats; for per-partition steps, summed over the partitions."""
    return stages.total_stats(step) if isinstance(step, list) else step.stats
