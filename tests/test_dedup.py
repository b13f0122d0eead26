"""Exact and near-duplicate removal as a chain of partitions: accuracy, keeper, increments, reruns.

Real data, no mocks: planted pairs of random Japanese characters at measured
Jaccard levels, and raw partitions of pages built from the sample site's prose
run through the real extract, clean and dedup stages.
"""

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import hypothesis
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, strategies as st

from corpus.dedup import (
    BANDS,
    EXACT,
    DedupSettings,
    band_hashes,
    dedup_partition,
    detection_probability,
    estimated_jaccard,
    minhash,
    signatures_schema,
)
from corpus.schema import DOC, DROPPED, RAW_PAGE
from corpus.storage import Storage
from flows import stages
from flows.config import Config

JAGPT = os.path.join(os.path.dirname(sys.executable), "jagpt")
T0 = datetime(2026, 1, 5, tzinfo=timezone.utc)
ALPHABET = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x4E00, 0x4E00 + 2500)]


# -- the detection curve -------------------------------------------------------


def test_detection_curve_meets_the_targets():
    s = DedupSettings()
    assert (s.bands, s.rows) == (18, 9)
    assert detection_probability(0.8, s.bands, s.rows) >= 0.9
    assert detection_probability(0.5, s.bands, s.rows) <= 0.05
    # The table in docs/architecture.md.
    table = {j: round(detection_probability(j, 18, 9), 4) for j in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)}
    assert table == {0.3: 0.0004, 0.4: 0.0047, 0.5: 0.0346, 0.6: 0.1667, 0.7: 0.5236, 0.8: 0.9253, 0.9: 0.9999}


def test_minhash_is_deterministic_and_bounded_for_huge_documents():
    s = DedupSettings(max_chars=10_000)
    big = "あ" * 2_000_000
    assert (minhash(big, s) == minhash(big[:10_000], s)).all()
    text = "".join(ALPHABET[i % 97] for i in range(500))
    assert (minhash(text, s) == minhash(text, s)).all() and minhash(text, s).dtype == np.uint32


def _minhash_by_definition(text: str, s: DedupSettings) -> list[int]:
    """corpus.dedup.minhash's hashing, written out with Python integers."""
    from corpus.dedup import _permutations

    k, m64 = s.shingle_chars, 2**64 - 1
    codes = [ord(c) for c in text] + [0] * max(0, k - len(text))
    shingles = set()
    for i in range(len(codes) - k + 1):
        x = 0
        for c in codes[i : i + k]:
            x = (x * 0x100000001B3 + c) & m64
        shingles.add((x ^ (x >> 29)) & 0xFFFFFFFF)
    a, b = _permutations(s.bands * s.rows, s.seed)
    return [min(((int(aj) * x + int(bj)) & m64) for x in shingles) >> 32 for aj, bj in zip(a, b)]


@hypothesis.settings(max_examples=40, deadline=None)
@given(st.text(max_size=40))
def test_compiled_minhash_matches_its_definition(text):
    s = DedupSettings(bands=3, rows=2)
    assert minhash(text, s).tolist() == _minhash_by_definition(text, s)


# -- planted pairs -------------------------------------------------------------


