"""The Cloud TPU VM backend: one TPU VM (a queued resource, or a node) per attempt, through google-cloud-tpu.

Capacity (``TpuOptions.capacity``, default Spot when the train parameters' ``spot`` is on, else on-demand):

* ``spot``: a queued resource in the Spot tier (v2 API). It waits for capacity
  (QUEUED), then its node is created; a preempted node ends the attempt.
* ``best-effort``: a queued resource in the best-effort tier, which only the
  v2alpha1 API has (and which the Python library serves over gRPC only).
* ``on-demand``: a node created directly (v2 API).

The accelerator type and the runtime version follow the TPU generation
(:data:`GENERATIONS`; chips and prices come from ``model/tpu_specs.json``).
Each host runs the startup script (``startup.sh``, filled in by
:func:`render_startup_script`), which installs jagpt from the wheel this
backend uploads to ``launches/<id>/wheels/`` (or runs ``TpuOptions.image``), runs
``jagpt train`` and reports under ``launches/<id>/attempt-<n>/``.

Settings from the environment (:meth:`TpuOptions.from_env`), e.g. in the
Prefect work pool's job variables:

==============================  =====================================================================
JAGPT_TPU_PROJECT               Google Cloud project (default: GOOGLE_CLOUD_PROJECT, then gcloud's)
JAGPT_TPU_CAPACITY              spot, best-effort or on-demand (default: from the ``spot`` parameter)
JAGPT_TPU_RUNTIME_VERSION       override the generation's runtime version
JAGPT_TPU_IMAGE                 a training image (infra/Dockerfile) to run instead of the wheel
JAGPT_TPU_WHEEL                 a wheel to upload instead of building one from this source tree
JAGPT_TPU_SERVICE_ACCOUNT       the VMs' service account (Terraform's jagpt-train account)
JAGPT_TPU_NETWORK / _SUBNETWORK the VPC network and subnetwork of the VMs
JAGPT_TPU_POLL_SECONDS          seconds between polls (default 30)
JAGPT_TPU_MAX_PREEMPTIONS       give up after this many preemptions (default 20)
JAGPT_TPU_TIMEOUT_SECONDS       give up after this long, queueing included (default: never)
JAGPT_TPU_API_ENDPOINT          another Cloud TPU API endpoint; a plain http:// one (a local fake,
                                infra/fake_tpu_api.py) is called without credentials
JAGPT_TPU_GRPC_ENDPOINT         the same for v2alpha1 (best-effort), which the library calls over gRPC
==============================  =====================================================================
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from corpus.storage import Storage
from infra.launcher.core import LAUNCHES, Handle, Job, LaunchError, Polled, Status, Watch

log = logging.getLogger(__name__)

STARTUP_TEMPLATE = Path(__file__).with_name("startup.sh")
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
CAPACITIES = ("spot", "best-effort", "on-demand")


@dataclass(frozen=True)
class Generation:
    accelerator_prefix: str  # how the API spells the type: v5litepod-8, not v5e-8
    runtime_version: str     # Google's recommended TPU software version for JAX on this generation


# "TPU software versions" in the Cloud TPU docs: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
# v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base. Keys are model/tpu_specs.json's.
GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", "tpu-ubuntu2204-base"),
    "v5e": Generation("v5litepod", "v2-alpha-tpuv5-lite"),
    "v5p": Generation("v5p", "v2-alpha-tpuv5"),
    "v6e": Generation("v6e", "v2-alpha-tpuv6e"),
}
_ALIASES = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e", "v5p": "v5p", "v6e": "v6e"}


@dataclass(frozen=True)
class Accelerator:
    accelerator_type: str  # the API's name, e.g. v5litepod-8
    generation: str        # v4, v5e, v5p, v6e
    runtime_version: str
    chips: int
    usd_per_hour: dict[str, float]  # on-demand and spot list prices of the slice (model/tpu_specs.json)


def accelerator(tpu_type: str, runtime_version: str | None = None) -> Accelerator:
    """``v4-8``, ``v5e-8`` or ``v5litepod-8``, ``v5p-8``, ``v6e-8`` -> the API's accelerator type, runtime version, chips."""
    from model.plan import tpu_slice

    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", tpu_type.strip().lower())
    if not m or m.group(1) not in _ALIASES:
        raise ValueError(f"unsupported TPU type {tpu_type!r}: the launcher knows {', '.join(GENERATIONS)} "
                         "(e.g. v4-8, v5litepod-8 or v5e-8, v5p-8, v6e-8)")
    generation = _ALIASES[m.group(1)]
    gen = GENERATIONS[generation]
    spec = tpu_slice(f"{generation}-{m.group(2)}")
    prices = {"on-demand": spec["on_demand_usd_per_chip_hour"] * spec["chips"],
              "spot": spec["spot_usd_per_chip_hour"] * spec["chips"]}
    return Accelerator(f"{gen.accelerator_prefix}-{m.group(2)}", generation, runtime_version or gen.runtime_version,
                       spec["chips"], prices)


