"""The flows behind the deployments of ``prefect.yaml`` (besides ``pipeline``): each runs a part of the DAG.

* ``corpus-refresh`` (weekly): crawl -> extract -> clean -> dedup -> corpus report,
  the ``pipeline`` flow's own wiring stopped after dedup;
* ``encoder-train``: the encoder on the current corpus (``corpus/current.json``);
* ``tokenize-shards``: the shards of the current corpus, and the corpus report with tokens;
* ``train``: train on the current corpus's shards and register the checkpoint,
  here (``target: local``) or on a Cloud TPU VM (``target: tpu``, :mod:`infra.launcher`;
  its on_cancellation and on_crashed hooks delete the TPU VMs a stopped run left).

They reuse the ``pipeline`` flow's tasks, so a step that another flow (or
``jagpt pipeline``) already made is skipped and says so in the logs and in
the run's summary artifact (``<flow>-summary``). Every flow takes
``config_path`` (default: the embedded config).
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from corpus.steps import StepResult
from flows import pipeline as p
from flows import stages
from flows.config import Config, load_config
from flows.params import TrainParams

log = logging.getLogger(__name__)

LAUNCHER_MISSING = "the TPU launcher is not installed in this build (infra/launcher.py); use target local for now"


@flow(name="corpus-refresh", log_prints=True)
def corpus_refresh(config_path: str | None = None, skip_crawl: bool = False) -> dict[str, Any]:
    """Crawl the enabled sources, then extract, clean and dedup what is new, and report on the corpus."""
    cfg = load_config(config_path)
    return p.run_pipeline(cfg, skip_crawl=skip_crawl, until="dedup", artifact_key="corpus-refresh-summary",
                          title="jagpt corpus refresh")


def _current(cfg: Config) -> list[StepResult]:
    corpus = stages.current_corpus(cfg.storage_root())
    get_run_logger().info("current corpus: %d dedup links, the last %s", len(corpus), corpus[-1].path)
    return corpus


def _finish(summary: dict[str, Any], key: str, title: str) -> dict[str, Any]:
    create_markdown_artifact(p.summary_markdown(summary, title), key=key, description=title)
    return summary


@flow(name="encoder-train", log_prints=True)
def encoder_train(config_path: str | None = None) -> dict[str, Any]:
    """Train the encoder on the current corpus (skipped if this corpus and these settings already have one)."""
    cfg = load_config(config_path)
    summary = p.new_summary(cfg)
    tokenizer = p.encoder_task(cfg, _current(cfg))
    p.add_step(summary, "encoder", tokenizer)
    summary["steps"] = {"encoder": tokenizer.path}
    return _finish(summary, "encoder-train-summary", "jagpt encoder-train")


def _shards(cfg: Config, summary: dict[str, Any]) -> tuple[list[StepResult], StepResult]:
    corpus = _current(cfg)
    tokenizer = p.encoder_task(cfg, corpus)
    p.add_step(summary, "encoder", tokenizer)
    shards = p.shards_task(cfg, tokenizer, corpus)
    p.add_step(summary, "shards", shards)
    summary["steps"] = {"encoder": tokenizer.path, "shards": shards.path}
    return corpus, shards


@flow(name="tokenize-shards", log_prints=True)
def tokenize_shards(config_path: str | None = None) -> dict[str, Any]:
    """Cut the current corpus into token shards with its encoder (trained first if it is missing)."""
    cfg = load_config(config_path)
    summary = p.new_summary(cfg)
    corpus, shards = _shards(cfg, summary)
    summary["steps"]["report"] = p.corpus_report(cfg, summary, corpus, shards).path
    return _finish(summary, "tokenize-shards-summary", "jagpt tokenize-shards")


def with_params(cfg: Config, params: TrainParams) -> Config:
    """The config with the train parameters' storage root, preset and steps in force."""
    train = {"preset": params.preset, **({"steps": params.steps} if params.steps else {})}
    update: dict[str, Any] = {"train": cfg.train.model_copy(update=train)}
    if params.storage_root:
        update["storage"] = cfg.storage.model_copy(update={"root": params.storage_root})
    return cfg.model_copy(update=update)


def tpu_launcher():
    """``infra.launcher.launch``, imported only when a run targets a TPU."""
    try:
        from infra.launcher import launch
    except ModuleNotFoundError as e:
        if e.name != "infra.launcher":
            raise  # the launcher is there but something it needs is not
        raise RuntimeError(LAUNCHER_MISSING) from None
    return launch


def delete_launched_resources(flow, flow_run, state) -> None:
    """on_cancellation / on_crashed hook: delete the TPU VMs the launcher made for this flow run.

    The Prefect worker runs it after the flow's process is gone (cancelled from the
    UI, or crashed), so it finds them through ``launches/*/launch.json`` under the
    storage root. A no-op for target local and when nothing is left.
    """
    parameters = flow_run.parameters or {}
    params = TrainParams.model_validate(parameters.get("params") or {})
    if params.target != "tpu":
        return
    from infra.launcher import cleanup

    cfg = with_params(load_config(parameters.get("config_path")), params)
    deleted = cleanup(cfg.storage_root(), flow_run_id=str(flow_run.id),
                      reason="cancelled" if state is not None and state.is_cancelling() else "crashed")
    if deleted:
        log.info("flow run %s: deleted %s", flow_run.id, "; ".join(deleted))


@flow(name="train", log_prints=True, on_cancellation=[delete_launched_resources], on_crashed=[delete_launched_resources])
def train(params: TrainParams = TrainParams(), config_path: str | None = None) -> dict[str, Any]:
    """Train a GPT on the current corpus's shards and register its last checkpoint."""
    cfg = with_params(load_config(config_path), params)
    if params.target == "tpu":
        if not cfg.storage.root.startswith("gs://"):
            raise ValueError(f"target tpu needs a gs:// storage root the TPU VM can reach; the config's is {cfg.storage.root}")
        launch = tpu_launcher()
        summary = p.new_summary(cfg)
        _, shards = _shards(cfg, summary)  # here; the TPU VMs only train
        record = launch(params, cfg, shards)
        p.add_row(summary, "train", f"on a Cloud TPU {params.tpu_type}", {"run": record["run_dir"], "steps": record["step"]})
        summary["steps"]["train"] = record["run_dir"]
        summary["checkpoint"] = record
        return _finish(summary, "train-summary", "jagpt train")
    summary = p.new_summary(cfg)
    _, shards = _shards(cfg, summary)
    run = p.train_task(cfg, shards)
    p.add_step(summary, "train", run)
    record, created = p.register_task(cfg, run, shards)
    p.add_row(summary, "register", "new record" if created else "already registered", f"{record['run_id']}-{record['step']}")
    summary["steps"]["train"] = run.path
    summary["checkpoint"] = record
    return _finish(summary, "train-summary", "jagpt train")
