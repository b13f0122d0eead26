"""The whole DAG under Prefect, crawling the sample site over HTTP into gs:// on the emulator."""

import os
import re
import subprocess
import sys

import pytest
import yaml

from corpus.schema import DOC, DROPPED, RAW_PAGE
from flows.config import default_config_text
from tests.conftest import free_port

JAGPT = os.path.join(os.path.dirname(sys.executable), "jagpt")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, gcs_endpoint):
    cfg = yaml.safe_load(default_config_text())
    port = free_port()
    cfg["storage"] = {"root": "gs://jagpt-test/e2e", "options": {"endpoint_url": gcs_endpoint, "token": "anon"}}
    src = cfg["sources"][0]
    src["start_urls"] = [f"http://127.0.0.1:{port}/"]
    src["sitemaps"] = [f"http://127.0.0.1:{port}/sitemap.xml"]
    cfg["train"].update(steps=120, eval_every=40, checkpoint_every=60)
    path = tmp_path_factory.mktemp("e2e") / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return str(path)


@pytest.fixture(scope="module")
def runs(config_file, prefect_harness, tmp_path_factory):
    os.environ["JAGPT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    from flows.pipeline import pipeline

    first = pipeline(config_path=config_file)
    second = pipeline(config_path=config_file)
    return first, second


def _stage(summary, name):
    return next(r for r in summary["stages"] if r["stage"] == name)


def test_first_run_goes_through_every_stage(runs, config_file):
    first, _ = runs
    crawl = _stage(first, "crawl sample-site")["figures"]
    assert crawl["new"] == 36 and crawl["failed"]["robots"] == 1 and crawl["encodings"]["cp932 (meta)"] == 1
    dropped = _stage(first, "clean")["figures"]["dropped"]
    assert dropped["not_japanese"] == 1 and dropped["overlong_sentence"] >= 1
    dedup = _stage(first, "dedup")["figures"]
    assert dedup["exact_duplicates"] == 1 and dedup["near_duplicates"] == 1
    # The running figures of the last link cover every drop, extract and clean included.
    assert dedup["corpus"]["dropped"]["exact_duplicate"] == 1 and dedup["corpus"]["dropped"]["not_japanese"] == 1
    assert _stage(first, "encoder")["figures"]["round_trip_exact"] is True
    train = _stage(first, "train")["figures"]
    assert train["final_val_loss"] < train["first_val_loss"] - 0.5  # the loss falls
    assert first["checkpoint"]["val_loss"] == train["final_val_loss"]
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", first["sample"])


def test_outputs_follow_the_data_contracts(runs, config_file):
    from flows.config import load_config

    first, _ = runs
    storage = load_config(config_file).storage_root()
    assert storage.url().startswith("gs://")
    raw = storage.glob("raw/source=sample-site/run=*/part-*.parquet")
    assert storage.read_parquet(raw).schema.equals(RAW_PAGE)
    corpus = first["steps"]["dedup"]
    assert storage.read_parquet([f"{corpus}/docs.parquet"]).schema.equals(DOC)
    assert storage.read_parquet([f"{corpus}/dropped.parquet"]).schema.equals(DROPPED)
    manifest = storage.read_json(f"{first['steps']['shards']}/manifest.json")
    assert manifest["tokenizer_id"] == first["checkpoint"]["tokenizer_id"]
    assert {"train", "val"} <= set(manifest["splits"]) and all(len(s["sha256"]) == 64 for s in manifest["splits"]["train"]["shards"])
    assert storage.exists(f"{first['steps']['train']}/loss.png")
    assert storage.exists(f"{corpus}/composition.png")
    for name in ("bands", "signatures", "exact"):  # the dedup index the next partition is checked against
        assert storage.exists(f"{corpus}/index/{name}.parquet")
    # The corpus report: composition with tokens (the shards exist), growth with a row per dedup link.
    report = first["steps"]["report"]
    assert report.startswith("reports/")
    composition = storage.read_json(f"{report}/composition.json")
    figures = _stage(first, "dedup")["figures"]["corpus"]
    assert composition["totals"]["documents"] == figures["documents"] and composition["totals"]["characters"] == figures["characters"]
    assert composition["totals"]["train_tokens"] == manifest["splits"]["train"]["tokens"]  # the natural mixture
    assert [r["genre"] for r in composition["by_genre"]] == ["other"] and composition["by_genre"][0]["mixed_share_characters"] == 1.0
    assert len(storage.read_json(f"{report}/growth.json")["links"]) == figures["links"]
    for name in ("composition.png", "growth.png"):
        assert storage.read_bytes(f"{report}/{name}").startswith(b"\x89PNG\r\n\x1a\n")


def test_second_run_adds_nothing_and_redoes_nothing(runs, config_file):
    first, second = runs
    crawl = _stage(second, "crawl sample-site")
    assert crawl["status"] == "stored nothing new" and crawl["figures"]["unchanged"] == 36
    for name in ("extract", "clean", "dedup", "encoder", "shards", "report", "train"):
        assert _stage(second, name)["status"].startswith("cached"), name
    assert _stage(second, "register")["status"] == "already registered"
    assert second["steps"] == first["steps"]


def test_cli_generates_from_the_newest_checkpoint(runs, config_file):
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(
        [JAGPT, "generate", "--config", config_file, "--prompt", "むかし、むかし", "--max-new-tokens", "30", "--seed", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("むかし、むかし")
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", done.stdout[len("むかし、むかし"):])

    listed = subprocess.run([JAGPT, "checkpoints", "--config", config_file], capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0 and runs[0]["checkpoint"]["run_id"] in listed.stdout


def test_run_summary_is_a_prefect_markdown_artifact(runs):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["pipeline-summary"])))
    assert len(artifacts) >= 2 and all(a.type == "markdown" for a in artifacts)
    assert any("| train |" in a.data and "final_val_loss" in a.data for a in artifacts)


def test_crawl_stats_are_a_prefect_table_artifact(runs):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["crawl-stats"])))
    assert len(artifacts) >= 2 and all(a.type == "table" for a in artifacts)
    tables = [json.loads(a.data) if isinstance(a.data, str) else a.data for a in artifacts]
    rows = [row for table in tables for row in table if row["source"] == "sample-site"]
    assert sorted((r["new"], r["unchanged"]) for r in rows) == [(0, 36), (36, 0)]
    assert any(r["docs extracted"] == 36 and r["failed by reason"] == "robots 1" for r in rows)


