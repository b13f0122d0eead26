"""A local fake of the Cloud TPU REST API (v2 and v2alpha1), for driving the real google-cloud-tpu client in tests.

It serves the calls :mod:`infra.launcher` makes, with the real API's paths,
JSON shapes and long-running operations::

    POST   /{v}/projects/P/locations/Z/nodes?nodeId=N                 create a node (an LRO, done when READY)
    GET    /{v}/projects/P/locations/Z/nodes[/N]                      list / get
    DELETE /{v}/projects/P/locations/Z/nodes/N                        delete (an LRO)
    POST   /{v}/projects/P/locations/Z/queuedResources?queuedResourceId=Q
    GET    /{v}/projects/P/locations/Z/queuedResources[/Q]
    DELETE /{v}/projects/P/locations/Z/queuedResources/Q[?force=true]
    GET    /{v}/projects/P/locations/Z/operations[/O]                 the LROs above

``{v}`` is ``v2`` or ``v2alpha1`` (the best-effort tier of queued resources
exists only in v2alpha1). v2alpha1 is also served over gRPC on
``grpc_endpoint`` (the Python library has no REST transport for it): each
call becomes the REST request above. Bodies are parsed into, and answers built from, the
client library's own message types (``google.cloud.tpu_v2.types``), so a field
the real API does not have is rejected with 400 as it would be, and enums are
sent as numbers when the client asks for ``$alt=json;enum-encoding=int`` (the
REST transport always does). Errors use Google's JSON error shape, which the
client turns into ``google.api_core.exceptions`` (NotFound, AlreadyExists, ...).

Lifecycles:

* a node is CREATING for ``provision_s``, then READY; the create operation is
  done when it is READY;
* a queued resource is ACCEPTED, then WAITING_FOR_RESOURCES for ``capacity_wait_s``,
  then PROVISIONING while its node is created, then ACTIVE; its create
  operation is done at once (as on the real API, where creating the request
  is quick and the queueing shows in its state);
* deleting a queued resource that still has its node fails with 400
  FAILED_PRECONDITION unless ``force=true``, which deletes the node too.

The VM: when a node becomes READY, its ``startup-script`` metadata runs as
``bash`` in a folder of its own under ``vm_root`` (one worker per node: the
fake does not start the hosts of a pod slice), with the fake's environment
plus ``vm_env`` (e.g. JAX on the CPU, and ``JAGPT_PREINSTALLED=1`` for a VM
"image" with jagpt on PATH) and ``TPU_WORKER_ID=0``. Its output goes to
``console.log`` there. Deleting the node, or preempting it, sends SIGTERM to the
script's process group (as a VM's shutdown does to the startup-script service),
then SIGKILL after ``grace_s``.

Test-only endpoints (not in the real API):

* ``POST /fake/preempt/N``: preempt node N: the VM gets SIGTERM (then SIGKILL
  after ``grace_s``); once it is gone the node is PREEMPTED and its queued
  resource SUSPENDED. Answers when that is done, with the node's JSON.
* ``GET /fake/state``: nodes, queued resources, VMs and the event history as JSON.

Binds 127.0.0.1 only. ``python -m infra.fake_tpu_api --port 8470`` serves it on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from google.longrunning import operations_pb2
from google.protobuf import json_format

VERSIONS = ("v2", "v2alpha1")
_ID = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
# What the fake accepts: accelerator types and the runtime versions Google documents for them
# ("TPU software versions": v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
# v4 and older tpu-ubuntu2204-base). v5e is spelled v5litepod in accelerator types.
ACCELERATOR = re.compile(r"^(v2|v3|v4|v5litepod|v5p|v6e)-(\d+)$")
RUNTIMES = {
    "v2": {"tpu-ubuntu2204-base", "tpu-vm-base"},
    "v3": {"tpu-ubuntu2204-base", "tpu-vm-base"},
    "v4": {"tpu-ubuntu2204-base", "tpu-vm-v4-base"},
    "v5litepod": {"v2-alpha-tpuv5-lite"},
    "v5p": {"v2-alpha-tpuv5"},
    "v6e": {"v2-alpha-tpuv6e"},
}
_RESOURCE = re.compile(
    r"^/(?P<v>v2|v2alpha1)/projects/(?P<project>[^/]+)/locations/(?P<zone>[^/]+)"
    r"/(?P<kind>nodes|queuedResources|operations)(?:/(?P<id>[^/:]+))?$"
)


def _types(version: str):
    if version == "v2":
        from google.cloud.tpu_v2 import types
    else:
        from google.cloud.tpu_v2alpha1 import types
    return types


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    """An error answer in Google's JSON shape: {"error": {"code", "message", "status"}}."""

    def __init__(self, code: HTTPStatus, status: str, message: str):
        super().__init__(message)
        self.code, self.status, self.message = code, status, message

    def body(self) -> dict[str, Any]:
        return {"error": {"code": int(self.code), "message": self.message, "status": self.status}}


