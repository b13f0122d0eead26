import json

import pyarrow as pa
import pytest

from corpus.steps import run_step
from corpus.storage import Storage


@pytest.fixture(params=["local", "gcs"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    root, options = request.getfixturevalue("gcs_root")
    return Storage(root, options)


def test_roundtrip_bytes_json_parquet(storage):
    storage.write_bytes("a/b.bin", b"\x00\x01")
    storage.write_json("a/c.json", {"k": "値"})
    storage.write_parquet("p/t.parquet", pa.table({"x": [1, 2, 3]}))
    assert storage.read_bytes("a/b.bin") == b"\x00\x01"
    assert storage.read_json("a/c.json") == {"k": "値"}
    assert storage.read_parquet(["p/t.parquet"])["x"].to_pylist() == [1, 2, 3]
    assert storage.listdir("a") == ["b.bin", "c.json"]
    assert storage.glob("a/*.json") == ["a/c.json"]
    assert storage.listdir("missing") == []


def test_failed_write_leaves_nothing(storage):
    with pytest.raises(RuntimeError):
        with storage.open_atomic("x/half.bin") as f:
            f.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert not storage.exists("x/half.bin")
    assert storage.listdir("x") == []


def test_create_never_replaces_an_existing_file(tmp_path):
    # Local only: on gs:// this is GCS's ifGenerationMatch=0 precondition, which
    # gcp-storage-emulator does not implement (it overwrites).
    storage = Storage(str(tmp_path))
    assert storage.create("records/a.json", b"first") is True
    assert storage.create("records/a.json", b"second") is False
    assert storage.read_bytes("records/a.json") == b"first"
    assert [p for p in storage.listdir("records") if "tmp" in p] == []


def test_put_and_get_dir(storage, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("中身")
    storage.put_dir(str(src), "up")
    storage.get_dir("up", str(tmp_path / "back"))
    assert (tmp_path / "back" / "sub" / "f.txt").read_text() == "中身"


def test_step_runs_once_and_reruns_on_changed_settings(storage):
    calls = []

    def work(out):
        calls.append(out)
        storage.write_text(f"{out}/result.txt", "done")
        return {"rows": 3}

    first = run_step(storage, "demo", 1, {"in": "a"}, {"n": 1}, work)
    again = run_step(storage, "demo", 1, {"in": "a"}, {"n": 1}, work)
    changed = run_step(storage, "demo", 1, {"in": "a"}, {"n": 2}, work)
    assert (first.cached, again.cached, changed.cached) == (False, True, False)
    assert again.stats == {"rows": 3} and again.path == first.path != changed.path
    assert len(calls) == 2
    assert json.loads(storage.read_text(f"{first.path}/_SUCCESS.json"))["stats"] == {"rows": 3}


def test_crashed_step_is_redone(storage):
    def crash(out):
        storage.write_text(f"{out}/partial.txt", "half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_step(storage, "demo", 1, {}, {}, crash)
    result = run_step(storage, "demo", 1, {}, {}, lambda out: {"ok": True})
    assert not result.cached
    assert storage.listdir(result.path) == ["_SUCCESS.json"]  # the crashed attempt's leftovers are gone