@dataclass(frozen=True)
class TpuOptions:
    """How TPU VMs are made and watched; the train parameters give the type, zone and Spot."""

    project: str | None = None
    capacity: str | None = None  # spot, best-effort, on-demand; None: spot if params.spot else on-demand
    runtime_version: str | None = None
    image: str | None = None
    wheel: str | None = None
    service_account: str | None = None
    network: str | None = None
    subnetwork: str | None = None
    api_endpoint: str | None = None
    grpc_endpoint: str | None = None  # v2alpha1 (best-effort), which the library calls over gRPC; default: api_endpoint
    poll_s: float = 30.0
    max_preemptions: int = 20
    timeout_s: float | None = None
    delete_timeout_s: float = 900.0
    jax_spec: str = "jax[tpu]"
    labels: dict[str, str] = field(default_factory=lambda: {"app": "jagpt"})

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> TpuOptions:
        env = dict(os.environ if env is None else env)

        def get(name: str) -> str | None:
            return env.get(f"JAGPT_TPU_{name}") or None

        def number(name: str, kind, default):
            value = get(name)
            return default if value is None else kind(value)

        options = cls(
            project=get("PROJECT") or env.get("GOOGLE_CLOUD_PROJECT") or env.get("CLOUDSDK_CORE_PROJECT") or None,
            capacity=get("CAPACITY"), runtime_version=get("RUNTIME_VERSION"), image=get("IMAGE"), wheel=get("WHEEL"),
            service_account=get("SERVICE_ACCOUNT"), network=get("NETWORK"), subnetwork=get("SUBNETWORK"),
            api_endpoint=get("API_ENDPOINT"), grpc_endpoint=get("GRPC_ENDPOINT"), poll_s=number("POLL_SECONDS", float, cls.poll_s),
            max_preemptions=number("MAX_PREEMPTIONS", int, cls.max_preemptions),
            timeout_s=number("TIMEOUT_SECONDS", float, None),
        )
        if options.capacity is not None and options.capacity not in CAPACITIES:
            raise ValueError(f"JAGPT_TPU_CAPACITY must be one of {', '.join(CAPACITIES)}, got {options.capacity!r}")
        return options


def _default_project() -> str:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        _, project = google.auth.default()
    except DefaultCredentialsError as e:
        raise LaunchError(f"no Google Cloud credentials to create TPUs with ({e}); run `gcloud auth "
                          "application-default login` or run the worker as a service account") from None
    if not project:
        raise LaunchError("no Google Cloud project: set JAGPT_TPU_PROJECT (or GOOGLE_CLOUD_PROJECT)")
    return project


