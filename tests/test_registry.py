import pytest

from corpus.storage import Storage
from model import registry


def test_records_are_immutable_and_newest_wins(tmp_path):
    storage = Storage(str(tmp_path))
    with pytest.raises(LookupError, match="jagpt pipeline"):
        registry.newest(storage)
    first, created = registry.register(storage, {"run_id": "run-a", "step": 100, "val_loss": 5.0, "tokens_seen": 1})
    again, created_again = registry.register(storage, {"run_id": "run-a", "step": 100, "val_loss": 1.0, "tokens_seen": 1})
    assert created and not created_again and again == first  # a second registration changes nothing
    registry.register(storage, {"run_id": "run-b", "step": 7, "val_loss": 4.0, "tokens_seen": 1})
    assert [r["run_id"] for r in registry.records(storage)] == ["run-a", "run-b"]
    assert registry.newest(storage)["run_id"] == "run-b"
    assert registry.find(storage, "run-a-100")["val_loss"] == 5.0
    assert registry.find(storage, "run-a")["step"] == 100
    with pytest.raises(LookupError, match="jagpt checkpoints"):
        registry.find(storage, "run-zzz")


# --- concurrent writers, ordering, best, the CLI, the Prefect artifact ------------------------------------------

import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import yaml  # noqa: E402


def _record(run_id: str, step: int, bpc: float | None = None, val_loss: float = 3.0) -> dict:
    return {"run_id": run_id, "parent": None, "step": step, "tokens_seen": step * 10, "val_loss": val_loss,
            "bits_per_char": bpc, "preset": "tiny", "tokenizer_id": "tok-x", "shards": "shards/x",
            "path": f"runs/{run_id}/checkpoints/{step}"}


def _register_many(root: str, options: dict, worker: int, count: int, start) -> list[tuple[str, bool]]:
    """Register ``count`` checkpoints of this worker's run plus the one checkpoint every worker registers."""
    storage = Storage(root, options)
    start.wait()
    done = [registry.register(storage, _record(f"run-w{worker:02d}", step, bpc=1.0 + worker / 100 + step / 1000))
            for step in range(1, count + 1)]
    shared, created = registry.register(storage, _record("run-shared", 1, bpc=9.0, val_loss=float(worker)))
    return [(f"{r['run_id']}-{r['step']}", c) for r, c in done] + [(shared["registered_at"], created)]


def _process_worker(args) -> list[tuple[str, bool]]:
    root, options, worker, count, start = args
    return _register_many(root, options, worker, count, start)


def _check_concurrent_registrations(storage: Storage, results: list[list[tuple[str, bool]]], workers: int, count: int,
                                    exclusive_same_record: bool) -> None:
    names = sorted(storage.listdir(registry.REGISTRY))
    expected = sorted([f"run-w{w:02d}-{s}.json" for w in range(workers) for s in range(1, count + 1)] + ["run-shared-1.json"])
    assert names == expected  # nothing lost, nothing half-written or left over (no .tmp files)
    for name in names:  # every file is whole JSON
        assert json.loads(storage.read_text(f"{registry.REGISTRY}/{name}"))["run_id"] in name
    for w, result in enumerate(results):
        assert [n for n, _ in result[:-1]] == [f"run-w{w:02d}-{s}" for s in range(1, count + 1)]
        assert all(created for _, created in result[:-1])
    records = registry.records(storage)
    assert len(records) == workers * count + 1
    times = [r["registered_at"] for r in records]
    assert times == sorted(times) and len(set(times)) == len(times)  # microsecond times, strictly increasing per process
    if exclusive_same_record:
        # Exactly one writer created the shared record; every writer got that same record back.
        assert sum(result[-1][1] for result in results) == 1
        stored = registry.find(storage, "run-shared-1")
        assert {result[-1][0] for result in results} == {stored["registered_at"]}


def test_threads_register_at_once_locally(tmp_path):
    storage = Storage(str(tmp_path))
    workers, count = 12, 4
    start = threading.Barrier(workers)
    results: list = [None] * workers

    def run(w: int) -> None:
        results[w] = _register_many(str(tmp_path), {}, w, count, start)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check_concurrent_registrations(storage, results, workers, count, exclusive_same_record=True)


def test_processes_register_at_once_locally(tmp_path):
    workers, count = 4, 5
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(workers)
        with ctx.Pool(workers) as pool:
            results = pool.map(_process_worker, [(str(tmp_path), {}, w, count, start) for w in range(workers)])
    _check_concurrent_registrations(Storage(str(tmp_path)), results, workers, count, exclusive_same_record=True)


def test_threads_and_processes_register_at_once_on_gcs(gcs_root):
    root, options = gcs_root
    workers, count = 6, 3
    start = threading.Barrier(workers)
    results: list = [None] * (workers + 3)

    def run(w: int) -> None:
        results[w] = _register_many(root, options, w, count, start)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        pstart = manager.Barrier(3)
        with ctx.Pool(3) as pool:
            results[workers:] = pool.map(_process_worker, [(root, options, w, count, pstart) for w in range(workers, workers + 3)])
    for t in threads:
        t.join()
    # The emulator ignores the ifGenerationMatch=0 precondition that makes the first writer of one record win
    # on real GCS, so only distinct records are checked here (the same record from many writers: locally).
    _check_concurrent_registrations(Storage(root, options), results, workers + 3, count, exclusive_same_record=False)


