"""The ``pipeline`` flow: crawl -> extract -> clean -> dedup -> encoder -> shards -> train -> register -> generate.

Thin Prefect wiring over :mod:`flows.stages`. Tasks use no Prefect cache
policy: the stages skip themselves when their inputs and settings are
unchanged (outputs addressed by inputs, with success markers; docs/architecture.md
says why), which works the same with or without Prefect.

The per-partition steps (extract, clean) are one task each, submitted
together, so they run on the flow's task runner: Prefect's thread pool by
default, or a Dask cluster when the config's ``runner`` section names one
(:func:`pipeline_for`). Their arguments are the Config and a partition name or
StepResult, small and picklable; each task opens its own Storage. The dedup
chain and everything after it run in the flow's process.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import Flow, flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

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


@task(name="extract", task_run_name="extract {partition}", cache_policy=NO_CACHE)
def extract_task(cfg: Config, partition: str):
    """One raw partition; may run in another process or on another machine (a Dask worker)."""
    return _logged(stages.extract_step(cfg.storage_root(), cfg, partition), "extract")


@task(name="clean", cache_policy=NO_CACHE)
def clean_task(cfg: Config, extracted):
    """One extracted partition; may run in another process or on another machine (a Dask worker)."""
    return _logged(stages.clean_step(cfg.storage_root(), cfg, extracted), "clean")


@task(name="near-dedup", cache_policy=NO_CACHE)
def dedup_task(cfg: Config, cleaned):
    return [_logged(r, "near-dedup") for r in stages.dedup_chain(cfg.storage_root(), cfg, cleaned)]


@task(name="encoder", cache_policy=NO_CACHE)
def encoder_task(cfg: Config, corpus):
    return _logged(stages.encoder_step(cfg.storage_root(), cfg, corpus), "encoder")


@task(name="shards", cache_policy=NO_CACHE)
def shards_task(cfg: Config, tokenizer, corpus):
    return _logged(stages.shards_step(cfg.storage_root(), cfg, tokenizer, corpus), "shards")


@task(name="corpus-report", cache_policy=NO_CACHE)
def report_task(cfg: Config, corpus, shards):
    return _logged(stages.report_step(cfg.storage_root(), cfg, corpus, shards), "corpus-report")


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


def summary_markdown(summary: dict[str, Any], title: str = "jagpt pipeline run") -> str:
    lines = [f"# {title}", "", f"Storage root: `{summary['storage']}`", "", "| stage | status | figures |", "|---|---|---|"]
    for row in summary["stages"]:
        lines.append(f"| {row['stage']} | {row['status']} | {row['figures']} |")
    if any(row["status"].startswith("cached") for row in summary["stages"]):
        lines += ["", f"*{SKIPPED}*: the stage did not run; its output folder, made earlier from the same inputs "
                  "and settings, was reused."]
    if "sample" in summary:
        lines += ["", "## Sample", "", f"> {summary['prompt']}{summary['sample']}"]
    return "\n".join(lines)


def new_summary(cfg: Config) -> dict[str, Any]:
    """The run summary the flows fill in: the storage root and one row per stage (:func:`add_row`)."""
    return {"storage": cfg.storage_root().url(), "stages": []}


def add_row(summary: dict[str, Any], stage: str, status: str, figures: Any) -> None:
    summary["stages"].append({"stage": stage, "status": status, "figures": figures})


def add_step(summary: dict[str, Any], stage: str, step) -> None:
    """A row for a step (or the per-partition steps of a stage): ran or skipped, and its figures."""
    add_row(summary, stage, _status(step), _figures(step))


def corpus_report(cfg: Config, summary: dict[str, Any], corpus, shards=None):
    """The corpus-report task (composition, with tokens once the shards exist, and growth) and its two artifacts."""
    report = report_task(cfg, corpus, shards)
    add_step(summary, "report", report)
    table, growth = stages.report_artifacts(cfg.storage_root(), report)
    create_table_artifact(table, key="corpus-composition",
                          description="jagpt corpus: documents, characters, tokens per genre and source; mixture shares")
    create_markdown_artifact(growth, key="corpus-growth", description="jagpt corpus: growth per link, and the charts' paths")
    return report


@flow(name="pipeline", log_prints=True)
def pipeline(config_path: str | None = None, skip_crawl: bool = False, until: str = "generate") -> dict[str, Any]:
    """Run the whole DAG on the config at ``config_path`` (default: the embedded sample site)."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {STAGES}, got {until!r}")
    cfg = load_config(config_path)
    return run_pipeline(cfg, skip_crawl=skip_crawl, until=until)


