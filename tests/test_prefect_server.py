"""prefect.yaml on a real Prefect server: deploy, run corpus-refresh on a process worker, and the train form in Chromium.

One ``prefect server start`` (SQLite in a temporary PREFECT_HOME, a free port on
127.0.0.1) serves both tests. The deployments are made with
``prefect --no-prompt deploy --all`` from the repository root, and a
``prefect worker start`` process runs the flow runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from flows.config import default_config_text
from tests.conftest import free_port, stop_process_group

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
PREFECT = os.path.join(os.path.dirname(sys.executable), "prefect")
POOL = "jagpt-process"
DEPLOYMENTS = ["corpus-refresh", "encoder-train", "tokenize-shards", "train", "pipeline"]


@dataclass
class Server:
    url: str  # the UI
    api: str
    env: dict[str, str]
    logs: Path

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api)

    def prefect(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob("*.log")))


def _start(args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        # Its own process group, so the teardown stops it and whatever it started (and nothing else).
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api,
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",  # pick up a new flow run within a second
        PREFECT_CLI_COLORS="false",
    )
    procs = [_start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, home / "server.log", home)]
    s = Server(f"http://127.0.0.1:{port}", api, env, home)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert procs[0].poll() is None and time.monotonic() < deadline, f"the Prefect server did not start\n{s.tail()}"
            time.sleep(0.5)
        s.prefect("work-pool", "create", POOL, "--type", "process")
        s.prefect("--no-prompt", "deploy", "--all", timeout=300)
        procs.append(_start([PREFECT, "worker", "start", "--pool", POOL], env, home / "worker.log", home))
        yield s
    finally:
        for proc in reversed(procs):
            stop_process_group(proc)


def _run(server: Server, deployment: str, config: Path, timeout: float = 300):
    """``prefect deployment run`` with the config, then wait for the flow run to end; returns it."""
    out = server.prefect("deployment", "run", deployment, "--param", f"config_path={config}")
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"{deployment} did not finish in {timeout}s\n{server.tail()}"
            time.sleep(1)


def _logs(server: Server, run_id, expect: tuple[str, ...] = (), timeout: float = 30) -> str:
    """The run's log messages; with ``expect``, wait until each is there (runs send logs in batches, after their state)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with server.client() as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
            text = "\n".join(log.message for log in logs)
            if all(e in text for e in expect) or time.monotonic() > deadline:
                return text
            time.sleep(1)


def _summary(server: Server, run_id, key: str) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with server.client() as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    assert len(found) == 1, f"{key} artifacts of run {run_id}: {len(found)}"
    return found[0].data


