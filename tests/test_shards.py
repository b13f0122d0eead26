"""Shards: read back equal to the encoding, shuffled deterministically, incremental, random access, checked."""

import os
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from corpus.mixture import MixtureSettings
from corpus.schema import DOC
from corpus.steps import StepResult
from corpus.storage import Storage
from encoder.bpe import EncoderSettings, train
from encoder.shards import ShardReader, ShardSettings, build_shards, is_val, load_split
from flows import stages
from flows.config import load_config
from tests.test_mixture import NEWS, NOVEL, doc_row

SETTINGS = ShardSettings(shard_tokens=500, val_fraction=0.15, batch_docs=7, workers=1)


@pytest.fixture(scope="module")
def encoder():
    return train(NOVEL + NEWS, EncoderSettings(vocab_size=500), "tok-shards")


def write_links(storage: Storage, texts: list[list[str]]) -> list[str]:
    files = []
    for n, link in enumerate(texts):
        rows = [doc_row(t, "a" if n % 2 == 0 else "b", "novel" if n % 2 == 0 else "news", i) for i, t in enumerate(link)]
        storage.write_parquet(f"corpus/link-{n}/docs.parquet", pa.Table.from_pylist(rows, schema=DOC))
        files.append(f"corpus/link-{n}/docs.parquet")
    return files


def documents(tokens: np.ndarray, eot: int) -> list[tuple[int, ...]]:
    """The documents of a token stream (each ends in ``eot``), as tuples without it."""
    cuts = np.flatnonzero(tokens == eot)
    assert len(cuts) and cuts[-1] == len(tokens) - 1, "the stream ends with <|endoftext|>"
    return [tuple(d) for d in np.split(tokens, cuts + 1)[:-1] for d in [d[:-1]]]


def test_shards_read_back_equal_the_encoding_of_the_documents(tmp_path, encoder):
    storage = Storage(str(tmp_path))
    files = write_links(storage, [NOVEL, NEWS])
    manifest = build_shards(storage, files, encoder, SETTINGS, "sh", "corpus/x")
    assert manifest["tokenizer_id"] == "tok-shards" and manifest["dtype"] == "uint16"
    expected = {"train": Counter(), "val": Counter()}
    chars = {"train": 0, "val": 0}
    for t in NOVEL + NEWS:
        split = "val" if is_val(doc_row(t, "a", "x")["doc_id"], SETTINGS.val_fraction) else "train"
        expected[split][tuple(encoder.encode(t))] += 1
        chars[split] += len(t)
    for split in ("train", "val"):
        tokens = load_split(storage, "sh", split)
        info = manifest["splits"][split]
        assert len(tokens) == info["tokens"] == sum(s["tokens"] for s in info["shards"])
        assert Counter(documents(tokens, encoder.eot_id)) == expected[split]
        assert info["documents"] == sum(expected[split].values()) and info["chars"] == chars[split]
        # Fixed-size shards: only the last shard of each part is shorter.
        for part in manifest["parts"]:
            sizes = [s["tokens"] for s in info["shards"] if s["path"].startswith(part + "/")]
            assert all(n == SETTINGS.shard_tokens for n in sizes[:-1])


def test_the_shuffle_is_fixed_by_the_seed_not_by_workers_or_batches(tmp_path, encoder):
    storage = Storage(str(tmp_path))
    files = write_links(storage, [NOVEL + NEWS])
    mixture = MixtureSettings(genres={"novel": 2})
    one = build_shards(storage, files, encoder, SETTINGS, "one", "c", mixture)
    two = build_shards(storage, files, encoder, SETTINGS.model_copy(update={"workers": 2, "batch_docs": 50}), "two", "c", mixture)
    build_shards(storage, files, encoder, SETTINGS.model_copy(update={"shuffle_seed": 1}), "other", "c", mixture)
    for split in ("train", "val"):
        assert [s["sha256"] for s in one["splits"][split]["shards"]] == [s["sha256"] for s in two["splits"][split]["shards"]]
    a, b = load_split(storage, "one", "train"), load_split(storage, "other", "train")
    assert not np.array_equal(a, b)
    assert Counter(documents(a, encoder.eot_id)) == Counter(documents(b, encoder.eot_id))
    # Shuffled: val documents are not in their input order.
    val_in_input_order = [tuple(encoder.encode(t)) for t in NOVEL + NEWS if is_val(doc_row(t, "a", "x")["doc_id"], SETTINGS.val_fraction)]
    val = documents(load_split(storage, "one", "val"), encoder.eot_id)
    assert len(val) > 3 and sorted(val) == sorted(val_in_input_order) and val != val_in_input_order
    # Copies of a weighted document are spread out, not adjacent.
    docs = documents(a, encoder.eot_id)
    assert sum(x == y for x, y in zip(docs, docs[1:])) < len(docs) // 10


