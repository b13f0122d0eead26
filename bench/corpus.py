"""Corpus build benchmark: clean + dedup on a synthetic Japanese corpus of a chosen size.

    .venv/bin/python bench/corpus.py [--size 100MB|1GB|4GB] [--json FILE] [--keep]

1. Generates ``--size`` of UTF-8 text as extract-step outputs (EXTRACTED
   tables, one folder per partition, like weekly crawls). Documents are 20-80
   sentences from the bundled sample site's prose and the clean tests'
   sentences, drawn without repeats within a document; about a quarter of
   the sentences are spliced from two sentences at a comma, so documents are
   all distinct, as in natural text. 5% of the documents are planted exact
   copies of an earlier document (new URL), 5% planted near copies (one
   sentence in 20 replaced, character 5-gram Jaccard about 0.9). Copies
   come from a reservoir of earlier documents, so many cross partitions.
2. Cleans every partition with ``corpus.clean.clean``, then dedups them as a
   chain with ``corpus.dedup.dedup_partition``, as ``flows.stages.clean_all``
   and ``dedup_chain`` do (settings: a default ``flows.config.Config``).
   Generation, clean and dedup each run in a fresh subprocess, so each
   phase's peak RSS is its own.
3. Reports MB/s per stage (input UTF-8 text MB / wall s), the MinHash
   signature throughput on one core (``corpus.dedup.minhash`` timed alone on
   up to 25 MB of the first cleaned partition, after the chain), peak RSS,
   and the recall of the planted exact and near pairs; checks the targets.
   See docs/performance.md.

Exit status: 0 all targets met, 1 a target missed, 2 the run is invalid.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from corpus.schema import DROPPED, EXTRACTED  # noqa: E402
from corpus.storage import Storage  # noqa: E402
from crawlers.sample import sample_sentences  # noqa: E402

MB = 1_000_000
TARGET_CLEAN_MB_S = 30.0
TARGET_SIGNATURE_MB_S_PER_CORE = 10.0
TARGET_BUILD_4GB_S = 15 * 60
TARGET_RSS_GROWTH = 1.3  # peak RSS at 4 GB / peak RSS at 1 GB
EXACT_SHARE = NEAR_SHARE = 0.05
T0 = datetime(2026, 1, 5, tzinfo=timezone.utc)

# -- text ----------------------------------------------------------------------



def real_sentences() -> list[str]:
    """Sentences of the sample site's Japanese paragraphs and of the clean tests' prose."""
    out = set(sample_sentences())
    tests = open(os.path.join(_ROOT, "tests", "test_clean.py"), encoding="utf-8").read()
    out.update(re.findall(r'^\s+"([^"\n]+。)",$', tests, re.M))
    return sorted(s for s in out if re.search("[ぁ-ゖ]", s))


class Writer:
    """Draws documents and writes them as partitions of extract-step outputs."""

    def __init__(self, storage: Storage, size: int, partitions: int, seed: int):
        self.storage, self.size, self.partitions = storage, size, partitions
        self.rng = random.Random(seed)
        self.pool = real_sentences()
        self.clauses = [s.split("、", 1) for s in self.pool if "、" in s]
        self.reservoir: list[tuple[str, list[str]]] = []  # (url, sentences) of earlier documents
        self.exact_texts: dict[str, str] = {}  # url -> text, for the reservoir's documents
        self.seen = 0
        self.planted: dict[str, list[list[str]]] = {"exact": [], "near": []}
        self.text_bytes = self.docs = 0

    def sentence(self) -> str:
        if self.rng.random() < 0.25:  # spliced: one sentence's head, another's tail
            return self.rng.choice(self.clauses)[0] + "、" + self.rng.choice(self.clauses)[1]
        return self.rng.choice(self.pool)

    def sentences(self) -> list[str]:
        n = self.rng.randint(20, 80)
        return [s if self.rng.random() >= 0.25 else self.sentence() for s in self.rng.sample(self.pool, n)]

    def text(self, sentences: list[str]) -> str:
        paragraphs, i = [], 0
        while i < len(sentences):
            k = self.rng.randint(3, 7)
            paragraphs.append("".join(sentences[i : i + k]))
            i += k
        return "\n".join(paragraphs)

    def document(self, url: str) -> str:
        r = self.rng.random()
        if self.reservoir and r < EXACT_SHARE + NEAR_SHARE:
            orig_url, orig = self.rng.choice(self.reservoir)
            if r < EXACT_SHARE:
                self.planted["exact"].append([orig_url, url])
                return self.exact_texts[orig_url]
            changed = list(orig)
            for i in self.rng.sample(range(len(changed)), max(1, len(changed) // 20)):
                changed[i] = self.sentence()
            self.planted["near"].append([orig_url, url])
            sentences = changed
        else:
            sentences = self.sentences()
        text = self.text(sentences)
        self.remember(url, sentences, text)
        return text

    def remember(self, url: str, sentences: list[str], text: str) -> None:
        """Reservoir sampling over every document so far (bounded memory)."""
        self.seen += 1
        if len(self.reservoir) < 2000:
            self.reservoir.append((url, sentences))
            self.exact_texts[url] = text
        else:
            j = self.rng.randrange(self.seen)
            if j < len(self.reservoir):
                del self.exact_texts[self.reservoir[j][0]]
                self.reservoir[j] = (url, sentences)
                self.exact_texts[url] = text

    def run(self) -> list[str]:
        per = self.size / self.partitions
        paths = []
        for p in range(self.partitions):
            rows, nbytes = [], 0
            week = T0 + timedelta(weeks=p)
            while nbytes < per * (p + 1) - self.text_bytes:
                i = self.docs + len(rows)
                url = f"https://{'ab'[i % 2]}.example/{p:03d}/{i}"
                text = self.document(url)
                nbytes += len(text.encode("utf-8"))
                title = text[: self.rng.randint(10, 30)]
                rows.append({"url": url, "source": "ab"[i % 2], "genre": "blog",
                             "fetched_at": week + timedelta(seconds=self.rng.randrange(7 * 86400)),
                             "content_sha1": "0", "title": title, "published": "", "lang": "ja", "text": text})
            path = f"extract/p{p:03d}"
            self.storage.write_parquet(f"{path}/extracted.parquet", pa.Table.from_pylist(rows, schema=EXTRACTED))
            self.storage.write_parquet(f"{path}/dropped.parquet", DROPPED.empty_table())
            self.text_bytes += nbytes
            self.docs += len(rows)
            paths.append(path)
            print(f"  generated {path}: {len(rows)} documents, {nbytes / MB:.0f} MB", file=sys.stderr)
        return paths


# -- phases (each in its own process) -----------------------------------------


def peak_rss_mb() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "peak_rss_children_mb": round(children, 1)}


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def config(root: str):
    from flows.config import Config

    return Config.model_validate({"storage": {"root": root}, "sources": [{"name": s, "genre": "blog", "start_urls": [f"http://{s}.example/"]} for s in "ab"]})


def phase_generate(root: str, size: int, partitions: int, seed: int) -> dict:
    t = time.perf_counter()
    w = Writer(Storage(root), size, partitions, seed)
    paths = w.run()
    with open(os.path.join(root, "planted.json"), "w") as f:
        json.dump(w.planted, f)
    return {"partitions": paths, "documents": w.docs, "text_mb": w.text_bytes / MB, "sentence_pool": len(w.pool),
            "planted_exact": len(w.planted["exact"]), "planted_near": len(w.planted["near"]),
            "wall_s": time.perf_counter() - t, **peak_rss_mb()}


def text_mb(storage: Storage, files: list[str]) -> float:
    total = 0
    for b in storage.iter_parquet(files, columns=["text"], batch_size=4096):
        total += pc.sum(pc.binary_length(b.column(0).cast(pa.binary()))).as_py() or 0
    return total / MB


def phase_clean(root: str, partitions: list[str]) -> dict:
    import corpus.clean as clean_mod

    cfg, storage = config(root), Storage(root)
    python_s = 0.0
    signal_batches = clean_mod._signal_batches

    def timed(*a, **k):  # time spent producing the Python-side signals
        nonlocal python_s
        it = signal_batches(*a, **k)
        while True:
            t = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                python_s += time.perf_counter() - t
                return
            python_s += time.perf_counter() - t
            yield b

    clean_mod._signal_batches = timed
    mb = text_mb(storage, [f"{p}/extracted.parquet" for p in partitions])
    t, c = time.perf_counter(), cpu_s()
    kept = docs = 0
    for p in partitions:
        out = p.replace("extract/", "clean/")
        stats = clean_mod.clean(storage, [f"{p}/extracted.parquet"], [f"{p}/dropped.parquet"], cfg.clean, out)
        kept, docs = kept + stats["kept"], docs + stats["documents"]
    wall = time.perf_counter() - t
    return {"input_mb": mb, "documents": docs, "kept": kept, "wall_s": wall, "cpu_s": cpu_s() - c,
            "python_signals_s": python_s, "sql_and_write_s": wall - python_s, **peak_rss_mb()}


def phase_dedup(root: str, partitions: list[str]) -> dict:
    import corpus.dedup as dedup_mod

    cfg, storage = config(root), Storage(root)
    pass_s = 0.0
    signature_pass = dedup_mod._signature_pass

    def timed(*a, **k):  # the signature pass: read, hash and sign (in the worker processes), write
        nonlocal pass_s
        t = time.perf_counter()
        out = signature_pass(*a, **k)
        pass_s += time.perf_counter() - t
        return out

    dedup_mod._signature_pass = timed
    cleaned = [p.replace("extract/", "clean/") for p in partitions]
    mb = text_mb(storage, [f"{c}/docs.parquet" for c in cleaned])
    t, c0 = time.perf_counter(), cpu_s()
    links: list[str] = []
    stats = None
    for c in cleaned:
        out = c.replace("clean/", "dedup/")
        stats = dedup_mod.dedup_partition(storage, c, list(links), cfg.dedup, out, stats)
        links.append(out)
    wall, cpu = time.perf_counter() - t, cpu_s() - c0
    recall = planted_recall(storage, root, cleaned, links)
    return {"input_mb": mb, "wall_s": wall, "cpu_s": cpu, "signature_pass_s": pass_s,
            **minhash_one_core(storage, f"{cleaned[0]}/docs.parquet", cfg.dedup),
            "kept": stats["corpus"]["documents"], **recall, **peak_rss_mb()}


def minhash_one_core(storage: Storage, docs: str, settings, limit_mb: float = 25) -> dict:
    """MinHash signatures alone, in this process: up to ``limit_mb`` of one partition's texts."""
    from corpus.dedup import minhash

    texts, nbytes = [], 0
    for b in storage.iter_parquet([docs], columns=["text"], batch_size=1024):
        for text in b.column(0).to_pylist():
            texts.append(text)
            nbytes += len(text.encode("utf-8"))
        if nbytes >= limit_mb * MB:
            break
    t = time.perf_counter()
    for text in texts:
        minhash(text, settings)
    return {"signature_mb": nbytes / MB, "signature_s": time.perf_counter() - t}