def test_newest_follows_registration_order_within_a_second(tmp_path):
    storage = Storage(str(tmp_path))
    # Run ids in reverse order: with second-resolution times the run-id tiebreak would pick run-a as newest.
    ids = ["run-e", "run-d", "run-c", "run-b", "run-a"]
    start = time.monotonic()
    for run_id in ids:
        registry.register(storage, _record(run_id, 1))
    assert time.monotonic() - start < 1.0
    assert [r["run_id"] for r in registry.records(storage)] == ids
    assert registry.newest(storage)["run_id"] == "run-a"
    assert all(len(r["registered_at"]) == len("2025-01-02T03:04:05.678901Z") for r in registry.records(storage))
    # A record of the older format (whole seconds) sorts by its time among the new ones.
    first = registry.records(storage)[0]["registered_at"]
    old = {**_record("run-old", 1), "registered_at": first[:19] + "Z", "git_commit": ""}
    storage.write_json(f"{registry.REGISTRY}/run-old-1.json", old)
    assert [r["run_id"] for r in registry.records(storage)][0] == "run-old"
    assert registry.newest(storage)["run_id"] == "run-a"


def test_best_is_the_lowest_bits_per_char_and_skips_records_without_it(tmp_path):
    storage = Storage(str(tmp_path))
    assert registry.best(storage) == (None, 0)
    registry.register(storage, _record("run-a", 10, bpc=2.5))
    registry.register(storage, _record("run-b", 10, bpc=1.75))
    legacy = {k: v for k, v in _record("run-c", 10).items() if k != "bits_per_char"}  # before the field existed
    registry.register(storage, legacy)
    registry.register(storage, _record("run-d", 10, bpc=None))
    registry.register(storage, _record("run-e", 10, bpc=1.75))
    best, without = registry.best(storage)
    assert best["run_id"] == "run-b" and without == 2  # a tie goes to the earlier registration


def test_bits_per_char_from_nats_per_token():
    assert registry.bits_per_char(2 * 0.6931471805599453, 100, 200) == 1.0  # 2 bits per token, 2 chars per token
    assert registry.bits_per_char(None, 100, 200) is None and registry.bits_per_char(1.0, 100, 0) is None


def _config(tmp_path) -> str:
    from flows.config import default_config_text

    cfg = yaml.safe_load(default_config_text())
    cfg["storage"] = {"root": str(tmp_path / "data")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return str(path)


def test_cli_checkpoints_list_show_best(tmp_path, capsys):
    from flows.cli import main

    config = _config(tmp_path)
    storage = Storage(str(tmp_path / "data"))
    assert main(["checkpoints", "--config", config]) == 0
    assert "no registered checkpoints" in capsys.readouterr().out
    registry.register(storage, _record("run-a", 100, bpc=2.0, val_loss=4.0))
    registry.register(storage, _record("run-b", 50, bpc=1.5, val_loss=3.5))
    registry.register(storage, {k: v for k, v in _record("run-c", 7).items() if k != "bits_per_char"})

    for argv in (["checkpoints"], ["checkpoints", "list"]):  # no verb = list
        assert main([*argv, "--config", config]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["checkpoint", "step", "val_loss", "bits/char", "tokens_seen", "preset", "registered_at"]
        assert [line.split()[0] for line in lines[2:]] == ["run-a-100", "run-b-50", "run-c-7"]
        assert lines[2].split()[3] == "2.0000" and lines[4].split()[3] == "-"

    assert main(["checkpoints", "show", "run-a", "--config", config]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 100
    assert main(["checkpoints", "show", "--config", config]) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == "run-c"  # the newest
    assert main(["checkpoints", "best", "--config", config]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["run_id"] == "run-b" and "1 checkpoint(s) without bits_per_char left out" in out.err
    assert main(["checkpoints", "show", "run-zzz", "--config", config]) == 1
    assert main(["checkpoints", "best", "run-a", "--config", config]) == 2


def test_registration_is_a_prefect_artifact_inside_a_flow_only(tmp_path, prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    storage = Storage(str(tmp_path))
    assert registry.prefect_artifact(storage, _record("run-outside", 1)) is False
    registry.register(storage, _record("run-outside", 1))

    @flow
    def register_in_a_flow() -> bool:
        return registry.register(storage, _record("run-inside", 3, bpc=1.25))[1]

    assert register_in_a_flow() is True
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["registered-checkpoint"])))
    tables = [json.loads(a.data) if isinstance(a.data, str) else a.data for a in artifacts]
    ours = [{row["field"]: row["value"] for row in t} for t in tables]
    assert [t["run_id"] for t in ours if t["run_id"].startswith("run-")].count("run-inside") == 1
    assert not any(t["run_id"] == "run-outside" for t in ours)
    inside = next(t for t in ours if t["run_id"] == "run-inside")
    assert inside["bits_per_char"] == 1.25 and inside["record"] == os.path.join(str(tmp_path), "registry/checkpoints/run-inside-3.json")