def test_corpus_report_is_a_table_and_a_markdown_artifact(runs):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    first, _ = runs
    with get_client(sync_client=True) as client:
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["corpus-composition"])))
        growth = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["corpus-growth"])))
    # Other tests' flows may have made artifacts with these keys too: look for this run's.
    assert all(a.type == "table" for a in tables) and all(a.type == "markdown" for a in growth)
    documents = _stage(first, "dedup")["figures"]["corpus"]["documents"]
    ours = [rows for rows in (json.loads(a.data) if isinstance(a.data, str) else a.data for a in tables)
            if [(r["by"], r["name"]) for r in rows] == [("genre", "other"), ("source", "sample-site"), ("total", "corpus")]
            and rows[-1]["documents"] == documents]
    assert len(ours) >= 2  # the first run and the rerun
    report = f"{first['storage']}/{first['steps']['report']}"
    ours = [a.data for a in growth if f"{report}/growth.png" in a.data and f"{report}/composition.png" in a.data]
    assert len(ours) >= 2 and all("| 1 | raw/source=sample-site/run=" in md for md in ours)


def test_cli_explains_the_corpus(runs, config_file):
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    origin = yaml.safe_load(open(config_file, encoding="utf-8"))["sources"][0]["start_urls"][0].rstrip("/")

    def jagpt(*args: str) -> str:
        done = subprocess.run([JAGPT, "corpus", *args, "--config", config_file], capture_output=True, text=True,
                              timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    stats = jagpt("stats")
    assert "sample-site" in stats and "dedup:exact_duplicate 1" in stats and "clean:not_japanese 1" in stats
    menu = jagpt("why", f"{origin}/links.html")
    assert "clean: dropped for" in menu and "overlong_sentence: max_sentence_chars" in menu and "not in the corpus" in menu
    robots = jagpt("why", f"{origin}/private/drafts.html")
    assert "failed (robots)" in robots
    kept = jagpt("why", f"{origin}/blog/01.html")
    assert "in the corpus: doc" in kept and "hiragana_ratio" in kept
