"""The launcher (infra/launcher) against a local fake of the Cloud TPU API (infra/fake_tpu_api.py).

The real google-cloud-tpu client (REST transport, anonymous credentials) talks
to the fake over HTTP on 127.0.0.1. The fake's "VM" runs the startup script the
launcher generated, as bash, with JAX on the CPU; the storage root is on
gcp-storage-emulator. The only difference from a real VM is that the image has
jagpt already (``JAGPT_PREINSTALLED=1``, the script's documented switch), so
the script skips the pip install of the uploaded wheel.

The shards are made here from the sample site's prose (as in test_train.py),
and the runs are the tiny preset for a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import zipfile

import pytest
from google.auth.credentials import AnonymousCredentials

from corpus.steps import StepResult
from corpus.storage import Storage
from encoder.bpe import EncoderSettings, train as train_encoder
from encoder.shards import ShardSettings, build_shards
from flows.config import load_config
from flows.params import TrainParams
from infra.fake_tpu_api import FakeTpuApi
from infra.launcher import (
    LaunchCancelled, LocalBackend, Status, TpuOptions, TpuVmBackend, accelerator, cleanup, launch, read_records, run_dir_for,
)
from infra.launcher.tpu import build_wheel, render_startup_script
from model import registry
from model.metrics import read_metrics
from tests.conftest import BUCKET, stop_process_group
from tests.test_mixture import NEWS, NOVEL
from tests.test_shards import write_links

VENV_BIN = os.path.dirname(sys.executable)
ZONE = "us-central2-b"
PROJECT = "jagpt-test"


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wheel(tmp_path_factory):
    """jagpt's wheel, built once (what the launcher uploads for the VMs to install)."""
    return build_wheel(str(tmp_path_factory.mktemp("wheel")))


def _root(gcs_endpoint) -> tuple[str, dict]:
    return f"gs://{BUCKET}/launcher-{uuid.uuid4().hex[:8]}", {"endpoint_url": gcs_endpoint, "token": "anon"}


def make_run(root: str, options: dict, **train) -> tuple:
    """A storage root with a finished shard set ``shards/s``, and a config that trains the tiny preset on it."""
    storage = Storage(root, options)
    files = write_links(storage, [NOVEL, NEWS])
    encoder = train_encoder(NOVEL + NEWS, EncoderSettings(vocab_size=1200), "tok-launcher")
    manifest = build_shards(storage, files, encoder, ShardSettings(shard_tokens=4000, val_fraction=0.15, workers=1),
                            "shards/s", "c")
    storage.publish("shards/s", {"stats": manifest})
    cfg = load_config(None)
    settings = dict(preset="tiny", steps=20, seq_len=32, batch_size=8, warmup_steps=2, eval_every=5, eval_batches=2,
                    checkpoint_every=5, log_every=5)
    settings.update(train)
    cfg = cfg.model_copy(update={
        "storage": cfg.storage.model_copy(update={"root": root, "options": options}),
        "train": cfg.train.model_copy(update=settings),
    })
    shards = StepResult("shards", "s", "shards/s", {}, cached=True)
    return cfg, shards, storage


@pytest.fixture
def fake(tmp_path):
    """The fake API; its VMs have jagpt on PATH (this venv), JAX on the CPU, and work under tmp_path."""
    env = {
        "JAGPT_PREINSTALLED": "1",
        "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
        "JAX_PLATFORMS": "cpu",
        "JAGPT_WORKDIR": str(tmp_path / "vm-work"),
    }
    with FakeTpuApi(vm_env=env, vm_root=str(tmp_path / "vms"), grace_s=60) as api:
        yield api


def tpu_options(fake, wheel, **kw) -> TpuOptions:
    return TpuOptions(project=PROJECT, api_endpoint=fake.endpoint, poll_s=0.25, wheel=wheel, delete_timeout_s=120,
                      timeout_s=300, **kw)


def tpu_client(fake):
    from google.cloud import tpu_v2

    return tpu_v2.TpuClient(transport="rest", credentials=AnonymousCredentials(), client_options={"api_endpoint": fake.endpoint})


def events(fake, kind: str) -> list[dict]:
    return [e for e in fake.events if e["event"] == kind]