def planted_recall(storage: Storage, root: str, cleaned: list[str], links: list[str]) -> dict:
    """A planted pair is found when dedup drops one of the two and both end in the same cluster."""
    present = {}
    for b in storage.iter_parquet([f"{c}/docs.parquet" for c in cleaned], columns=["url", "doc_id"], batch_size=8192):
        present.update(zip(b.column(0).to_pylist(), b.column(1).to_pylist()))
    dropped = {}
    for b in storage.iter_parquet([f"{x}/dropped.parquet" for x in links], columns=["url", "stage", "detail"], batch_size=8192):
        for url, stage, detail in zip(*(b.column(i).to_pylist() for i in range(3))):
            if stage == "dedup":
                dropped[url] = json.loads(detail)["kept_doc_id"]
    planted = json.load(open(os.path.join(root, "planted.json")))
    out = {}
    for kind, pairs in planted.items():
        eligible = [(a, b) for a, b in pairs if a in present and b in present]
        found = sum(1 for a, b in eligible if (a in dropped or b in dropped)
                    and dropped.get(a, present[a]) == dropped.get(b, present[b]))
        out[f"{kind}_pairs"] = len(eligible)
        out[f"{kind}_found"] = found
        out[f"{kind}_recall"] = found / len(eligible) if eligible else None
    out["dedup_dropped"] = len(dropped)
    return out