def build_wheel(out_dir: str) -> str:
    """jagpt's wheel, built from this source tree (copied first, so the tree gets no build/ or egg-info)."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.exists():
        raise LaunchError(f"no source tree at {root} to build jagpt's wheel from: set JAGPT_TPU_WHEEL or JAGPT_TPU_IMAGE")
    meta = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    tops = sorted({p.split(".")[0] for p in meta["tool"]["setuptools"]["packages"]})
    with tempfile.TemporaryDirectory(prefix="jagpt-wheel-") as tmp:
        src = Path(tmp) / "jagpt"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(root / name, src / name)
        for top in tops:
            shutil.copytree(root / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "terraform"))
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", out_dir, str(src)],
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise LaunchError(f"building jagpt's wheel failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    wheels = sorted(Path(out_dir).glob("jagpt-*.whl"))
    if not wheels:
        raise LaunchError(f"pip built no jagpt wheel in {out_dir}")
    return str(wheels[-1])


def render_startup_script(job: Job, storage: Storage, wheel_url: str, image: str, jax_spec: str) -> str:
    """``startup.sh`` with this attempt's values (each shell-quoted; the config base64-encoded)."""
    values = {
        "LAUNCH_ID": job.launch_id, "ATTEMPT": str(job.attempt), "REPORT_PREFIX": job.prefix,
        "REPORT_URL": storage.url(job.prefix), "WHEEL_URL": wheel_url, "IMAGE": image, "JAX_SPEC": jax_spec,
        "SHARDS": job.shards, "CONFIG_B64": base64.b64encode(job.config_yaml.encode("utf-8")).decode("ascii"),
    }
    script = STARTUP_TEMPLATE.read_text(encoding="utf-8")
    for name, value in values.items():
        script = script.replace(f"@@{name}@@", shlex.quote(value))
    left = re.findall(r"@@[A-Z_]+@@", script)
    if left:
        raise LaunchError(f"startup.sh has placeholders the launcher does not fill: {left}")
    return script