def wait_for(predicate, timeout: float, what: str, fake=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            consoles = "" if fake is None else "\n".join(
                f"--- {name}\n{fake.console(name.rsplit('/', 1)[1])[-3000:]}" for name in {e["name"] for e in events(fake, "vm-started")})
            raise AssertionError(f"timed out waiting for {what}{consoles}")
        time.sleep(0.2)


# -- without training ------------------------------------------------------------------------------------


def test_accelerator_type_and_runtime_version_per_generation():
    got = {t: (a.accelerator_type, a.runtime_version, a.chips) for t in ("v4-8", "v5e-8", "v5litepod-16", "v5p-8", "v6e-8")
           for a in [accelerator(t)]}
    assert got == {
        "v4-8": ("v4-8", "tpu-ubuntu2204-base", 4),
        "v5e-8": ("v5litepod-8", "v2-alpha-tpuv5-lite", 8),
        "v5litepod-16": ("v5litepod-16", "v2-alpha-tpuv5-lite", 16),
        "v5p-8": ("v5p-8", "v2-alpha-tpuv5", 4),
        "v6e-8": ("v6e-8", "v2-alpha-tpuv6e", 8),
    }
    assert accelerator("v4-8").usd_per_hour["spot"] < accelerator("v4-8").usd_per_hour["on-demand"]
    assert accelerator("v6e-8", runtime_version="v2-alpha-tpuv6e-custom").runtime_version == "v2-alpha-tpuv6e-custom"
    with pytest.raises(ValueError, match="unsupported TPU type"):
        accelerator("v3-8")


def test_options_from_the_environment():
    o = TpuOptions.from_env({"JAGPT_TPU_PROJECT": "p", "JAGPT_TPU_CAPACITY": "best-effort", "JAGPT_TPU_POLL_SECONDS": "5",
                             "JAGPT_TPU_MAX_PREEMPTIONS": "3", "JAGPT_TPU_IMAGE": "r/i:t"})
    assert (o.project, o.capacity, o.poll_s, o.max_preemptions, o.image, o.timeout_s) == ("p", "best-effort", 5.0, 3, "r/i:t", None)
    assert TpuOptions.from_env({"GOOGLE_CLOUD_PROJECT": "q"}).project == "q"
    with pytest.raises(ValueError, match="JAGPT_TPU_CAPACITY"):
        TpuOptions.from_env({"JAGPT_TPU_CAPACITY": "cheap"})


def test_startup_script_is_valid_bash_with_every_value_quoted(tmp_path, gcs_endpoint):
    from infra.launcher.core import Job

    storage = Storage(f"gs://{BUCKET}/x", {"endpoint_url": gcs_endpoint, "token": "anon"})
    job = Job("jagpt-abc", 2, "storage:\n  root: gs://b/p  # it's\n", "shards/k", "runs/run-k", 10)
    script = render_startup_script(job, storage, "gs://b/p/launches/jagpt-abc/wheels/jagpt-0.1.0-py3-none-any.whl", "", "jax[tpu]")
    path = tmp_path / "s.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "@@" not in script and "LAUNCH_ID=jagpt-abc" in script and "JAX_SPEC='jax[tpu]'" in script
    # The config travels base64-encoded and decodes to the same text.
    import base64
    import re

    encoded = re.search(r"^CONFIG_B64=(\S+)$", script, re.M).group(1)
    assert base64.b64decode(encoded).decode() == job.config_yaml


def test_fake_api_rejects_what_the_real_one_does(fake):
    """Wrong accelerator spellings and runtime versions, duplicate names, deleting a queued resource that has a node."""
    from google.api_core import exceptions
    from google.cloud import tpu_v2

    client = tpu_client(fake)
    parent = f"projects/{PROJECT}/locations/{ZONE}"
    with pytest.raises(exceptions.BadRequest, match="unknown accelerator type 'v5e-8'"):
        client.create_node(parent=parent, node_id="n1", node=tpu_v2.Node(accelerator_type="v5e-8", runtime_version="v2-alpha-tpuv5-lite"))
    with pytest.raises(exceptions.BadRequest, match="not supported"):
        client.create_node(parent=parent, node_id="n1", node=tpu_v2.Node(accelerator_type="v6e-8", runtime_version="tpu-ubuntu2204-base"))
    spec = tpu_v2.QueuedResource.Tpu.NodeSpec(parent=parent, node_id="n2", node=tpu_v2.Node(accelerator_type="v4-8", runtime_version="tpu-ubuntu2204-base"))
    qr = tpu_v2.QueuedResource(tpu=tpu_v2.QueuedResource.Tpu(node_spec=[spec]), spot=tpu_v2.QueuedResource.Spot())
    assert client.create_queued_resource(parent=parent, queued_resource_id="q2", queued_resource=qr).result(timeout=30).name.endswith("/q2")
    with pytest.raises(exceptions.Conflict):
        client.create_queued_resource(parent=parent, queued_resource_id="q2", queued_resource=qr)
    wait_for(lambda: client.get_queued_resource(name=f"{parent}/queuedResources/q2").state.state.name == "ACTIVE", 30, "ACTIVE")
    node = client.get_node(name=f"{parent}/nodes/n2")
    assert node.state.name == "READY" and node.scheduling_config.spot and node.queued_resource.endswith("/q2")
    assert [n.name for n in client.list_nodes(parent=parent)] == [f"{parent}/nodes/n2"]
    with pytest.raises(exceptions.BadRequest, match="still has node"):
        client.delete_queued_resource(name=f"{parent}/queuedResources/q2")
    client.delete_queued_resource(request={"name": f"{parent}/queuedResources/q2", "force": True}).result(timeout=30)
    with pytest.raises(exceptions.NotFound):
        client.get_node(name=f"{parent}/nodes/n2")
    assert list(client.list_queued_resources(parent=parent)) == []


# -- training through the fake -----------------------------------------------------------------------------


def test_tpu_launch_trains_the_tiny_preset_to_a_registered_checkpoint(fake, wheel, gcs_endpoint, prefect_harness):
    """Spot capacity (a queued resource), in a Prefect flow: progress artifact, registered record, all deleted."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType
    from prefect.context import get_run_context

    cfg, shards, storage = make_run(*_root(gcs_endpoint))
    params = TrainParams(target="tpu", tpu_type="v5litepod-8", zone=ZONE, spot=True, storage_root=cfg.storage.root)

    @flow(name="launcher-test")
    def run():
        return launch(params, cfg, shards, options=tpu_options(fake, wheel)), str(get_run_context().flow_run.id)

    started = time.monotonic()
    record, flow_run_id = run()
    took = time.monotonic() - started
    run_dir = run_dir_for(cfg, shards)
    assert record["run_id"] == run_dir.rsplit("/", 1)[1] and record["step"] == 20 and record["preset"] == "tiny"
    assert record["run_dir"] == run_dir and record["path"] == f"{run_dir}/checkpoints/20"
    assert storage.exists(registry.record_name(record["run_id"], 20)) and storage.exists(f"{run_dir}/checkpoints/20")
    assert storage.is_published(run_dir)
    assert [r["step"] for r in read_metrics(storage, run_dir)][-1] == 20

    # The API calls: a Spot queued resource with a v5litepod node and its generation's runtime.
    (created,) = events(fake, "queued-resource-created")
    assert (created["tier"], created["api"]) == ("spot", "v2")
    (node,) = events(fake, "node-created")
    assert node["acceleratorType"] == "v5litepod-8" and node["spot"] is True
    # Everything deleted, and nothing left in the API.
    assert {e["name"] for e in events(fake, "queued-resource-deleted")} == {created["name"]}
    assert {e["name"] for e in events(fake, "node-deleted")} == {node["name"]}
    client = tpu_client(fake)
    parent = f"projects/{PROJECT}/locations/{ZONE}"
    assert list(client.list_nodes(parent=parent)) == [] and list(client.list_queued_resources(parent=parent)) == []

    # The launch record, the uploaded wheel and the VM's reports.
    (launch_record,) = read_records(storage)
    assert launch_record["outcome"] == "succeeded" and launch_record["flow_run_id"] == flow_run_id
    assert [a["names"]["queued_resource"] for a in launch_record["attempts"]] == [created["name"]]
    assert all(a["deleted_at"] for a in launch_record["attempts"])
    lid = launch_record["launch_id"]
    (wheel_name,) = storage.listdir(f"launches/{lid}/wheels")
    local = os.path.join(os.path.dirname(wheel), "from-bucket.whl")
    with open(local, "wb") as f:
        f.write(storage.read_bytes(f"launches/{lid}/wheels/{wheel_name}"))
    assert {"flows/cli.py", "infra/launcher/startup.sh", "infra/launcher/vm.py"} <= set(zipfile.ZipFile(local).namelist())
    report = storage.read_json(f"launches/{lid}/attempt-1/worker-0.json")
    assert report["rc"] == 0 and "registered: " in storage.read_text(f"launches/{lid}/attempt-1/worker-0.log")

    # Progress from the run's metrics, as a Prefect progress artifact that reached 100 %.
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), type=ArtifactFilterType(any_=["progress"])))
    assert [a.data for a in artifacts] == [100.0] and "finished, 20 steps" in artifacts[0].description
    print(f"launch took {took:.1f} s")


def test_preempted_run_is_queued_again_and_resumes_from_its_checkpoint(fake, wheel, gcs_endpoint):
    """The node is preempted after its first checkpoint; the launcher deletes it, queues again, and the run resumes."""
    # Frequent checkpoints: saving takes long enough that the preemption lands mid-run on a fast machine too.
    cfg, shards, storage = make_run(*_root(gcs_endpoint), steps=16, eval_every=8, checkpoint_every=4, log_every=4)
    run_dir = run_dir_for(cfg, shards)
    params = TrainParams(target="tpu", tpu_type="v4-8", zone=ZONE, spot=True, storage_root=cfg.storage.root)
    result: dict = {}

    def target():
        try:
            result["record"] = launch(params, cfg, shards, options=tpu_options(fake, wheel))
        except BaseException as e:  # the test reports it
            result["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    try:
        wait_for(lambda: storage.listdir(f"{run_dir}/checkpoints"), 180, "the first checkpoint", fake)
        (first,) = events(fake, "node-created")
        node_id = first["name"].rsplit("/", 1)[1]
        preempted = fake.preempt(node_id)
        assert preempted["state"] == "PREEMPTED"
    finally:
        thread.join(timeout=300)
    assert not thread.is_alive(), "the launch did not finish"
    if "error" in result:
        raise result["error"]
    record = result["record"]
    assert record["step"] == 16

    # The first VM saved a checkpoint on SIGTERM and exited 75; a second queued resource ran the rest.
    (pre,) = events(fake, "preempted")
    assert pre["name"] == first["name"]
    created = events(fake, "queued-resource-created")
    assert [c["name"].rsplit("/", 1)[1] for c in created] == [f"{node_id[:-3]}-a1", f"{node_id[:-3]}-a2"]
    assert {e["name"] for e in events(fake, "queued-resource-deleted")} == {c["name"] for c in created}
    (launch_record,) = read_records(storage)
    lid = launch_record["launch_id"]
    assert [a["status"] for a in launch_record["attempts"]] == ["PREEMPTED", "SUCCEEDED"]
    assert storage.read_json(f"launches/{lid}/attempt-1/worker-0.json")["rc"] == 75
    first_log = storage.read_text(f"launches/{lid}/attempt-1/worker-0.log")
    second_log = storage.read_text(f"launches/{lid}/attempt-2/worker-0.log")
    assert "preempted at step" in first_log
    saved = int(first_log.split("preempted at step ")[1].split(":")[0])
    assert 4 <= saved < 16
    assert f"resumed from the checkpoint of step {saved}" in second_log
    # The curve goes on from there: every step logged once, in order, up to the end.
    steps = [r["step"] for r in read_metrics(storage, run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 16


def test_cancel_deletes_the_node(fake, wheel, gcs_endpoint):
    """Best-effort capacity (a v2alpha1 queued resource, over gRPC); cancelled while it trains: all deleted."""
    cfg, shards, storage = make_run(*_root(gcs_endpoint), steps=2000, eval_every=500, checkpoint_every=500)
    params = TrainParams(target="tpu", tpu_type="v6e-8", zone=ZONE, spot=False, storage_root=cfg.storage.root)
    options = tpu_options(fake, wheel, capacity="best-effort", grpc_endpoint=fake.grpc_endpoint)
    cancel = threading.Event()
    result: dict = {}

    def target():
        try:
            launch(params, cfg, shards, options=options, cancel=cancel)
        except BaseException as e:
            result["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    try:
        wait_for(lambda: [r for r in read_records(storage) if r["attempts"]], 60, "the launch record")
        lid = read_records(storage)[0]["launch_id"]
        wait_for(lambda: storage.exists(f"launches/{lid}/attempt-1/worker-0.started.json"), 120, "training to start", fake)
        (created,) = events(fake, "queued-resource-created")
        assert (created["tier"], created["api"]) == ("bestEffort", "v2alpha1")
        (node,) = events(fake, "node-created")
        assert node["acceleratorType"] == "v6e-8" and fake.state()["vms"][node["name"]]["running"]
        cancel.set()
    finally:
        thread.join(timeout=180)
    assert not thread.is_alive()
    assert isinstance(result.get("error"), LaunchCancelled)
    assert [e["name"] for e in events(fake, "queued-resource-deleted")] == [created["name"]]
    assert [e["name"] for e in events(fake, "node-deleted")] == [node["name"]]
    state = fake.state()
    assert state["nodes"] == {} and state["queuedResources"] == {} and state["vms"] == {}
    (record,) = read_records(storage)
    assert record["outcome"] == "cancelled" and record["attempts"][0]["deleted_at"]


def test_crashed_launcher_leaves_a_record_that_the_hook_cleans_up(fake, wheel, gcs_endpoint, tmp_path):
    """On-demand (a node, no queued resource). The launching process is killed (SIGKILL: no finally runs);
    the flow's on_crashed hook deletes the node."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Crashed

    from flows.jobs import delete_launched_resources

    root, options = _root(gcs_endpoint)
    cfg, shards, storage = make_run(root, options, steps=2000, eval_every=500, checkpoint_every=500)
    config_path = tmp_path / "config.yaml"
    from infra.launcher.core import dump_config

    config_path.write_text(dump_config(cfg))
    flow_run_id = str(uuid.uuid4())
    params = {"target": "tpu", "tpu_type": "v4-8", "zone": ZONE, "spot": False, "storage_root": root,
              "steps": 2000}
    script = (
        "import sys\n"
        "from corpus.steps import StepResult\n"
        "from flows.config import load_config\n"
        "from flows.params import TrainParams\n"
        "from infra.launcher import TpuOptions, launch\n"
        f"opts = TpuOptions(project={PROJECT!r}, api_endpoint={fake.endpoint!r}, poll_s=0.25, wheel={wheel!r})\n"
        f"launch(TrainParams(**{params!r}), load_config({str(config_path)!r}), StepResult('shards', 's', 'shards/s'), "
        f"options=opts, flow_run_id={flow_run_id!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        wait_for(lambda: events(fake, "ready"), 120, "the node to be READY", fake)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    (node,) = events(fake, "node-created")
    assert not events(fake, "queued-resource-created") and node["spot"] is False
    time.sleep(1)
    assert node["name"] in fake.state()["nodes"], "the node outlived the launcher"
    (record,) = read_records(storage)
    assert record["outcome"] is None and record["flow_run_id"] == flow_run_id

    # What the Prefect worker does for a crashed (or cancelled) flow run: the flow's hook, with the run's parameters.
    run = FlowRun(id=uuid.UUID(flow_run_id), flow_id=uuid.uuid4(), parameters={"params": params, "config_path": str(config_path)})
    delete_launched_resources(None, run, Crashed(message="the flow run process exited with status -9"))
    assert fake.state()["nodes"] == {}
    assert [e["name"] for e in events(fake, "node-deleted")] == [node["name"]]
    (record,) = read_records(storage)
    assert record["outcome"] == "crashed" and record["attempts"][0]["deleted_at"]
    assert cleanup(storage, flow_run_id=flow_run_id) == []  # nothing left: a second call is a no-op


def test_local_backend_trains_to_a_registered_checkpoint(tmp_path):
    """The same launch loop on a local subprocess (CPU here), with a local storage root."""
    cfg, shards, storage = make_run(str(tmp_path / "data"), {})
    backend = LocalBackend(storage, workdir=str(tmp_path / "work"), env={"JAX_PLATFORMS": "cpu"}, poll_s=0.25)
    record = launch(TrainParams(), cfg, shards, backend=backend)
    assert record["step"] == 20 and storage.exists(registry.record_name(record["run_id"], 20))
    (launch_record,) = read_records(storage)
    assert launch_record["backend"]["kind"] == "local" and launch_record["outcome"] == "succeeded"
    assert [a["status"] for a in launch_record["attempts"]] == [Status.SUCCEEDED.value]
    # Launching the same run again finds it registered and starts nothing.
    assert launch(TrainParams(), cfg, shards, backend=backend) == record
    assert len(read_records(storage)) == 1


def test_tpu_backend_refuses_a_local_storage_root(tmp_path):
    with pytest.raises(Exception, match="gs://"):
        TpuVmBackend.for_params(TrainParams(target="tpu"), Storage(str(tmp_path)), TpuOptions(project="p"))


# -- the train deployment on a real Prefect server, cancelled as from the UI ------------------------------------


def make_current_corpus(storage: Storage) -> None:
    """Two published dedup links of the sample site's prose and ``corpus/current.json`` naming them."""
    from corpus.explain import write_current

    files = write_links(storage, [NOVEL, NEWS])
    links = [f.rsplit("/", 1)[0] for f in files]
    for link in links:
        storage.publish(link, {"stats": {}})
    write_current(storage, [], [], links)


@pytest.mark.e2e
def test_cancelling_the_train_flow_run_deletes_its_tpu(tmp_path, gcs_endpoint, wheel, fake):
    """prefect.yaml's train deployment on a process worker, target tpu on the fake; `prefect flow-run cancel`
    (what the UI's Cancel does) while the VM trains: the run ends Cancelled and the TPU is deleted."""
    import re

    import yaml

    from flows.config import default_config_text
    from tests.conftest import free_port
    from tests.test_prefect_server import PREFECT, POOL, Server, _logs, _start

    root, options = _root(gcs_endpoint)
    storage = Storage(root, options)
    make_current_corpus(storage)
    cfg = yaml.safe_load(default_config_text())
    cfg["storage"] = {"root": root, "options": options}
    cfg["encoder"]["vocab_size"] = 1200
    cfg["shards"].update(shard_tokens=4000, val_fraction=0.15)
    cfg["train"].update(preset="tiny", steps=2000, seq_len=32, batch_size=8, warmup_steps=2, eval_every=500,
                        eval_batches=2, checkpoint_every=500)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))

    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "JAGPT_TPU_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
               PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_CLI_COLORS="false")
    worker_env = {**env, "JAGPT_TPU_PROJECT": PROJECT, "JAGPT_TPU_API_ENDPOINT": fake.endpoint,
                  "JAGPT_TPU_WHEEL": wheel, "JAGPT_TPU_POLL_SECONDS": "0.5"}
    procs = [_start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, home / "server.log", home)]
    server = Server(f"http://127.0.0.1:{port}", api, env, home)
    try:
        wait_for(lambda: _healthy(api) or procs[0].poll() is not None, 180, "the Prefect server")
        assert procs[0].poll() is None, server.tail()
        server.prefect("work-pool", "create", POOL, "--type", "process")
        server.prefect("--no-prompt", "deploy", "--name", "train", timeout=300)
        procs.append(_start([PREFECT, "worker", "start", "--pool", POOL], worker_env, home / "worker.log", home))
        params = {"params": {"target": "tpu", "tpu_type": "v4-8", "zone": ZONE, "spot": True, "storage_root": root},
                  "config_path": str(config)}
        out = server.prefect("deployment", "run", "train/train", "--params", json.dumps(params))
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

        def training():
            records = [r for r in read_records(storage) if r["attempts"]]
            return records and storage.exists(f"launches/{records[0]['launch_id']}/attempt-1/worker-0.started.json")

        wait_for(training, 300, f"training on the fake TPU\n{server.tail()}", fake)
        (node,) = events(fake, "node-created")
        assert node["name"] in fake.state()["nodes"]
        server.prefect("flow-run", "cancel", run_id)
        with server.client() as client:
            run = wait_for(lambda: (r := client.read_flow_run(run_id)).state.is_final() and r, 180,
                           f"the flow run to end\n{server.tail()}")
        assert run.state.is_cancelled(), f"{run.state}\n{server.tail()}"
        wait_for(lambda: not fake.state()["nodes"] and not fake.state()["queuedResources"], 180,
                 f"the TPU to be deleted\n{server.tail()}")
        assert [e["name"] for e in events(fake, "node-deleted")] == [node["name"]]
        # The flow process deletes it on its way out (outcome "interrupted": it only sees a SIGTERM) unless the
        # worker kills it first; either way the flow's on_cancellation hook, the only caller that records
        # "cancelled", runs after it and deletes whatever is left.
        wait_for(lambda: read_records(storage)[0]["outcome"] == "cancelled", 60, f"the outcome\n{read_records(storage)}")
        (record,) = read_records(storage)
        assert all(a["deleted_at"] for a in record["attempts"]), record
        assert "Flow run was cancelled." in _logs(server, run_id, expect=("Flow run was cancelled.",))
    finally:
        for proc in reversed(procs):
            stop_process_group(proc)


def _healthy(api: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