def test_deployments_schedule_and_weekly_corpus_refresh_then_shards_on_a_worker(server, tmp_path):
    from corpus.explain import Corpus
    from corpus.storage import Storage
    from flows.pipeline import SKIPPED

    with server.client() as client:
        deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        assert sorted(deployments) == sorted(f"{n}/{n}" for n in DEPLOYMENTS)
        for d in deployments.values():
            assert d.work_pool_name == POOL and d.global_concurrency_limit.limit == 1
            assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        refresh = deployments["corpus-refresh/corpus-refresh"]
        assert len(refresh.schedules) == 1 and refresh.schedules[0].active
        schedule = refresh.schedules[0].schedule
        assert (schedule.cron, schedule.timezone) == ("0 3 * * 1", "Asia/Tokyo")
        assert all(not d.schedules for name, d in deployments.items() if name != "corpus-refresh/corpus-refresh")

    # The embedded sample site, served on a free port of 127.0.0.1 by the crawl itself; storage in tmp_path.
    cfg = yaml.safe_load(default_config_text())
    port = free_port()
    cfg["storage"] = {"root": str(tmp_path / "data")}
    cfg["sources"][0]["start_urls"] = [f"http://127.0.0.1:{port}/"]
    cfg["sources"][0]["sitemaps"] = [f"http://127.0.0.1:{port}/sitemap.xml"]
    assert cfg["sources"][0]["allow_private_hosts"] == ["127.0.0.1"] and cfg["sources"][0]["serve_sample_site"]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))

    first = _run(server, "corpus-refresh/corpus-refresh", config)
    assert first.state.is_completed(), f"{first.state}\n{_logs(server, first.id)}\n{server.tail()}"
    storage = Storage(str(tmp_path / "data"))
    corpus = Corpus.current(storage)  # corpus/current.json
    assert len(corpus.dedup) == 1 and storage.is_published(corpus.dedup[0])
    assert storage.parquet_rows(f"{corpus.dedup[0]}/docs.parquet") > 20
    summary = _summary(server, first.id, "corpus-refresh-summary")
    assert "| crawl sample-site | stored raw/source=sample-site/run=" in summary and SKIPPED not in summary

    # A week later nothing changed: every stage says it was skipped, in the logs and in the summary artifact.
    second = _run(server, "corpus-refresh/corpus-refresh", config)
    assert second.state.is_completed(), f"{second.state}\n{_logs(server, second.id)}"
    skipped = tuple(f"{task} skipped: inputs and settings unchanged" for task in ("extract", "clean", "near-dedup", "corpus-report"))
    logs = _logs(server, second.id, expect=skipped)
    for line in skipped:
        assert line in logs, f"{line!r} not in the run's logs:\n{logs}"
    summary = _summary(server, second.id, "corpus-refresh-summary")
    assert "| crawl sample-site | stored nothing new |" in summary
    for stage in ("extract", "clean", "dedup", "report"):
        assert f"| {stage} | {SKIPPED} (" in summary, stage
    assert Corpus.current(storage).dedup == corpus.dedup

    # tokenize-shards on the current corpus: the encoder (trained here, as encoder-train would), then the shards.
    shards = _run(server, "tokenize-shards/tokenize-shards", config)
    assert shards.state.is_completed(), f"{shards.state}\n{_logs(server, shards.id)}"
    summary = _summary(server, shards.id, "tokenize-shards-summary")
    folders = dict(re.findall(r"^\| (encoder|shards|report) \| ran [0-9.]+s \(([^)]+)\)", summary, re.M))
    assert set(folders) == {"encoder", "shards", "report"}, summary
    manifest = storage.read_json(f"{folders['shards']}/manifest.json")
    assert manifest["corpus"] == corpus.dedup[-1] and manifest["tokenizer_id"] == folders["encoder"].split("/")[-1]
    assert manifest["splits"]["train"]["tokens"] > 0


def test_train_custom_run_form_in_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert os.path.exists(chromium), "Debian's chromium is not installed: apt-get install -y chromium (.ci/run does)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2000})  # the whole form
            page.set_default_timeout(30_000)
            page.goto(f"{server.url}/deployments")
            page.get_by_role("link", name="train", exact=True).first.click()
            page.wait_for_url("**/deployments/deployment/*")
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run").click()
            page.wait_for_url("**/deployments/deployment/*/run**")
            page.get_by_text("Storage root", exact=False).first.wait_for()
            page.screenshot(path=str(tmp_path / "train-custom-run.png"), full_page=True)
            text = page.inner_text("main") if page.locator("main").count() else page.inner_text("body")
            values = page.locator("input, textarea, select").evaluate_all("els => els.map(e => e.value)")
            switches = page.get_by_role("switch").count() + page.locator("input[type=checkbox]").count()
        finally:
            browser.close()
    assert (tmp_path / "train-custom-run.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    for title in ("Target", "Preset", "TPU type", "Zone", "Spot", "Steps", "Storage root"):
        assert re.search(rf"^{re.escape(title)}\b", text, re.M), f"{title!r} not on the form:\n{text}"
    assert re.search(r"^local$", text, re.M) and re.search(r"^tiny$", text, re.M)  # the target and preset choices
    assert "v4-8" in values and "us-central2-b" in values  # the TPU type and zone inputs, filled with their defaults
    assert switches >= 1  # spot is a switch