def _shingles(text: str, k: int = 5) -> set[str]:
    return {text[i : i + k] for i in range(len(text) - k + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


def planted_pair(rng: np.random.Generator, target: float, length: int = 800) -> tuple[str, str, float]:
    """Two texts whose character 5-gram Jaccard is within 0.01 of ``target``.

    The second is the first with characters changed at random positions (each
    change alters up to five 5-grams); the number of changes is bisected.
    """
    base = list(rng.choice(ALPHABET, length))
    positions = rng.permutation(length)
    fresh = rng.choice(ALPHABET, length)
    lo, hi = 0, length
    while lo < hi:  # fewest changes with a Jaccard at or below the target
        k = (lo + hi) // 2
        other = base.copy()
        for p in positions[:k]:
            other[p] = fresh[p] if fresh[p] != base[p] else "ー"
        if jaccard("".join(base), "".join(other)) > target:
            lo = k + 1
        else:
            hi = k
    other = base.copy()
    for p in positions[:lo]:
        other[p] = fresh[p] if fresh[p] != base[p] else "ー"
    a, b = "".join(base), "".join(other)
    return a, b, jaccard(a, b)


def doc_row(text: str, url: str, fetched_at: datetime, source: str = "s", genre: str = "blog") -> dict:
    return {
        "doc_id": hashlib.sha256(text.encode("utf-8")).hexdigest()[:32], "url": url, "source": source,
        "genre": genre, "fetched_at": fetched_at, "title": "", "text": text, "n_chars": len(text),
        "hiragana_ratio": 0.5, "japanese_ratio": 1.0, "katakana_ratio": 0.0, "dup_cluster": None,
    }


def write_clean(storage: Storage, folder: str, rows: list[dict]) -> str:
    """A cleaned partition, as the clean stage leaves it (the columns it may add are optional)."""
    storage.write_parquet(f"{folder}/docs.parquet", pa.Table.from_pylist(rows, schema=DOC))
    storage.write_parquet(f"{folder}/dropped.parquet", DROPPED.empty_table())
    return folder


def test_planted_pairs_recall_and_false_positives(tmp_path):
    rng = np.random.default_rng(7)
    levels = {0.9: [], 0.8: [], 0.5: [], 0.3: []}
    rows = []
    for target, pairs in levels.items():
        for i in range(200):
            a, b, j = planted_pair(rng, target)
            assert abs(j - target) <= 0.01, (target, j)
            ua, ub = f"http://p/{target}/{i}/a", f"http://p/{target}/{i}/b"
            rows += [doc_row(a, ua, T0), doc_row(b, ub, T0 + timedelta(hours=1))]
            pairs.append((rows[-2]["doc_id"], rows[-1]["doc_id"]))
    storage = Storage(str(tmp_path))
    write_clean(storage, "clean", rows)
    stats = dedup_partition(storage, "clean", [], DedupSettings(), "link")

    dropped = {d["doc_id"]: json.loads(d["detail"]) for d in storage.read_parquet(["link/dropped.parquet"]).to_pylist()}
    kept = set(storage.read_parquet(["link/docs.parquet"])["doc_id"].to_pylist())

    def found(a: str, b: str) -> bool:  # b (fetched later) was dropped as a's duplicate
        return a in kept and dropped.get(b, {}).get("kept_doc_id") == a

    rate = {j: sum(found(a, b) for a, b in pairs) / len(pairs) for j, pairs in levels.items()}
    high = levels[0.9] + levels[0.8]
    low = levels[0.5] + levels[0.3]
    recall = sum(found(a, b) for a, b in high) / len(high)
    false_positives = sum(found(a, b) for a, b in low) / len(low)
    print(f"detected share by Jaccard: {rate}; recall J>=0.8 {recall}, false positives J<=0.5 {false_positives}")
    assert recall >= 0.9 and rate[0.8] >= 0.85
    assert false_positives <= 0.05
    # Nothing but planted partners is ever joined, and every drop names a verified match.
    assert all(d["kept_doc_id"] == d["matched_doc_id"] and d["jaccard"] >= 0.7 for d in dropped.values())
    assert stats["near_duplicates"] == len(dropped) and stats["kept"] == len(rows) - len(dropped)


# -- one partition: exact copies, clusters and the keeper ----------------------


def _variants(rng: np.random.Generator, n: int, length: int = 1200, changes: int = 8) -> list[str]:
    base = list(rng.choice(ALPHABET, length))
    out = []
    for _ in range(n):
        v = base.copy()
        for p in rng.choice(length, changes, replace=False):
            v[p] = "ー"
        out.append("".join(v))
    return out


def _outputs(storage: Storage, link: str) -> tuple[list, list]:
    docs = storage.read_parquet([f"{link}/docs.parquet"]).select(["doc_id", "url", "dup_cluster"]).to_pylist()
    dropped = storage.read_parquet([f"{link}/dropped.parquet"]).select(["url", "reasons", "detail"]).to_pylist()
    return docs, dropped


def test_keeper_is_earliest_then_longest_then_smallest_id_whatever_the_row_order(tmp_path):
    rng = np.random.default_rng(1)
    p, q, r, x, y = _variants(rng, 5)
    r = r + "ーー"  # longer than q
    rows = [
        doc_row(p, "http://a/p", T0 + timedelta(days=1)),
        doc_row(q, "http://a/q", T0),
        doc_row(r, "http://a/r", T0),  # as early as q and longer: kept
        doc_row(q, "http://a/q-copy", T0 + timedelta(days=2)),  # exact copy of q
        doc_row(q, "http://a/q-copy2", T0),  # exact copy of q fetched as early: the URL decides
    ]
    storage = Storage(str(tmp_path))
    settings = DedupSettings()
    stats = dedup_partition(storage, write_clean(storage, "c1", rows), [], settings, "l1")
    docs, dropped = _outputs(storage, "l1")
    keeper = rows[2]["doc_id"]
    assert docs == [{"doc_id": keeper, "url": "http://a/r", "dup_cluster": keeper}]
    by_url = {d["url"]: (d["reasons"], json.loads(d["detail"])) for d in dropped}
    assert by_url["http://a/p"][0] == ["near_duplicate"] and by_url["http://a/q"][0] == ["near_duplicate"]
    assert by_url["http://a/q-copy"] == (["exact_duplicate"], {"kept_doc_id": keeper, "matched_doc_id": rows[1]["doc_id"], "jaccard": 1.0})
    assert by_url["http://a/q-copy2"][0] == ["exact_duplicate"]
    assert all(detail["kept_doc_id"] == keeper for _, detail in by_url.values())
    assert stats["exact_duplicates"] == 2 and stats["near_duplicates"] == 2 and stats["clusters"] == 1

    # Same documents in another order: the same files.
    shuffled = [rows[i] for i in (3, 0, 4, 2, 1)]
    dedup_partition(storage, write_clean(storage, "c2", shuffled), [], settings, "l2")
    assert _outputs(storage, "l2") == (docs, dropped)
    for name in ("bands", "signatures", "exact"):
        assert storage.read_parquet([f"l1/index/{name}.parquet"]).equals(storage.read_parquet([f"l2/index/{name}.parquet"]))

    # Equal fetch time and length: the smallest doc id is kept.
    tied = [doc_row(x, "http://b/x", T0), doc_row(y, "http://b/y", T0)]
    dedup_partition(storage, write_clean(storage, "c3", tied), [], settings, "l3")
    (kept,), _ = _outputs(storage, "l3")
    assert kept["doc_id"] == min(t["doc_id"] for t in tied)


def test_index_files_cover_every_document_that_is_not_an_exact_copy(tmp_path):
    rng = np.random.default_rng(2)
    a, b = _variants(rng, 2)
    c = "".join(rng.choice(ALPHABET, 900))
    rows = [doc_row(a, "http://a/1", T0), doc_row(b, "http://a/2", T0 + timedelta(1)), doc_row(c, "http://a/3", T0),
            doc_row(c, "http://a/4", T0 + timedelta(1))]
    storage = Storage(str(tmp_path))
    settings = DedupSettings()
    dedup_partition(storage, write_clean(storage, "c", rows), [], settings, "l")
    bands = storage.read_parquet(["l/index/bands.parquet"])
    sigs = storage.read_parquet(["l/index/signatures.parquet"])
    exact = storage.read_parquet(["l/index/exact.parquet"])
    assert bands.schema.equals(BANDS) and sigs.schema.equals(signatures_schema(settings)) and exact.schema.equals(EXACT)
    ids = sorted({rows[0]["doc_id"], rows[1]["doc_id"], rows[2]["doc_id"]})  # b is dropped but indexed; the copy of c is not
    assert sigs["doc_id"].to_pylist() == ids and sorted(exact["doc_id"].to_pylist()) == ids
    assert bands.num_rows == len(ids) * settings.bands
    kept_of = dict(zip(exact["doc_id"].to_pylist(), exact["kept_doc_id"].to_pylist()))
    assert kept_of[rows[1]["doc_id"]] == rows[0]["doc_id"] and kept_of[rows[2]["doc_id"]] == rows[2]["doc_id"]
    text_of = {r["doc_id"]: r["text"] for r in rows}
    for doc_id, blob in zip(sigs["doc_id"].to_pylist(), sigs["signature"].to_pylist()):
        assert (np.frombuffer(blob, dtype=np.uint32) == minhash(text_of[doc_id], settings)).all()
    assert storage.read_parquet(["l/docs.parquet"]).schema.equals(DOC)
    assert storage.read_parquet(["l/dropped.parquet"]).schema.equals(DROPPED)


# -- partitions through the real stages ----------------------------------------


def _paragraphs() -> list[str]:
    """Prose paragraphs of the bundled sample site (its own duplicates left out)."""
    site = os.path.join(os.path.dirname(stages.__file__), "..", "crawlers", "sample-site")
    seen, out = set(), []
    for path in sorted(glob.glob(os.path.join(site, "*", "*.html"))):
        if "archive" in path or "update" in path or "shiftjis" in path:
            continue
        with open(path, encoding="utf-8") as f:
            for p in re.findall(r"<p>([^<]{80,})</p>", f.read()):
                if p not in seen:
                    seen.add(p)
                    out.append(p)
    return out


PARAS = _paragraphs()


def _doc(start: int, n: int = 8, swap: dict[int, int] | None = None) -> list[str]:
    """Paragraphs ``start .. start+n`` of the pool, some swapped for others."""
    paras = [PARAS[start + i] for i in range(n)]
    for i, j in (swap or {}).items():
        paras[i] = PARAS[j]
    return paras


def _html(paras: list[str]) -> bytes:
    title = paras[0][:12]  # from the text, so a copy of a page at another URL is an exact copy
    body = "".join(f"<p>{p}</p>" for p in paras)
    return f"<html lang='ja'><head><title>{title}</title></head><body><article><h1>{title}</h1>{body}</article></body></html>".encode()


# A near-duplicate chain: B is A with one paragraph swapped, C is B with another one swapped.
A = _doc(0)
B = _doc(0, swap={2: 200})
C = _doc(0, swap={2: 200, 6: 201})
E = _doc(100, 12)
E2 = _doc(100, 12, swap={4: 202})
D2 = _doc(20, 12)
D2_NEAR = _doc(20, 12, swap={3: 203})

WEEKS = {
    # (week, source): pages as (path, paragraphs); fetched on the week's day, in this order
    (1, "a"): [("/a", A), ("/d1", _doc(10)), ("/d2", D2), ("/b", B)],
    (1, "b"): [("/d3", _doc(40)), ("/d4", _doc(50))],
    (2, "a"): [("/c", C), ("/d1-copy", _doc(10)), ("/d5", _doc(60))],
    (2, "b"): [("/d2-near", D2_NEAR), ("/e", E), ("/e2", E2), ("/d6", _doc(70))],
}


def _run_id(week: int, source: str) -> str:
    return (T0 + timedelta(weeks=week - 1)).strftime("%Y%m%dT%H%M%SZ") + f"-{source * 6}"


def write_week(storage: Storage, week: int) -> None:
    for (w, source), pages in WEEKS.items():
        if w != week:
            continue
        run_id = _run_id(week, source)
        rows = [
            {
                "url": f"http://{source}.example{path}", "final_url": f"http://{source}.example{path}", "source": source,
                "genre": "blog", "run_id": run_id, "fetched_at": T0 + timedelta(weeks=week - 1, minutes=i),
                "http_status": 200, "content_type": "text/html", "encoding": "utf-8", "encoding_source": "header",
                "charset_declared": "", "depth": 0, "content_sha1": hashlib.sha1(_html(paras)).hexdigest(),
                "body": _html(paras),
            }
            for i, (path, paras) in enumerate(pages)
        ]
        part = f"raw/source={source}/run={run_id}"
        storage.write_parquet(f"{part}/part-00000.parquet", pa.Table.from_pylist(rows, schema=RAW_PAGE))
        storage.publish(part, {"source": source, "genre": "blog", "run_id": run_id, "files": ["part-00000.parquet"]})


def config(root, **dedup) -> Config:
    return Config.model_validate(
        {
            "storage": {"root": str(root)},
            "sources": [{"name": s, "genre": "blog", "start_urls": [f"http://{s}.example/"]} for s in ("a", "b")],
            "clean": {"min_chars": 300},
            "dedup": dedup,
        }
    )


def build(cfg: Config, force: bool = False):
    storage = cfg.storage_root()
    cleaned = stages.clean_all(storage, cfg, stages.extract_all(storage, cfg), force=force)
    return cleaned, stages.dedup_chain(storage, cfg, cleaned, force=force)


def corpus(storage: Storage, links) -> tuple[list, list]:
    docs = storage.read_parquet(stages.corpus_docs(links)).select(["doc_id", "url", "dup_cluster"]).to_pylist()
    dropped = storage.read_parquet([f"{link.path}/dropped.parquet" for link in links]).to_pylist()
    return docs, [(d["url"], d["stage"], d["reasons"], d["detail"]) for d in dropped]


def url_of(path: str, source: str = "a") -> str:
    return f"http://{source}.example{path}"


@pytest.fixture(scope="module")
def weekly(tmp_path_factory):
    """Week 1, then week 2 added, in one storage; both weeks at once in another."""
    root = tmp_path_factory.mktemp("weekly")
    cfg = config(root / "incremental")
    storage = cfg.storage_root()
    write_week(storage, 1)
    first = build(cfg)
    write_week(storage, 2)
    second = build(cfg)
    union_cfg = config(root / "union")
    write_week(union_cfg.storage_root(), 1)
    write_week(union_cfg.storage_root(), 2)
    union = build(union_cfg)
    return cfg, first, second, union_cfg, union


def test_texts_are_what_the_scenario_needs():
    s = DedupSettings()
    assert len(PARAS) > 203
    texts = {"A": A, "B": B, "C": C, "E": E, "E2": E2, "D2": D2, "D2_NEAR": D2_NEAR}
    sig = {name: minhash("\n".join(paras), s) for name, paras in texts.items()}
    est = lambda x, y: float(estimated_jaccard(sig[x], sig[y]))  # noqa: E731
    bands = {name: band_hashes(v[None, :], s.bands, s.rows)[0] for name, v in sig.items()}
    for x, y in (("A", "B"), ("B", "C"), ("E", "E2"), ("D2", "D2_NEAR")):
        assert est(x, y) >= s.threshold and (bands[x] == bands[y]).any(), (x, y)
    assert est("A", "C") < s.threshold  # C reaches A only through B


def test_every_page_of_the_scenario_passes_clean(weekly):
    _, _, (cleaned, _), _, _ = weekly
    assert sum(c.stats["kept"] for c in cleaned) == sum(len(p) for p in WEEKS.values())


def test_a_week_added_computes_only_its_links(weekly):
    _, (clean1, links1), (clean2, links2), _, _ = weekly
    assert len(links1) == 2 and len(links2) == 4
    assert [link.cached for link in links2] == [True, True, False, False]
    assert [c.cached for c in clean2] == [True, True, False, False]
    assert [link.id for link in links2[:2]] == [link.id for link in links1]
    # The chain goes by week, then source; each link names the one before it.
    cfg = weekly[0]
    markers = [cfg.storage_root().marker(link.path) for link in links2]
    assert [m["inputs"]["previous"] for m in markers] == [None] + [link.id for link in links2[:3]]
    assert [m["inputs"]["clean"] for m in markers] == [c.id for c in clean2]


def test_two_weekly_runs_equal_one_run_over_their_union(weekly):
    cfg, _, (_, links), union_cfg, (_, union_links) = weekly
    assert [link.id for link in links] == [link.id for link in union_links]  # same keys, same chain
    assert corpus(cfg.storage_root(), links) == corpus(union_cfg.storage_root(), union_links)
    for a, b in zip(links, union_links):
        for name in ("docs", "dropped", "index/bands", "index/signatures", "index/exact"):
            ta = cfg.storage_root().read_parquet([f"{a.path}/{name}.parquet"])
            tb = union_cfg.storage_root().read_parquet([f"{b.path}/{name}.parquet"])
            assert ta.equals(tb), (a.path, name)
        assert {k: v for k, v in a.stats.items()} == b.stats


def test_duplicates_across_weeks_are_dropped_in_the_later_week(weekly):
    cfg, _, (_, links), _, _ = weekly
    storage = cfg.storage_root()
    docs, dropped = corpus(storage, links)
    kept_urls = {d["url"] for d in docs}
    by_url = {url: (reasons, json.loads(detail)) for url, stage, reasons, detail in dropped if stage == "dedup"}
    ids = {d["url"]: d["doc_id"] for d in docs}
    assert url_of("/a") in kept_urls and url_of("/d1") in kept_urls and url_of("/d2") in kept_urls
    # Week 1: B is a near duplicate of A.
    assert by_url[url_of("/b")][0] == ["near_duplicate"] and by_url[url_of("/b")][1]["kept_doc_id"] == ids[url_of("/a")]
    # Week 2: C matches only the dropped B, and is still dropped, in favour of A.
    reasons, detail = by_url[url_of("/c")]
    b_id = next(row["doc_id"] for row in storage.read_parquet([f"{links[0].path}/dropped.parquet"]).to_pylist() if row["url"] == url_of("/b"))
    assert reasons == ["near_duplicate"] and detail["matched_doc_id"] == b_id and detail["kept_doc_id"] == ids[url_of("/a")]
    # An exact copy and a near copy of week-1 documents.
    assert by_url[url_of("/d1-copy")] == (["exact_duplicate"], {"kept_doc_id": ids[url_of("/d1")], "matched_doc_id": ids[url_of("/d1")], "jaccard": 1.0})
    assert by_url[url_of("/d2-near", "b")][0] == ["near_duplicate"] and by_url[url_of("/d2-near", "b")][1]["kept_doc_id"] == ids[url_of("/d2")]
    # A new pair within week 2: the earlier fetched is kept and marks its cluster.
    assert url_of("/e", "b") in kept_urls and url_of("/e2", "b") not in kept_urls
    assert next(d for d in docs if d["url"] == url_of("/e", "b"))["dup_cluster"] == ids[url_of("/e", "b")]
    assert kept_urls == {url_of(p) for p in ("/a", "/d1", "/d2", "/d5")} | {url_of(p, "b") for p in ("/d3", "/d4", "/e", "/d6")}
    # The running corpus figures of the last link cover every link.
    figures = links[-1].stats["corpus"]
    assert figures["links"] == 4 and figures["documents"] == len(docs)
    assert figures["dropped"] == {"exact_duplicate": 1, "near_duplicate": 4}
    assert storage.exists(f"{links[-1].path}/composition.png")


def test_rerun_is_a_no_op(weekly):
    cfg, _, (clean_before, links_before), _, _ = weekly
    storage = cfg.storage_root()
    finished = [storage.marker(link.path)["finished_at"] for link in links_before]
    cleaned, links = build(cfg)
    assert all(c.cached for c in cleaned) and all(link.cached for link in links)
    assert [link.id for link in links] == [link.id for link in links_before]
    assert [storage.marker(link.path)["finished_at"] for link in links] == finished


def test_a_changed_threshold_recomputes_the_chain_deterministically(weekly, tmp_path):
    cfg, _, (_, links), union_cfg, _ = weekly
    strict = config(cfg.storage.root, threshold=0.95)
    _, strict_links = build(strict)
    assert all(not link.cached for link in strict_links)
    assert not {link.id for link in strict_links} & {link.id for link in links}
    docs, _ = corpus(strict.storage_root(), strict_links)
    assert url_of("/b") in {d["url"] for d in docs}  # no longer close enough
    # The same settings over the union, in another storage: the same corpus.
    _, again = build(config(union_cfg.storage.root, threshold=0.95))
    assert corpus(strict.storage_root(), strict_links) == corpus(union_cfg.storage_root(), again)


def test_corpus_rebuild_recomputes_every_link_to_the_same_corpus(weekly, tmp_path):
    _, _, _, union_cfg, (_, links) = weekly
    storage = union_cfg.storage_root()
    before = corpus(storage, links)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        f"storage:\n  root: {union_cfg.storage.root}\nclean:\n  min_chars: 300\n"
        "sources:\n  - name: a\n    genre: blog\n    start_urls: ['http://a.example/']\n"
    )
    done = subprocess.run([JAGPT, "corpus", "rebuild", "--config", str(cfg_file)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("recomputing") == 8  # 4 clean steps and 4 links, forced; extraction is reused
    assert links[-1].path in done.stdout
    assert corpus(storage, links) == before


def test_a_link_reads_the_earlier_index_on_gcs(gcs_root):
    root, options = gcs_root
    storage = Storage(root, options)
    rng = np.random.default_rng(3)
    a, b = _variants(rng, 2)
    c = "".join(rng.choice(ALPHABET, 900))
    settings = DedupSettings()
    first = dedup_partition(storage, write_clean(storage, "c1", [doc_row(a, "http://a/1", T0), doc_row(c, "http://a/2", T0)]), [], settings, "l1")
    week2 = [doc_row(b, "http://a/3", T0 + timedelta(weeks=1)), doc_row(c, "http://a/4", T0 + timedelta(weeks=1))]
    second = dedup_partition(storage, write_clean(storage, "c2", week2), ["l1"], settings, "l2", first)
    _, dropped = _outputs(storage, "l2")
    assert sorted((d["url"], d["reasons"]) for d in dropped) == [("http://a/3", ["near_duplicate"]), ("http://a/4", ["exact_duplicate"])]
    assert second["kept"] == 0 and second["corpus"]["documents"] == 2


def test_a_crash_mid_build_leaves_the_previous_corpus_readable_and_complete(tmp_path):
    from corpus.explain import Corpus

    cfg = config(tmp_path / "crash")
    storage = cfg.storage_root()
    write_week(storage, 1)
    _, links = build(cfg)
    before = Corpus.current(storage)
    docs_before, dropped_before = corpus(storage, links)

    # Week 2 arrives with a part file cut short in the middle of its upload.
    write_week(storage, 2)
    (broken,) = storage.glob(f"raw/source=a/run={_run_id(2, 'a')}/part-00000.parquet")
    data = storage.read_bytes(broken)
    storage.write_bytes(broken, data[: len(data) // 2])
    with pytest.raises(Exception):
        build(cfg)

    after = Corpus.current(storage)
    assert after == before
    assert storage.read_parquet([f"{d}/docs.parquet" for d in after.dedup]).num_rows == len(docs_before)
    assert corpus(storage, links) == (docs_before, dropped_before)
    assert all(storage.is_published(d) for d in after.dedup + after.clean + after.extract)
