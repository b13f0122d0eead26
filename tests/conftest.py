import os

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Stages called outside a flow in a test process where an earlier test ran a flow log
# through Prefect's handler too; outside a flow run there is nothing for it to send.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

BUCKET = "jagpt-test"


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its children; SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_endpoint():
    """A real gcp-storage-emulator on 127.0.0.1, with one bucket."""
    port = free_port()
    exe = shutil.which("gcp-storage-emulator", path=os.path.dirname(sys.executable))
    assert exe, "gcp-storage-emulator is not installed (pip install -e '.[dev]')"
    proc = subprocess.Popen(
        [exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", BUCKET, "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("gcp-storage-emulator did not start")
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def gcs_root(gcs_endpoint):
    """A fresh gs:// storage root (root URL, fsspec options) on the emulator."""
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:10]}", {"endpoint_url": gcs_endpoint, "token": "anon"}


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_sessionfinish(session, exitstatus):
    # Arrow objects left to the interpreter's final teardown can abort the
    # process at exit (apache/arrow#34314); collect them while Arrow is alive.
    import gc

    gc.collect()