def test_random_access_by_global_token_offset(tmp_path, encoder):
    storage = Storage(str(tmp_path))
    build_shards(storage, write_links(storage, [NOVEL, NEWS]), encoder, SETTINGS, "sh", "c")
    reader = ShardReader(storage, "sh", "train")
    everything = reader.read_all()
    rng = np.random.default_rng(0)
    for _ in range(200):
        length = int(rng.integers(0, 1200))  # often across one or two shard boundaries
        offset = int(rng.integers(0, reader.num_tokens - length + 1))
        assert np.array_equal(reader.read(offset, length), everything[offset:offset + length])
    with pytest.raises(IndexError):
        reader.read(reader.num_tokens - 5, 6)


def test_a_corrupted_or_truncated_shard_is_detected(tmp_path, encoder):
    storage = Storage(str(tmp_path))
    manifest = build_shards(storage, write_links(storage, [NOVEL]), encoder, SETTINGS, "sh", "c")
    shard = "sh/" + manifest["splits"]["train"]["shards"][1]["path"]
    good = storage.read_bytes(shard)
    storage.write_bytes(shard, bytes(len(good)))
    ShardReader(storage, "sh", "train")  # opening does not read the shards...
    with pytest.raises(ValueError, match="sha256"):
        ShardReader(storage, "sh", "train", verify=True)  # ...verifying does
    with pytest.raises(ValueError, match="sha256"):
        load_split(storage, "sh", "train")
    storage.write_bytes(shard, good[:-2])
    with pytest.raises(ValueError, match="manifest says"):
        ShardReader(storage, "sh", "train").read_all()


def test_gcs_shards_are_written_and_read_by_range(gcs_root, encoder):
    root, options = gcs_root
    storage = Storage(root, options)
    manifest = build_shards(storage, write_links(storage, [NOVEL, NEWS]), encoder, SETTINGS, "sh", "c")
    reader = ShardReader(storage, "sh", "train", verify=True)
    assert reader.num_tokens == manifest["splits"]["train"]["tokens"]
    everything = reader.read_all()
    for offset, length in [(0, 10), (SETTINGS.shard_tokens - 3, 7), (reader.num_tokens - 20, 20)]:
        assert np.array_equal(reader.read(offset, length), everything[offset:offset + length])


def test_a_failed_shard_write_is_retried(tmp_path, encoder, caplog):
    storage = Storage(str(tmp_path))
    files = write_links(storage, [NOVEL])
    # A file where the train folder must go: writes fail until it is removed.
    os.makedirs(tmp_path / "sh" / "part-00000")
    blocker = tmp_path / "sh" / "part-00000" / "train"
    blocker.write_text("in the way")
    threading.Timer(0.3, blocker.unlink).start()
    manifest = build_shards(storage, files, encoder, SETTINGS.model_copy(update={"write_retries": 5}), "sh", "c")
    assert "retrying" in caplog.text
    assert len(load_split(storage, "sh", "train")) == manifest["splits"]["train"]["tokens"]


def test_bpe_dropout_changes_the_train_split_only(tmp_path, encoder):
    storage = Storage(str(tmp_path))
    files = write_links(storage, [NOVEL])
    plain = build_shards(storage, files, encoder, SETTINGS, "plain", "c")
    dropped = build_shards(storage, files, encoder, SETTINGS.model_copy(update={"dropout": 0.3}), "dropout", "c")
    assert dropped["splits"]["train"]["tokens"] > plain["splits"]["train"]["tokens"]  # smaller pieces
    assert [s["sha256"] for s in dropped["splits"]["val"]["shards"]] == [s["sha256"] for s in plain["splits"]["val"]["shards"]]
    texts = sorted(encoder.decode(d) for d in documents(load_split(storage, "dropout", "train"), encoder.eot_id))
    assert texts == sorted(encoder.decode(d) for d in documents(load_split(storage, "plain", "train"), encoder.eot_id))
    again = build_shards(storage, files, encoder, SETTINGS.model_copy(update={"dropout": 0.3, "workers": 2}), "again", "c")
    assert [s["sha256"] for s in again["splits"]["train"]["shards"]] == [s["sha256"] for s in dropped["splits"]["train"]["shards"]]


