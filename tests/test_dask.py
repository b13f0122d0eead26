"""The per-partition stages on a Dask cluster give the corpus the in-process run gives.

Four raw partitions (two weeks of two sources, with duplicates across them, from
tests/test_dedup.py) are built to the end of the dedup chain twice by the
Prefect flow, each into its own storage root: once with Prefect's default
thread pool into a local folder, once on a local Dask cluster of two worker
processes into gs:// (the GCS emulator), as a real cluster would. On Dask,
every partition goes through the extract process pool (``pool_min_pages: 1``),
which a daemonic Dask worker could not start.
"""

from __future__ import annotations

import pytest
import yaml

from corpus.explain import CURRENT
from flows import pipeline as pipeline_module
from flows.config import load_config
from flows.pipeline import pipeline_for
from tests.test_dedup import WEEKS, write_week

pytest.importorskip("prefect_dask")


@pytest.fixture(scope="module")
def own_prefect():
    """A Prefect server for this module alone, so its runs and artifacts stay out of other tests' queries."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def build(tmp_path, name: str, runner: dict, extract: dict, storage: dict | None = None) -> tuple:
    root = tmp_path / name
    data = {
        "storage": storage or {"root": str(root / "data")},
        "sources": [{"name": s, "genre": "blog", "start_urls": [f"http://{s}.example/"]} for s in ("a", "b")],
        "extract": extract,
        "clean": {"min_chars": 300},
        "runner": runner,
    }
    root.mkdir()
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    cfg = load_config(str(path))
    storage = cfg.storage_root()
    for week in (1, 2):
        write_week(storage, week)
    summary = pipeline_for(cfg)(config_path=str(path), skip_crawl=True, until="dedup")
    return storage, summary


def test_corpus_on_a_local_dask_cluster_equals_the_in_process_corpus(tmp_path, own_prefect, monkeypatch, gcs_root):
    """The Dask run also writes to gs:// (the emulator), as a cluster's workers would."""
    clusters = []
    make_cluster = pipeline_module._local_dask_cluster

    def recording_cluster(**kwargs):
        cluster = make_cluster(**kwargs)
        clusters.append((cluster.scheduler_address, len(cluster.workers)))
        return cluster

    monkeypatch.setattr(pipeline_module, "_local_dask_cluster", recording_cluster)

    local, local_summary = build(tmp_path, "in-process", {}, {})
    root, options = gcs_root
    dask, dask_summary = build(
        tmp_path, "dask", {"dask_local_workers": 2}, {"pool_min_pages": 1, "workers": 1}, {"root": root, "options": options}
    )
    assert dask.url("x").startswith("gs://")

    assert clusters and clusters[0][0].startswith("tcp://127.0.0.1:") and clusters[0][1] == 2
    assert not any(row["status"].startswith("cached") for row in dask_summary["stages"])

    # Same step keys: the runner, workers and pool_min_pages are in no key.
    assert dask_summary["steps"] == local_summary["steps"]
    current = local.read_json(CURRENT)
    assert dask.read_json(CURRENT) == current
    assert len(current["dedup"]) == len(WEEKS)
    # The same files, byte for byte: extracted pages, cleaned documents, the corpus and every drop.
    files = [f"{e}/{f}" for e in current["extract"] for f in ("extracted.parquet", "dropped.parquet")]
    files += [f"{c}/{f}" for c in current["clean"] for f in ("docs.parquet", "dropped.parquet")]
    files += [f"{d}/{f}" for d in current["dedup"] for f in ("docs.parquet", "dropped.parquet")]
    for rel in files:
        assert dask.read_bytes(rel) == local.read_bytes(rel), rel
    docs = local.read_parquet([f"{d}/docs.parquet" for d in current["dedup"]])
    assert docs.num_rows > 0


def test_a_failing_partition_fails_the_run_with_its_error(tmp_path, own_prefect, monkeypatch):
    from flows import stages

    extract_step = stages.extract_step

    def failing(storage, cfg, partition, force=False):
        if "source=b" in partition:
            raise ValueError(f"broken partition {partition}")
        return extract_step(storage, cfg, partition, force)

    monkeypatch.setattr(stages, "extract_step", failing)
    with pytest.raises(ValueError, match="broken partition raw/source=b"):
        build(tmp_path, "failing", {}, {})


def test_tasks_get_an_absolute_root_and_a_share_of_the_cores(tmp_path, monkeypatch):
    from flows.config import ConfigError, parse_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline_module.os, "cpu_count", lambda: 8)
    base = "sources: [{name: a, start_urls: ['http://a.example/']}]\nstorage: {root: ./data}\n"
    cfg = pipeline_module._task_config(parse_config(base))
    assert cfg.storage.root == str(tmp_path / "data")
    assert pipeline_module._shared_cores(cfg, 1).extract.workers == 8  # one partition: every core
    assert pipeline_module._shared_cores(cfg, 3).extract.workers == 2
    assert pipeline_module._shared_cores(cfg, 3).clean.workers == 2
    explicit = parse_config(base + "clean: {workers: 1}")
    assert pipeline_module._shared_cores(explicit, 3).clean.workers == 1
    local = parse_config(base + "runner: {dask_local_workers: 4}")
    assert pipeline_module._shared_cores(local, 10).extract.workers == 2
    remote = parse_config(base + "runner: {dask_address: 'tcp://127.0.0.1:8786'}")
    assert pipeline_module._shared_cores(remote, 10).extract.workers == 0  # each machine's own cores
    assert pipeline_module.task_runner_for(parse_config(base)) is None
    assert pipeline_module.task_runner_for(remote).address == "tcp://127.0.0.1:8786"
    with pytest.raises(ConfigError, match="not both"):
        parse_config(base + "runner: {dask_local_workers: 2, dask_address: 'tcp://127.0.0.1:8786'}")