def _not_found(what: str) -> ApiError:
    return ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"{what} not found")


class _Vm:
    """The "VM" of a node: its startup script as a process group."""

    def __init__(self, node_id: str, script: str, root: str, env: dict[str, str]):
        self.dir = os.path.join(root, f"{node_id}-{secrets.token_hex(3)}")
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "startup-script"), "w", encoding="utf-8") as f:
            f.write(script)
        self.console = open(os.path.join(self.dir, "console.log"), "wb")
        self.proc = subprocess.Popen(
            ["bash", os.path.join(self.dir, "startup-script")], cwd=self.dir, env=env,
            stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM to the whole group, SIGKILL after ``grace_s``; the script's exit status."""
        if self.running:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=30)
        # Whatever the script left behind in its group (it may have exited before its children).
        self._signal(signal.SIGKILL)
        self.console.close()
        return self.proc.returncode

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def console_text(self) -> str:
        try:
            with open(os.path.join(self.dir, "console.log"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


class FakeTpuApi:
    """The fake server; ``with FakeTpuApi(...) as api:`` serves on ``api.endpoint`` (http://127.0.0.1:PORT)."""

    def __init__(
        self,
        vm_env: dict[str, str] | None = None,
        vm_root: str | None = None,
        provision_s: float = 0.3,
        capacity_wait_s: float = 0.3,
        grace_s: float = 30.0,
        port: int = 0,
    ):
        self.vm_env = dict(vm_env or {})
        self._own_root = vm_root is None
        self.vm_root = vm_root or tempfile.mkdtemp(prefix="fake-tpu-vms-")
        self.provision_s, self.capacity_wait_s, self.grace_s = provision_s, capacity_wait_s, grace_s
        self.lock = threading.RLock()
        self.nodes: dict[str, dict[str, Any]] = {}  # full name -> node JSON (camelCase, enum names)
        self.queued: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.vms: dict[str, _Vm] = {}  # node name -> VM
        self.finished_vms: dict[str, list[_Vm]] = {}
        self._timers: dict[str, float] = {}  # resource name -> when its current state ends
        self.events: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every API call
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._grpc, self._grpc_port = self._grpc_server()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def grpc_endpoint(self) -> str:
        """The v2alpha1 API over gRPC (plaintext), which is how the Python library calls v2alpha1."""
        return f"http://127.0.0.1:{self._grpc_port}"

    def start(self) -> FakeTpuApi:
        self._grpc.start()
        for target in (self._server.serve_forever, self._tick_forever):
            t = threading.Thread(target=target, name=f"fake-tpu-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._grpc.stop(grace=None)
        with self.lock:
            vms = list(self.vms.values())
            self.vms.clear()
        for vm in vms:
            vm.stop(grace_s=5)
        for t in self._threads:
            t.join(timeout=10)
        if self._own_root:
            shutil.rmtree(self.vm_root, ignore_errors=True)

    def __enter__(self) -> FakeTpuApi:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what tests look at --------------------------------------------------------------------
    def event(self, kind: str, name: str, **detail: Any) -> None:
        self.events.append({"at": time.time(), "event": kind, "name": name, **detail})

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "nodes": json.loads(json.dumps(self.nodes)),
                "queuedResources": json.loads(json.dumps(self.queued)),
                "vms": {name: {"dir": vm.dir, "running": vm.running, "pid": vm.proc.pid} for name, vm in self.vms.items()},
                "events": list(self.events),
            }

    def node_by_id(self, node_id: str) -> str:
        with self.lock:
            found = [n for n in self.nodes if n.rsplit("/", 1)[1] == node_id]
        if not found:
            raise _not_found(f"node {node_id}")
        return found[0]

    def console(self, node_id: str) -> str:
        """The console output of the node's VM (every VM the node had, oldest first)."""
        with self.lock:
            vms = [vm for name, lst in self.finished_vms.items() if name.rsplit("/", 1)[1] == node_id for vm in lst]
            vms += [vm for name, vm in self.vms.items() if name.rsplit("/", 1)[1] == node_id]
        return "\n".join(vm.console_text() for vm in vms)

    def preempt(self, node_id: str) -> dict[str, Any]:
        """Preempt a node as Spot capacity is reclaimed: the VM shuts down, the node becomes PREEMPTED."""
        name = self.node_by_id(node_id)
        with self.lock:
            vm = self.vms.pop(name, None)
        rc = vm.stop(self.grace_s) if vm else None
        if vm:
            self.finished_vms.setdefault(name, []).append(vm)
        with self.lock:
            self.event("preempted", name, vm_exit=rc)
            node = self.nodes.get(name)
            if node is None:  # deleted while the VM shut down (the launcher saw the VM's exit report first)
                return {"name": name, "state": "PREEMPTED"}
            node["state"] = "PREEMPTED"
            qr = node.get("queuedResource")
            if qr and qr in self.queued:
                self.queued[qr]["state"] = {"state": "SUSPENDED", "suspendedData": {}}
                self.event("suspended", qr)
            return dict(node)

    # -- state machine ----------------------------------------------------------------------------
    def _tick_forever(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self._tick()
            except Exception as e:  # keep serving; the test sees the event
                self.event("tick-error", "", error=repr(e))

    def _tick(self) -> None:
        now = time.monotonic()
        start: list[tuple[str, str]] = []
        with self.lock:
            for name, qr in list(self.queued.items()):
                state = qr["state"]["state"]
                if state == "ACCEPTED":
                    qr["state"] = {"state": "WAITING_FOR_RESOURCES"}
                    self._timers[name] = now + self.capacity_wait_s
                elif state == "WAITING_FOR_RESOURCES" and now >= self._timers.get(name, 0):
                    qr["state"] = {"state": "PROVISIONING", "provisioningData": {}}
                    spec = qr["tpu"]["nodeSpec"][0]
                    node = dict(spec.get("node", {}))
                    node_name = f"{spec['parent']}/nodes/{spec['nodeId']}"
                    node["queuedResource"] = name
                    if "spot" in qr:
                        node.setdefault("schedulingConfig", {})["spot"] = True
                    self._add_node(node_name, node)
                elif state == "PROVISIONING":
                    node_name = self._qr_node(qr)
                    if node_name in self.nodes and self.nodes[node_name]["state"] == "READY":
                        qr["state"] = {"state": "ACTIVE", "activeData": {}}
                        self.event("active", name)
            for name, node in self.nodes.items():
                if node["state"] == "CREATING" and now >= self._timers.get(name, 0):
                    node["state"] = "READY"
                    node["health"] = "HEALTHY"
                    self.event("ready", name)
                    for op in self.operations.values():
                        if op.get("_target") == name and op["_verb"] == "create" and not op["done"]:
                            self._finish(op, response=self._public(node, op["_version"], "Node"))
                    script = node.get("metadata", {}).get("startup-script")
                    if script:
                        start.append((name, script))
        for name, script in start:
            env = {**os.environ, **self.vm_env, "TPU_WORKER_ID": "0"}
            vm = _Vm(name.rsplit("/", 1)[1], script, self.vm_root, env)
            with self.lock:
                self.vms[name] = vm
                self.event("vm-started", name, dir=vm.dir, pid=vm.proc.pid)

    def _qr_node(self, qr: dict[str, Any]) -> str:
        spec = qr["tpu"]["nodeSpec"][0]
        return f"{spec['parent']}/nodes/{spec['nodeId']}"

    def _add_node(self, name: str, node: dict[str, Any]) -> None:
        node.update(
            name=name, state="CREATING", createTime=_now(), id=str(secrets.randbelow(10**18)),
            apiVersion="V2", health="HEALTH_UNSPECIFIED",
            networkEndpoints=[{"ipAddress": "10.0.0.2", "port": 8470}],
        )
        self.nodes[name] = node
        self._timers[name] = time.monotonic() + self.provision_s
        self.event("node-created", name, acceleratorType=node.get("acceleratorType"), spot=node.get("schedulingConfig", {}).get("spot", False))

    # -- operations ----------------------------------------------------------------------------------
    def _operation(self, version: str, location: str, verb: str, target: str) -> dict[str, Any]:
        name = f"{location}/operations/operation-{int(time.time() * 1000)}-{secrets.token_hex(8)}"
        op = {"name": name, "done": False, "_version": version, "_verb": verb, "_target": target,
              "metadata": {"@type": f"type.googleapis.com/google.cloud.tpu.{version}.OperationMetadata",
                           "createTime": _now(), "target": target, "verb": verb, "apiVersion": version}}
        self.operations[name] = op
        return op

    def _finish(self, op: dict[str, Any], response: dict[str, Any] | None = None, error: ApiError | None = None) -> None:
        op["done"] = True
        op["metadata"]["endTime"] = _now()
        if error is not None:
            op["error"] = {"code": _GRPC_CODES.get(error.status, 2), "message": error.message}
        else:
            op["response"] = response if response is not None else {"@type": "type.googleapis.com/google.protobuf.Empty"}

    def _public(self, resource: dict[str, Any], version: str, kind: str) -> dict[str, Any]:
        """A stored resource as an Any-packed response: only the fields the version's message has."""
        msg = getattr(_types(version), kind).pb()()
        json_format.ParseDict(resource, msg, ignore_unknown_fields=True)
        out = json_format.MessageToDict(msg)
        return {"@type": f"type.googleapis.com/{msg.DESCRIPTOR.full_name}", **out}

    # -- requests ----------------------------------------------------------------------------------
    def handle(self, method: str, url: str, body: bytes) -> tuple[int, Any, bool]:
        """(status, JSON answer, enums as numbers?) for one request."""
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        ints = "enum-encoding=int" in query.get("$alt", "")
        self.requests.append((method, parts.path))
        if parts.path.startswith("/fake/"):
            return self._fake(method, parts.path), None, False
        m = _RESOURCE.match(parts.path)
        if not m:
            raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"the fake has no {method} {parts.path}")
        v, kind, rid = m["v"], m["kind"], m["id"]
        location = f"projects/{m['project']}/locations/{m['zone']}"
        with self.lock:
            if kind == "operations":
                if method != "GET":
                    raise ApiError(HTTPStatus.NOT_IMPLEMENTED, "UNIMPLEMENTED", f"{method} on operations")
                if rid is None:
                    ops = [self._op_json(op) for n, op in sorted(self.operations.items()) if n.startswith(location + "/")]
                    return 200, self._serialize({"operations": ops}, operations_pb2.ListOperationsResponse(), ints), False
                op = self.operations.get(f"{location}/operations/{rid}")
                if op is None:
                    raise _not_found(f"operation {rid}")
                return 200, self._serialize(self._op_json(op), operations_pb2.Operation(), ints), False
            message = "Node" if kind == "nodes" else "QueuedResource"
            store = self.nodes if kind == "nodes" else self.queued
            if rid is None and method == "GET":
                page = sorted((n, r) for n, r in store.items() if n.startswith(f"{location}/{kind}/"))
                listed = [self._public(r, v, message) for _, r in page]
                for item in listed:
                    item.pop("@type")
                response = getattr(_types(v), f"List{'Nodes' if kind == 'nodes' else 'QueuedResources'}Response")
                return 200, self._serialize({kind: listed}, response.pb()(), ints), False
            if rid is None and method == "POST":
                return 200, self._create(v, location, kind, message, query, body, ints), False
            name = f"{location}/{kind}/{rid}"
            if method == "GET":
                if name not in store:
                    raise _not_found(f"{message} {name}")
                item = self._public(store[name], v, message)
                item.pop("@type")
                return 200, self._serialize(item, getattr(_types(v), message).pb()(), ints), False
            if method == "DELETE":
                return 200, self._delete(v, location, kind, name, query, ints), False
        raise ApiError(HTTPStatus.NOT_IMPLEMENTED, "UNIMPLEMENTED", f"the fake has no {method} {parts.path}")

    def _op_json(self, op: dict[str, Any]) -> dict[str, Any]:
        return {k: val for k, val in op.items() if not k.startswith("_")}

    @staticmethod
    def _serialize(data: dict[str, Any], msg, ints: bool) -> Any:
        json_format.ParseDict(data, msg)
        return json_format.MessageToDict(msg, use_integers_for_enums=ints)

    def _parse(self, version: str, message: str, body: bytes) -> dict[str, Any]:
        msg = getattr(_types(version), message).pb()()
        try:
            json_format.Parse(body.decode("utf-8") or "{}", msg)  # unknown fields: 400, as on the real API
        except json_format.ParseError as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"Invalid JSON payload received. {e}") from None
        return json_format.MessageToDict(msg)

    def _check_node(self, node: dict[str, Any]) -> None:
        kind = ACCELERATOR.match(node.get("acceleratorType", ""))
        if not kind:
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT",
                           f"unknown accelerator type {node.get('acceleratorType')!r}")
        runtime = node.get("runtimeVersion", "")
        if runtime not in RUNTIMES[kind.group(1)]:
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT",
                           f"runtime version {runtime!r} is not supported for {node['acceleratorType']}")

    def _check_id(self, what: str, rid: str | None) -> str:
        if not rid or not _ID.match(rid):
            raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"invalid {what} {rid!r}")
        return rid

    def _create(self, v: str, location: str, kind: str, message: str, query: dict, body: bytes, ints: bool) -> Any:
        resource = self._parse(v, message, body)
        if kind == "nodes":
            name = f"{location}/nodes/{self._check_id('nodeId', query.get('nodeId'))}"
            if name in self.nodes:
                raise ApiError(HTTPStatus.CONFLICT, "ALREADY_EXISTS", f"node {name} already exists")
            self._check_node(resource)
            for field in ("state", "name", "queuedResource"):  # output only
                resource.pop(field, None)
            self._add_node(name, resource)
            op = self._operation(v, location, "create", name)
        else:
            name = f"{location}/queuedResources/{self._check_id('queuedResourceId', query.get('queuedResourceId'))}"
            if name in self.queued:
                raise ApiError(HTTPStatus.CONFLICT, "ALREADY_EXISTS", f"queued resource {name} already exists")
            specs = resource.get("tpu", {}).get("nodeSpec", [])
            if len(specs) != 1:
                raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", "the fake takes exactly one tpu.nodeSpec")
            spec = specs[0]
            if spec.get("parent") != location:
                raise ApiError(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"nodeSpec.parent must be {location}")
            node_name = f"{location}/nodes/{self._check_id('nodeSpec.nodeId', spec.get('nodeId'))}"
            if node_name in self.nodes:
                raise ApiError(HTTPStatus.CONFLICT, "ALREADY_EXISTS", f"node {node_name} already exists")
            self._check_node(spec.get("node", {}))
            resource.update(name=name, createTime=_now(), state={"state": "ACCEPTED", "acceptedData": {}})
            self.queued[name] = resource
            tier = next((t for t in ("spot", "bestEffort", "guaranteed") if t in resource), "on-demand")
            self.event("queued-resource-created", name, tier=tier, api=v, node=node_name)
            op = self._operation(v, location, "create", name)
            self._finish(op, response=self._public(resource, v, "QueuedResource"))
        return self._serialize(self._op_json(op), operations_pb2.Operation(), ints)

    def _delete(self, v: str, location: str, kind: str, name: str, query: dict, ints: bool) -> Any:
        if kind == "nodes":
            if name not in self.nodes:
                raise _not_found(f"node {name}")
            op = self._operation(v, location, "delete", name)
            self.nodes[name]["state"] = "DELETING"
            threading.Thread(target=self._delete_node, args=(name, op), daemon=True).start()
        else:
            if name not in self.queued:
                raise _not_found(f"queued resource {name}")
            node_name = self._qr_node(self.queued[name])
            force = query.get("force", "").lower() == "true"
            if node_name in self.nodes and not force:
                raise ApiError(HTTPStatus.BAD_REQUEST, "FAILED_PRECONDITION",
                               f"queued resource {name} still has node {node_name}: delete it first or pass force")
            op = self._operation(v, location, "delete", name)
            self.queued[name]["state"] = {"state": "DELETING", "deletingData": {}}
            threading.Thread(target=self._delete_queued, args=(name, node_name, op), daemon=True).start()
        return self._serialize(self._op_json(op), operations_pb2.Operation(), ints)

    def _delete_node(self, name: str, op: dict[str, Any] | None) -> None:
        with self.lock:
            vm = self.vms.pop(name, None)
        rc = vm.stop(self.grace_s) if vm else None
        with self.lock:
            if vm:
                self.finished_vms.setdefault(name, []).append(vm)
            self.nodes.pop(name, None)
            self._timers.pop(name, None)
            self.event("node-deleted", name, vm_exit=rc)
            if op is not None:
                self._finish(op)

    def _delete_queued(self, name: str, node_name: str, op: dict[str, Any]) -> None:
        if node_name in self.nodes:
            self._delete_node(node_name, None)
        with self.lock:
            gone = self.queued.pop(name, None)
            self.event("queued-resource-deleted", name)
            # v2 answers a deleted queued resource with Empty, v2alpha1 with the resource itself.
            version = op["_version"]
            self._finish(op, response=self._public(gone, version, "QueuedResource") if version == "v2alpha1" and gone else None)

    def _fake(self, method: str, path: str) -> Any:
        if method == "GET" and path == "/fake/state":
            return self.state()
        m = re.fullmatch(r"/fake/preempt/([^/]+)", path)
        if method == "POST" and m:
            return self.preempt(m.group(1))
        raise ApiError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no fake endpoint {method} {path}")

    def _grpc_server(self):
        """v2alpha1 over gRPC: each call is turned into the REST request it stands for and answered by :meth:`handle`."""
        from concurrent import futures

        import grpc
        from google.cloud.tpu_v2alpha1 import types as a

        def call(method: str, path: str, body=None, answer=None):
            def rpc(request, context):
                try:
                    data = json_format.MessageToJson(body(request)).encode() if body else b""
                    _, out, _ = self.handle(method, path(request), data)
                except ApiError as e:
                    context.abort(getattr(grpc.StatusCode, e.status, grpc.StatusCode.UNKNOWN), e.message)
                return json_format.ParseDict(out, answer())
            return rpc

        def unary(fn, request):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=request.pb().FromString,
                                                       response_serializer=lambda m: m.SerializeToString())

        op = operations_pb2.Operation
        tpu = {
            "CreateNode": unary(call("POST", lambda r: f"/v2alpha1/{r.parent}/nodes?nodeId={r.node_id}", lambda r: r.node, op),
                                a.CreateNodeRequest),
            "GetNode": unary(call("GET", lambda r: f"/v2alpha1/{r.name}", None, a.Node.pb()), a.GetNodeRequest),
            "ListNodes": unary(call("GET", lambda r: f"/v2alpha1/{r.parent}/nodes", None, a.ListNodesResponse.pb()),
                               a.ListNodesRequest),
            "DeleteNode": unary(call("DELETE", lambda r: f"/v2alpha1/{r.name}", None, op), a.DeleteNodeRequest),
            "CreateQueuedResource": unary(call(
                "POST", lambda r: f"/v2alpha1/{r.parent}/queuedResources?queuedResourceId={r.queued_resource_id}",
                lambda r: r.queued_resource, op), a.CreateQueuedResourceRequest),
            "GetQueuedResource": unary(call("GET", lambda r: f"/v2alpha1/{r.name}", None, a.QueuedResource.pb()),
                                       a.GetQueuedResourceRequest),
            "ListQueuedResources": unary(call("GET", lambda r: f"/v2alpha1/{r.parent}/queuedResources", None,
                                              a.ListQueuedResourcesResponse.pb()), a.ListQueuedResourcesRequest),
            "DeleteQueuedResource": unary(call(
                "DELETE", lambda r: f"/v2alpha1/{r.name}" + ("?force=true" if r.force else ""), None, op),
                a.DeleteQueuedResourceRequest),
        }
        get_op = grpc.unary_unary_rpc_method_handler(
            call("GET", lambda r: f"/v2alpha1/{r.name}", None, op),
            request_deserializer=operations_pb2.GetOperationRequest.FromString,
            response_serializer=lambda m: m.SerializeToString())
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("google.cloud.tpu.v2alpha1.Tpu", tpu),
            grpc.method_handlers_generic_handler("google.longrunning.Operations", {"GetOperation": get_op}),
        ))
        port = server.add_insecure_port("127.0.0.1:0")
        return server, port

    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                try:
                    status, data, _ = api.handle(method, self.path, body)
                except ApiError as e:
                    status, data = int(e.code), e.body()
                except Exception as e:  # a bug in the fake: say so, as a 500
                    status, data = 500, ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, "INTERNAL", repr(e)).body()
                out = json.dumps(data).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

            def do_DELETE(self):
                self._answer("DELETE")

            def do_PATCH(self):
                self._answer("PATCH")

            def log_message(self, *args) -> None:  # quiet
                pass

        return Handler


# google.rpc.Code numbers of the statuses the fake uses, for an operation's error.
_GRPC_CODES = {"INVALID_ARGUMENT": 3, "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "FAILED_PRECONDITION": 9,
               "RESOURCE_EXHAUSTED": 8, "INTERNAL": 13, "UNIMPLEMENTED": 12}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.fake_tpu_api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8470)
    parser.add_argument("--vm-root", help="where the VMs' folders go (default: a temporary folder)")
    args = parser.parse_args(argv)
    with FakeTpuApi(vm_root=args.vm_root, port=args.port) as api:
        print(f"fake Cloud TPU API on {api.endpoint} (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
