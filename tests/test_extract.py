"""The extract stage with real worker processes: hangs and crashes cost one item, never the run."""

import ctypes
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import pyarrow as pa

from corpus.extract import ExtractSettings, extract_partition
from corpus.pool import robust_map
from corpus.schema import DROPPED, EXTRACTED, RAW_PAGE
from corpus.storage import Storage

JAGPT = os.path.join(os.path.dirname(sys.executable), "jagpt")

STORY = (
    "みどり町の朝は、川霧がゆっくりと晴れていくところから始まります。"
    "商店街のパン屋さんは五時に火を入れ、焼きたての香りが通りに広がります。"
    "子どもたちは橋を渡って学校へ向かい、おじいさんたちは縁側でお茶を飲みながら天気の話をしています。"
    "昼になると役場の前の広場に人が集まり、季節の野菜を売る小さな市が開かれます。"
)


# Run in spawned workers, so they must live at module level (importable by name).
def misbehave(x: int) -> int:
    if x == 3:
        time.sleep(60)  # hangs
    if x == 7:
        os._exit(3)  # the process dies
    if x == 11:
        ctypes.string_at(0)  # segfault
    if x == 13:
        raise ValueError("thirteen")
    return x * 10


def test_robust_map_survives_hangs_and_crashes_and_keeps_order():
    start = time.monotonic()
    got = list(robust_map(misbehave, range(20), workers=2, timeout_s=1.0, chunksize=4))
    assert time.monotonic() - start < 15
    assert got[3] == ("timeout", 1.0)
    assert got[7] == ("crash", 3)
    assert got[11][0] == "crash" and got[11][1] != 0
    assert got[13] == ("error", "ValueError: thirteen")
    assert [g for i, g in enumerate(got) if i not in (3, 7, 11, 13)] == [
        ("ok", i * 10) for i in range(20) if i not in (3, 7, 11, 13)
    ]
    # A chunk bigger than the input and one worker: same answers.
    assert list(robust_map(misbehave, [1, 7, 2], workers=1, timeout_s=1.0, chunksize=64)) == [
        ("ok", 10), ("crash", 3), ("ok", 20)
    ]


def raw_row(url: str, body: bytes, encoding: str = "utf-8") -> dict:
    return {
        "url": url, "final_url": url, "source": "s", "genre": "blog", "run_id": "r1",
        "fetched_at": datetime(2026, 1, 1, tzinfo=timezone.utc), "http_status": 200,
        "content_type": "text/html", "encoding": encoding, "encoding_source": "header", "depth": 0,
        "content_sha1": "0" * 40, "body": body,
    }


def page(title: str, text: str, lang: str = "ja") -> bytes:
    return (
        f"<html lang='{lang}'><head><title>{title}</title></head><body><nav>トップ | ブログ</nav>"
        f"<article><p>{text}</p></article></body></html>"
    ).encode("utf-8")


def write_raw(storage: Storage, partition: str = "raw/source=s/run=r1") -> str:
    rows = [
        raw_row("http://a.example/1", page("町の朝", STORY)),
        raw_row("http://a.example/garbage", bytes(range(256)) * 8),
        raw_row("http://a.example/menu", b"<html><body><nav><a href='/'>top</a></nav></body></html>"),
        raw_row("http://a.example/2", page("町の昼", STORY * 2, "ja-JP").decode().encode("cp932"), "cp932"),
    ]
    storage.write_parquet(f"{partition}/part-00000.parquet", pa.Table.from_pylist(rows, schema=RAW_PAGE))
    storage.publish(partition, {"source": "s", "run_id": "r1", "files": ["part-00000.parquet"]})  # as a crawl does
    return partition


def test_extract_partition_in_worker_processes(tmp_path):
    storage = Storage(str(tmp_path))
    part = write_raw(storage)
    settings = ExtractSettings(workers=2, pool_min_pages=1)
    stats = extract_partition(storage, [f"{part}/part-00000.parquet"], settings, "out")
    kept = storage.read_parquet(["out/extracted.parquet"])
    dropped = {d["url"]: d for d in storage.read_parquet(["out/dropped.parquet"]).to_pylist()}
    assert kept.schema.equals(EXTRACTED)
    assert storage.read_parquet(["out/dropped.parquet"]).schema.equals(DROPPED)
    by_url = {k["url"]: k for k in kept.to_pylist()}
    assert list(by_url) == ["http://a.example/1", "http://a.example/2"]  # input order
    assert by_url["http://a.example/1"]["title"] == "町の朝" and by_url["http://a.example/1"]["lang"] == "ja"
    assert "川霧" in by_url["http://a.example/1"]["text"] and "トップ" not in by_url["http://a.example/1"]["text"]
    assert by_url["http://a.example/2"]["lang"] == "ja-jp" and "パン屋" in by_url["http://a.example/2"]["text"]
    assert dropped["http://a.example/garbage"]["reasons"] == ["decode_error"]
    assert dropped["http://a.example/garbage"]["stage"] == "extract"
    assert dropped["http://a.example/menu"]["reasons"] == ["no_text"]
    assert stats == {"pages": 4, "extracted": 2, "dropped": {"decode_error": 1, "no_text": 1}}


def test_extract_partition_streams_in_batches_with_the_same_result(tmp_path):
    storage = Storage(str(tmp_path))
    part = write_raw(storage)
    files = [f"{part}/part-00000.parquet"]
    whole = extract_partition(storage, files, ExtractSettings(workers=1), "whole")
    batched = extract_partition(storage, files, ExtractSettings(workers=1, batch_pages=1), "batched")
    assert whole == batched
    for name in ("extracted", "dropped"):
        assert storage.read_parquet([f"whole/{name}.parquet"]).equals(storage.read_parquet([f"batched/{name}.parquet"]))


def write_config(tmp_path, root) -> str:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"storage:\n  root: {root}\n"
        "sources:\n  - name: s\n    genre: blog\n    start_urls: ['http://a.example/']\n"
    )
    return str(cfg)


def test_reextract_cli_redoes_every_partition(tmp_path):
    root = tmp_path / "data"
    storage = Storage(str(root))
    part = write_raw(storage)
    cfg = write_config(tmp_path, root)
    runs = [subprocess.run([JAGPT, "reextract", "--config", cfg], capture_output=True, text=True, timeout=120) for _ in range(2)]
    for done in runs:
        assert done.returncode == 0, done.stderr
        assert f"{part} -> extract/" in done.stdout
        assert "4 pages, 2 extracted, dropped: decode_error 1, no_text 1" in done.stdout
    assert "recomputing" in runs[1].stderr and "reusing" not in runs[1].stderr  # forced, not cached
    (key,) = storage.listdir("extract")
    assert storage.marker(f"extract/{key}")["stats"]["extracted"] == 2


def test_reextract_cli_without_raw_pages_says_so(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "empty")
    done = subprocess.run([JAGPT, "reextract", "--config", cfg], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "no raw partitions" in done.stderr and "Traceback" not in done.stderr