class TpuVmBackend:
    """Attempts as Cloud TPU VMs (see the module doc)."""

    kind = "tpu-vm"

    def __init__(self, storage: Storage, zone: str, options: TpuOptions, accel: Accelerator | None = None,
                 capacity: str = "spot"):
        if not storage.url("").startswith("gs://") and accel is not None:
            raise LaunchError(f"a TPU VM needs a gs:// storage root it can reach, not {storage.url('')}")
        if capacity not in CAPACITIES:
            raise ValueError(f"capacity must be one of {', '.join(CAPACITIES)}, got {capacity!r}")
        self.storage, self.zone, self.options, self.accel, self.capacity = storage, zone, options, accel, capacity
        self.project = options.project or _default_project()
        self.parent = f"projects/{self.project}/locations/{zone}"
        self.wheel_url = ""
        self._clients: dict[str, Any] = {}

    @classmethod
    def for_params(cls, params, storage: Storage, options: TpuOptions) -> TpuVmBackend:
        capacity = options.capacity or ("spot" if params.spot else "on-demand")
        return cls(storage, params.zone, options, accelerator(params.tpu_type, options.runtime_version), capacity)

    @classmethod
    def from_description(cls, storage: Storage, described: dict[str, Any]) -> TpuVmBackend:
        """A backend that can poll and delete what a launch record names (for cleanup)."""
        options = replace(TpuOptions.from_env(), project=described["project"], api_endpoint=described.get("api_endpoint"),
                          grpc_endpoint=described.get("grpc_endpoint"))
        return cls(storage, described["zone"], options, None, described.get("capacity", "spot"))

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "project": self.project, "zone": self.zone, "api_endpoint": self.options.api_endpoint,
            "grpc_endpoint": self.options.grpc_endpoint,
            "capacity": self.capacity, "accelerator_type": self.accel.accelerator_type if self.accel else None,
            "runtime_version": self.accel.runtime_version if self.accel else None, "image": self.options.image,
        }

    @property
    def watch(self) -> Watch:
        o = self.options
        return Watch(poll_s=o.poll_s, max_preemptions=o.max_preemptions, timeout_s=o.timeout_s)

    # -- clients --------------------------------------------------------------------------------------
    def _api(self) -> str:
        return "v2alpha1" if self.capacity == "best-effort" else "v2"

    def client(self, api: str):
        if api in self._clients:
            return self._clients[api]
        endpoint = self.options.api_endpoint if api == "v2" else (self.options.grpc_endpoint or self.options.api_endpoint)
        plain = bool(endpoint) and endpoint.startswith("http://")
        if plain:
            from google.auth.credentials import AnonymousCredentials

            credentials = AnonymousCredentials()  # a local fake: never send real credentials over plain http
        else:
            credentials = None  # application default credentials
        client_options = {"api_endpoint": endpoint} if endpoint else None
        if api == "v2":
            from google.cloud import tpu_v2

            client = tpu_v2.TpuClient(transport="rest", credentials=credentials, client_options=client_options)
        else:
            # v2alpha1 (the best-effort tier) has no REST transport in the Python library: gRPC.
            from google.cloud import tpu_v2alpha1

            if plain:
                import grpc
                from google.cloud.tpu_v2alpha1.services.tpu.transports import TpuGrpcTransport

                channel = grpc.insecure_channel(endpoint.removeprefix("http://"))
                client = tpu_v2alpha1.TpuClient(transport=TpuGrpcTransport(channel=channel))
            else:
                client = tpu_v2alpha1.TpuClient(credentials=credentials, client_options=client_options)
        self._clients[api] = client
        return client

    def _types(self, api: str):
        if api == "v2":
            from google.cloud import tpu_v2 as types
        else:
            from google.cloud import tpu_v2alpha1 as types
        return types

    # -- the Backend protocol -----------------------------------------------------------------------------
    def prepare(self, launch_id: str, config_yaml: str) -> None:
        if self.accel is None:
            raise LaunchError("this backend was made for cleanup only")
        self.storage.write_text(f"{LAUNCHES}/{launch_id}/config.yaml", config_yaml)
        log.info("TPU %s (%s, %d chips) in %s, %s capacity; list price about $%.2f/h on demand, $%.2f/h Spot",
                 self.accel.accelerator_type, self.accel.runtime_version, self.accel.chips, self.zone, self.capacity,
                 self.accel.usd_per_hour["on-demand"], self.accel.usd_per_hour["spot"])
        if self.options.image:
            return
        with tempfile.TemporaryDirectory(prefix="jagpt-wheel-") as tmp:
            wheel = self.options.wheel or build_wheel(tmp)
            rel = f"{LAUNCHES}/{launch_id}/wheels/{os.path.basename(wheel)}"
            with open(wheel, "rb") as f:
                self.storage.write_bytes(rel, f.read())
        self.wheel_url = self.storage.url(rel)
        log.info("uploaded %s", self.wheel_url)

    def names(self, job: Job) -> dict[str, Any]:
        rid = f"{job.launch_id}-a{job.attempt}"
        queued = None if self.capacity == "on-demand" else f"{self.parent}/queuedResources/{rid}"
        return {"api": self._api(), "node": f"{self.parent}/nodes/{rid}", "queued_resource": queued, "reports": job.prefix}

    def node_spec(self, job: Job, api: str):
        types = self._types(api)
        o = self.options
        node = types.Node(
            accelerator_type=self.accel.accelerator_type,
            runtime_version=self.accel.runtime_version,
            description=f"jagpt training, launch {job.launch_id} attempt {job.attempt}",
            labels={**o.labels, "jagpt-launch": job.launch_id},
            metadata={"startup-script": render_startup_script(job, self.storage, self.wheel_url, o.image or "", o.jax_spec)},
        )
        if o.service_account:
            node.service_account = types.ServiceAccount(email=o.service_account, scope=[CLOUD_PLATFORM])
        if o.network or o.subnetwork:
            node.network_config = types.NetworkConfig(network=o.network or "", subnetwork=o.subnetwork or "",
                                                      enable_external_ips=True)
        return node

    def submit(self, job: Job) -> Handle:
        names = self.names(job)
        api = names["api"]
        client, types = self.client(api), self._types(api)
        node = self.node_spec(job, api)
        rid = names["node"].rsplit("/", 1)[1]
        if names["queued_resource"] is None:
            op = client.create_node(parent=self.parent, node_id=rid, node=node)
            return Handle(job.attempt, names, runtime={"operation": op, "job": job})
        spec = types.QueuedResource.Tpu.NodeSpec(parent=self.parent, node_id=rid, node=node)
        tier = {"spot": types.QueuedResource.Spot()} if self.capacity == "spot" else {"best_effort": types.QueuedResource.BestEffort()}
        qr = types.QueuedResource(tpu=types.QueuedResource.Tpu(node_spec=[spec]), **tier)
        op = client.create_queued_resource(parent=self.parent, queued_resource_id=rid, queued_resource=qr)
        op.result(timeout=300)  # the request is accepted quickly; the queueing shows in its state
        return Handle(job.attempt, names, runtime={"job": job})

    def poll(self, handle: Handle) -> Polled:
        from google.api_core import exceptions

        names = handle.names
        client = self.client(names["api"])
        if names.get("queued_resource"):
            try:
                qr = client.get_queued_resource(name=names["queued_resource"])
            except exceptions.NotFound:
                return Polled(Status.FAILED, "the queued resource is gone (deleted outside the launcher?)")
            state = qr.state.state.name
            if state in ("STATE_UNSPECIFIED", "CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES"):
                return Polled(Status.QUEUED, f"queued resource {state}")
            if state == "PROVISIONING":
                return Polled(Status.PROVISIONING, "queued resource PROVISIONING")
            if state in ("SUSPENDING", "SUSPENDED"):
                return Polled(Status.PREEMPTED, f"queued resource {state}")
            if state == "FAILED":
                error = qr.state.failed_data.error
                return Polled(Status.FAILED, f"queued resource FAILED: {error.message or 'no reason given'}")
            if state != "ACTIVE":
                return Polled(Status.FAILED, f"queued resource {state}")
        try:
            node = client.get_node(name=names["node"])
        except exceptions.NotFound:
            op = (handle.runtime or {}).get("operation")
            if op is not None and op.done() and op.exception() is not None:
                return Polled(Status.FAILED, f"creating the node failed: {op.exception()}")
            return Polled(Status.PROVISIONING, "no node yet")
        state = node.state.name
        if state in ("CREATING", "STARTING", "RESTARTING", "REPAIRING", "REIMAGING", "STATE_UNSPECIFIED"):
            return Polled(Status.PROVISIONING, f"node {state}")
        if state in ("PREEMPTED", "TERMINATED"):
            return Polled(Status.PREEMPTED, f"node {state}")
        if state != "READY":
            return Polled(Status.FAILED, f"node {state}")
        return self._reports(handle, hosts=max(1, len(node.network_endpoints)))

    def _reports(self, handle: Handle, hosts: int) -> Polled:
        from infra.launcher.vm import read_reports  # not at the top: `python -m infra.launcher.vm` imports this package

        started, finished = read_reports(self.storage, handle.names["reports"])
        failed = {w: r for w, r in finished.items() if r.get("rc") not in (0, 75)}
        if failed:
            worker, report = min(failed.items())
            return Polled(Status.FAILED, f"worker {worker}: jagpt train exited with status {report.get('rc')}"
                          + (f" ({report['stage']})" if report.get("stage") else ""))
        if any(r.get("rc") == 75 for r in finished.values()):
            return Polled(Status.PREEMPTED, "jagpt train got SIGTERM, saved a checkpoint and exited 75")
        if len(finished) >= hosts:
            return Polled(Status.SUCCEEDED, f"{len(finished)} host(s) finished")
        if started:
            return Polled(Status.RUNNING, f"{len(started)}/{hosts} host(s) training")
        return Polled(Status.PROVISIONING, "node READY, installing")

    def delete(self, handle: Handle) -> None:
        from google.api_core import exceptions

        names = handle.names
        client = self.client(names["api"])
        if names.get("queued_resource"):
            # force: the queued resource and its node together.
            self._delete(client.delete_queued_resource, {"name": names["queued_resource"], "force": True},
                         lambda: client.get_queued_resource(name=names["queued_resource"]), exceptions)
        self._delete(client.delete_node, {"name": names["node"]}, lambda: client.get_node(name=names["node"]), exceptions)

    def _delete(self, call, request: dict[str, Any], get, exceptions) -> None:
        timeout = self.options.delete_timeout_s
        try:
            call(request=request).result(timeout=timeout)
            return
        except exceptions.NotFound:
            return
        except exceptions.GoogleAPICallError as e:
            # Another caller's delete in flight (a hook and the launcher's finally): wait until it is gone.
            log.info("deleting %s: %s; waiting until it is gone", request["name"], e.message)
            error = e
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                get()
            except exceptions.NotFound:
                return
            time.sleep(2)
        raise LaunchError(f"{request['name']} is still there {timeout:.0f} s after deleting it ({error.message})")

    def log_tail(self, handle: Handle) -> str:
        from infra.launcher.vm import read_log, read_reports

        _, finished = read_reports(self.storage, handle.names["reports"])
        worker = min((w for w, r in finished.items() if r.get("rc") not in (0, 75)), default=0)
        return read_log(self.storage, handle.names["reports"], worker)