def run_pipeline(cfg: Config, skip_crawl: bool = False, until: str = "generate",
                 artifact_key: str = "pipeline-summary", title: str = "jagpt pipeline run") -> dict[str, Any]:
    """The stages up to ``until``; the summary is also the markdown artifact ``artifact_key``."""
    stop = STAGES.index(until)
    summary = new_summary(cfg)

    def add(stage: str, status: str, figures: Any) -> None:
        add_row(summary, stage, status, figures)

    if not skip_crawl:
        crawls = crawl_task(cfg)
        for c in crawls:
            add(f"crawl {c.source}", "stored " + (c.partition or "nothing new"), c.stats)
        summary["crawl"] = [c.stats for c in crawls]
    if stop < STAGES.index("extract"):
        return summary
    steps: dict[str, Any] = {}
    partitions = stages.partitions_to_extract(cfg.storage_root())
    # One extract task per raw partition and one clean task per extract task, all
    # submitted now: a clean starts as soon as its extract is done. Cleans come in
    # chain order, the order the dedup chain needs.
    task_cfg = _task_config(cfg)
    shared_cfg = _shared_cores(task_cfg, len(partitions))
    extracting = {p: extract_task.submit(shared_cfg, p) for p in partitions}
    cleaning = [clean_task.submit(shared_cfg, extracting[p]) for p in sorted(partitions, key=stages.chain_order)]
    wait([*extracting.values(), *cleaning])
    extracted = [extracting[p].result() for p in partitions]  # raises the first extract failure
    for e in extracted:
        add("extract", _status(e), e.stats)
    if not skip_crawl:
        table = stages.crawl_table(cfg.storage_root(), crawls, extracted)
        summary["crawl_table"] = table
        create_table_artifact(table, key="crawl-stats", description="jagpt crawl: per-source figures of this run")
    steps["clean"] = [f.result() for f in cleaning]
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
        if name == "shards" or (name == "dedup" and stop < STAGES.index("shards")):
            # The corpus report: composition (tokens too, once the shards exist) and growth.
            steps["report"] = corpus_report(cfg, summary, steps["dedup"], steps.get("shards"))
    # clean and dedup are one step per partition; the last dedup link names the corpus.
    summary["steps"] = {k: (v[-1] if isinstance(v, list) else v).path for k, v in steps.items()}
    if stop >= STAGES.index("register"):
        record, created = register_task(cfg, steps["train"], steps["shards"])
        add("register", "new record" if created else "already registered", f"{record['run_id']}-{record['step']}")
        summary["checkpoint"] = record
    if stop >= STAGES.index("generate"):
        summary["prompt"] = cfg.generate.prompt
        summary["sample"] = generate_task(cfg)
    create_markdown_artifact(summary_markdown(summary, title), key=artifact_key, description=title)
    return summary


def _task_config(cfg: Config) -> Config:
    """The config as tasks get it: a local storage root made absolute, so a Dask worker
    with another working directory (on the same machine or a shared disk) finds it."""
    storage = cfg.storage_root()
    if not storage.is_local:
        return cfg
    return cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"root": storage.root})})


def _shared_cores(cfg: Config, partitions: int) -> Config:
    """The config the extract and clean tasks get: ``workers: 0`` (a pool process per core) shared out.

    Concurrent extract or clean tasks on one machine would each start a pool of every
    core. In-process, the cores are split between the partitions; on a local
    Dask cluster, between its workers. On a remote cluster each task keeps
    ``workers: 0``, a pool of its machine's cores (run one single-thread
    ``dask worker`` per machine). ``workers`` changes no step key.
    """
    if cfg.runner.dask_address:
        return cfg
    cores = os.cpu_count() or 1
    sharing = cfg.runner.dask_local_workers or min(partitions, cores)
    share = max(1, cores // max(1, sharing))
    update = {
        name: getattr(cfg, name).model_copy(update={"workers": share})
        for name in ("extract", "clean")
        if not getattr(cfg, name).workers
    }
    return cfg.model_copy(update=update)


def _local_dask_cluster(**kwargs):
    """A ``distributed.LocalCluster`` whose worker processes may start the extract process pool."""
    import dask
    from distributed import LocalCluster

    # Nanny-started workers are daemonic by default, and a daemonic process may not
    # have children. Set for the whole process, so a worker the nanny restarts later
    # gets it too; it only concerns Dask workers started from this process.
    dask.config.set({"distributed.worker.daemon": False})
    return LocalCluster(**kwargs)


def task_runner_for(cfg: Config):
    """The task runner the config's ``runner`` section asks for; None for Prefect's default thread pool."""
    r = cfg.runner
    if not (r.dask_address or r.dask_local_workers):
        return None
    from prefect_dask import DaskTaskRunner

    if r.dask_address:
        return DaskTaskRunner(address=r.dask_address)
    return DaskTaskRunner(
        cluster_class=_local_dask_cluster,
        cluster_kwargs={
            "n_workers": r.dask_local_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:8787",  # loopback only; the dashboard needs bokeh
        },
    )


def pipeline_for(cfg: Config) -> Flow:
    """The ``pipeline`` flow with the task runner ``cfg.runner`` asks for (the CLI runs this)."""
    runner = task_runner_for(cfg)
    return pipeline if runner is None else pipeline.with_options(task_runner=runner)


# How a summary row says that a stage was skipped because its output already exists.
SKIPPED = "cached: skipped, inputs and settings unchanged"


def _status(step) -> str:
    if isinstance(step, list):  # one step per partition: say how many ran
        ran = [s for s in step if not s.cached]
        if not ran:
            return f"{SKIPPED} ({len(step)} partitions, last {step[-1].path})"
        seconds = sum(s.seconds for s in ran)
        skipped = f", {len(step) - len(ran)} skipped as unchanged" if len(ran) < len(step) else ""
        return f"ran {seconds:.1f}s ({len(ran)} of {len(step)} partitions{skipped}, last {step[-1].path})"
    return f"{SKIPPED} ({step.path})" if step.cached else f"ran {step.seconds:.1f}s ({step.path})"


def _figures(step) -> dict:
    """A step's stats; for per-partition steps, summed over the partitions."""
    return stages.total_stats(step) if isinstance(step, list) else step.stats