# -- driver ---------------------------------------------------------------------


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]B|B?)", s.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"size like 100MB or 1GB, got {s!r}")
    return int(float(m.group(1)) * {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)])


def child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(fig: dict) -> list[str]:
    g, c, d = fig["generate"], fig["clean"], fig["dedup"]
    cores = os.cpu_count() or 1
    rows = [
        ("corpus", f"{g['text_mb']:.0f} MB of text, {g['documents']:,} documents, {len(g['partitions'])} partitions"),
        ("generate", f"{g['wall_s']:.1f} s, peak RSS {g['peak_rss_mb']:.0f} MB"),
        ("clean: wall", f"{c['wall_s']:.1f} s ({c['python_signals_s']:.1f} s Python signals, {c['sql_and_write_s']:.1f} s DuckDB and writing)"),
        ("clean: MB/s", f"{c['mb_s']:.1f} ({c['mb_s'] / cores:.1f} per core on {cores}); CPU {c['cpu_s']:.0f} s"),
        ("clean: kept", f"{c['kept']:,} of {c['documents']:,}"),
        ("clean: peak RSS", f"{c['peak_rss_mb']:.0f} MB (children {c['peak_rss_children_mb']:.0f} MB)"),
        ("dedup: wall", f"{d['wall_s']:.1f} s, {d['mb_s']:.1f} MB/s of {d['input_mb']:.0f} MB; CPU {d['cpu_s']:.0f} s"),
        ("dedup: signature pass", f"{d['signature_pass_s']:.1f} s of the wall time (read, sign in {cores} processes, write)"),
        ("dedup: MinHash, one core", f"{d['signature_mb_s']:.1f} MB/s ({d['signature_mb']:.0f} MB in {d['signature_s']:.1f} s)"),
        ("dedup: peak RSS", f"{d['peak_rss_mb']:.0f} MB (children {d['peak_rss_children_mb']:.0f} MB)"),
        ("dedup: planted exact pairs", f"{d['exact_found']:,} of {d['exact_pairs']:,} found"),
        ("dedup: planted near pairs", f"{d['near_found']:,} of {d['near_pairs']:,} found"),
        ("dedup: kept / dropped", f"{d['kept']:,} / {d['dedup_dropped']:,}"),
        ("build (clean + dedup)", f"{fig['build_s']:.1f} s, {fig['build_mb_s']:.1f} MB/s"),
    ]
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("100MB"), help="text to generate: 100MB, 1GB, 4GB")
    ap.add_argument("--partition-mb", type=float, default=128, help="largest partition (default 128 MB; at least 4 partitions)")
    ap.add_argument("--seed", type=int, default=20261129)
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temporary storage root")
    ap.add_argument("--baseline-rss", type=float, metavar="MB", help="peak RSS of a 1 GB run, to check the 4 GB growth target")
    ap.add_argument("--phase", choices=["generate", "clean", "dedup"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase:
        parts = sorted(f"extract/{p}" for p in os.listdir(os.path.join(args.root, "extract"))) if args.phase != "generate" else []
        if args.phase == "generate":
            partitions = max(4, -(-args.size // int(args.partition_mb * MB)))
            out = phase_generate(args.root, args.size, partitions, args.seed)
        else:
            out = (phase_clean if args.phase == "clean" else phase_dedup)(args.root, parts)
        print(json.dumps(out))
        return 0

    root = tempfile.mkdtemp(prefix="jagpt-bench-corpus-")
    try:
        common = ["--root", root, "--size", str(args.size), "--partition-mb", str(args.partition_mb), "--seed", str(args.seed)]
        print(f"generating {args.size / MB:.0f} MB under {root}", file=sys.stderr)
        fig = {"size_mb": args.size / MB, "cpus": os.cpu_count(), "generate": child(["--phase", "generate", *common])}
        print("cleaning", file=sys.stderr)
        fig["clean"] = child(["--phase", "clean", *common])
        print("deduplicating", file=sys.stderr)
        fig["dedup"] = child(["--phase", "dedup", *common])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    c, d = fig["clean"], fig["dedup"]
    c["mb_s"] = c["input_mb"] / c["wall_s"]
    d["mb_s"] = d["input_mb"] / d["wall_s"]
    d["signature_mb_s"] = d["signature_mb"] / d["signature_s"] if d["signature_s"] else None
    fig["build_s"] = c["wall_s"] + d["wall_s"]
    fig["build_mb_s"] = c["input_mb"] / fig["build_s"]
    fig["peak_rss_mb"] = max(c["peak_rss_mb"], c["peak_rss_children_mb"], d["peak_rss_mb"], d["peak_rss_children_mb"])
    for line in report(fig):
        print(line)

    # minhash_one_core times the signatures in one process: its MB/s is the per-core figure.
    checks = [("clean MB/s", c["mb_s"], TARGET_CLEAN_MB_S, c["mb_s"] >= TARGET_CLEAN_MB_S),
              ("MinHash MB/s per core", d["signature_mb_s"], TARGET_SIGNATURE_MB_S_PER_CORE,
               (d["signature_mb_s"] or 0) >= TARGET_SIGNATURE_MB_S_PER_CORE)]
    if fig["size_mb"] >= 4000:
        # Scaled to exactly 4 GB of text when the generated size differs a little.
        est = fig["build_s"] * 4000 / c["input_mb"]
        checks.append(("4 GB build s", est, TARGET_BUILD_4GB_S, est <= TARGET_BUILD_4GB_S))
        if args.baseline_rss:
            growth = fig["peak_rss_mb"] / args.baseline_rss
            checks.append(("peak RSS 4 GB / 1 GB", growth, TARGET_RSS_GROWTH, growth <= TARGET_RSS_GROWTH))
        else:
            print("peak RSS growth not checked: pass the 1 GB run's peak RSS as --baseline-rss MB")
    else:
        est = fig["build_s"] * 4000 / c["input_mb"]
        fig["build_4gb_linear_estimate_s"] = est
        print(f"4 GB build, linear estimate  {est:.0f} s (target {TARGET_BUILD_4GB_S} s; checked at --size 4GB)")
    fig["targets"] = [{"name": n, "value": v, "target": t, "met": ok} for n, v, t, ok in checks]
    for n, v, t, ok in checks:
        print(f"target {n}: {v:.2f} vs {t} -> {'met' if ok else 'MISSED'}")
    recall_ok = all((d[f"{k}_recall"] or 0) >= 0.9 for k in ("exact", "near"))
    if not recall_ok:
        print("INVALID: less than 90% of the planted pairs were found", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(fig, f, ensure_ascii=False, indent=2, default=str)
    if not recall_ok:
        return 2
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