def test_a_grown_corpus_encodes_only_its_new_links(tmp_path, encoder, caplog):
    storage = Storage(str(tmp_path))
    storage.write_text("tokenizers/tok-shards/tokenizer.json", encoder.to_json())
    tokenizer = StepResult("tokenizers", "tok-shards", "tokenizers/tok-shards")
    files = write_links(storage, [NOVEL[:30], NEWS, NOVEL[30:]])
    links = [StepResult("corpus/dedup", f"link-{i}", os.path.dirname(f)) for i, f in enumerate(files)]
    cfg = load_config().model_copy(update={"shards": SETTINGS})
    first = stages.shards_step(storage, cfg, tokenizer, links[:2])
    part_files = {p: storage.read_bytes(p) for p in storage.glob("shards/part-*/*/*.bin")}
    caplog.set_level("INFO")
    grown = stages.shards_step(storage, cfg, tokenizer, links)
    assert "1 of 3 parts encoded now, 2 reused" in caplog.text
    assert all(storage.read_bytes(p) == data for p, data in part_files.items())  # old shards untouched
    old = storage.read_json(f"{first.path}/manifest.json")["splits"]["train"]
    new = storage.read_json(f"{grown.path}/manifest.json")["splits"]["train"]
    assert new["shards"][: len(old["shards"])] == old["shards"] and new["tokens"] > old["tokens"]
    assert stages.shards_step(storage, cfg, tokenizer, links).cached


SHARD_SCRIPT = """
import sys
from corpus.storage import Storage
from encoder.bpe import Encoder
from encoder.shards import ShardSettings, build_shards
root, tokenizer = sys.argv[1], sys.argv[2]
encoder = Encoder.from_json(open(tokenizer, encoding="utf-8").read(), "tok-test")
build_shards(Storage(root), ["c1/docs.parquet"], encoder, ShardSettings(shard_tokens=64, batch_docs=64, workers=1), "sh", "c")
"""


def test_a_crash_while_sharding_leaves_no_manifest(tmp_path, encoder):
    storage = Storage(str(tmp_path))
    rows = [doc_row(NOVEL[i % len(NOVEL)] + str(i), "a", "novel", i) for i in range(20000)]
    storage.write_parquet("c1/docs.parquet", pa.Table.from_pylist(rows, schema=DOC))
    (tmp_path / "tok.json").write_text(encoder.to_json(), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-c", SHARD_SCRIPT, str(tmp_path), str(tmp_path / "tok.json")],
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(storage.glob("sh/part-*/train/*.bin")) < 3:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert len(storage.glob("sh/part-*/train/*.bin")) >= 3  # killed with shards written...
    assert not storage.glob("sh/part-*/part.json") and not storage.exists("sh/manifest.json")  # ...and nothing points at them


def test_a_pinned_tokenizer_is_used_instead_of_training_one(tmp_path, encoder):
    storage = Storage(str(tmp_path))
    files = write_links(storage, [NOVEL, NEWS])
    links = [StepResult("corpus/dedup", f"link-{i}", os.path.dirname(f)) for i, f in enumerate(files)]
    cfg = load_config()
    trained = stages.encoder_step(storage, cfg, links[:1])
    assert not trained.cached and trained.key.startswith("tok-")
    pinned = cfg.model_copy(update={"encoder": cfg.encoder.model_copy(update={"tokenizer": trained.key})})
    again = stages.encoder_step(storage, pinned, links)  # the grown corpus: no new tokenizer
    assert again.key == trained.key and again.cached and storage.glob("tokenizers/tok-*/tokenizer.json") == [f"{trained.path}/tokenizer.json"]
    missing = cfg.model_copy(update={"encoder": cfg.encoder.model_copy(update={"tokenizer": "tok-0123"})})
    with pytest.raises(ValueError, match="no finished tokenizer"):
        stages.encoder_step(storage, missing, links)
