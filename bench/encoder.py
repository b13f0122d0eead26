"""Encoder and shards benchmark on a synthetic Japanese corpus.

    .venv/bin/python bench/encoder.py [--train-mb 100] [--shard-mb 100] [--text clauses|sentences] [--json FILE]

1. Generates documents from the real sentences ``bench/corpus.py`` uses, as
   one ``docs.parquet`` (the ``DOC`` schema, one corpus link). With
   ``--text clauses`` (the default) every clause (a run up to its
   punctuation, which is what the pre-tokenizer hands BPE) is the head of one
   real clause joined at a random character to the tail of another, so
   pieces almost never repeat: a worst case for the encoder's word cache and
   for the trainer's count of distinct pieces, where real text repeats many
   short pieces. ``--text sentences`` draws whole sentences, as
   ``bench/corpus.py`` does (pieces repeat nearly always: a best case). The
   report gives the share of distinct pieces in the encoded text.
2. Trains jagpt's encoder (default settings, vocabulary 32,000) on the first
   ``--train-mb`` of it and times it, with the peak RSS (and the RSS before,
   which is the generated corpus). The target is a 1 GB sample in 10 minutes
   on 2 cores; smaller runs print a linear estimate.
3. Encodes 20 MB with ``Encoder.encode_batch`` on one core, after an untimed
   batch that builds the compiled encoder's tables: MB/s per core.
4. Builds shards (``encoder.shards.build_shards``) from the whole
   ``docs.parquet`` to local disk with 1 and then 2 encoding processes: MB/s
   end to end (read Parquet, encode, shuffle, write, manifest) and per core.

Exit status: 0 every target met, 1 a target missed. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pyarrow as pa  # noqa: E402

from bench.corpus import T0, Writer  # noqa: E402
from corpus.schema import DOC  # noqa: E402
from corpus.storage import Storage  # noqa: E402
from encoder.bpe import EncoderSettings, train  # noqa: E402
from encoder.shards import ShardSettings, build_shards  # noqa: E402

MB = 1_000_000
TARGET_ENCODE_MB_S_PER_CORE = 15.0
TARGET_SHARDS_MB_S_PER_CORE = 10.0
TARGET_TRAIN_1GB_S = 600.0


_CLAUSE = re.compile(r"[^、。！？!?]+[、。！？!?]+")


def spliced_clauses(rng: random.Random, clauses: list[str]) -> list[str]:
    """20-80 sentences' worth of clauses, each one clause's head and another's tail."""
    out = []
    for _ in range(rng.randint(60, 240)):
        a, b = rng.choice(clauses), rng.choice(clauses)
        out.append(a[: rng.randint(1, len(a) - 1)] + b[rng.randint(1, len(b) - 1) :])
    return out


def generate(storage: Storage, size: int, seed: int, text: str = "clauses") -> tuple[str, list[str]]:
    """``size`` bytes of documents as ``docs.parquet``; returns its path and the texts."""
    w = Writer(storage, size, 1, seed)
    clauses = [c for s in w.pool for c in _CLAUSE.findall(s) if len(c) >= 4]
    texts, nbytes = [], 0
    while nbytes < size:
        texts.append(w.text(spliced_clauses(w.rng, clauses) if text == "clauses" else w.sentences()))
        nbytes += len(texts[-1].encode("utf-8"))
    rows = [
        {"doc_id": f"{random.Random(i).getrandbits(128):032x}", "url": f"https://a.example/{i}", "source": "a",
         "genre": "blog", "fetched_at": T0, "title": "", "text": t, "n_chars": len(t), "hiragana_ratio": 0.5,
         "japanese_ratio": 1.0, "katakana_ratio": 0.0, "dup_cluster": None}
        for i, t in enumerate(texts)
    ]
    storage.write_parquet("corpus/docs.parquet", pa.Table.from_pylist(rows, schema=DOC))
    return "corpus/docs.parquet", texts


def distinct_piece_share(encoder, texts: list[str]) -> float:
    """Distinct pre-tokenizer pieces / pieces in ``texts``: how rarely the word cache can help."""
    pieces = [p for t in texts for p, _ in encoder.tokenizer.pre_tokenizer.pre_tokenize_str(t)]
    return len(set(pieces)) / max(len(pieces), 1)


def take_mb(texts: list[str], mb: float) -> list[str]:
    out, n = [], 0
    for t in texts:
        if n >= mb * MB:
            break
        out.append(t)
        n += len(t.encode("utf-8"))
    return out


def utf8_mb(texts: list[str]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / MB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-mb", type=float, default=100, help="encoder training sample (target: 1000)")
    ap.add_argument("--shard-mb", type=float, default=100, help="corpus to shard (at least --train-mb)")
    ap.add_argument("--text", choices=["clauses", "sentences"], default="clauses",
                    help="clauses: spliced, pieces rarely repeat (default); sentences: whole sentences, pieces repeat")
    ap.add_argument("--seed", type=int, default=20261129)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="jagpt-bench-encoder-")
    fig: dict = {"cpus": os.cpu_count(), "text": args.text}
    try:
        storage = Storage(root)
        # The encode timing uses 20 MB after the training sample, so it is held-out text.
        docs, texts = generate(storage, int(max(args.train_mb + 20, args.shard_mb) * MB), args.seed, args.text)
        sample = take_mb(texts, args.train_mb)
        fig["rss_before_train_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        encoder = train(sample, EncoderSettings(vocab_size=32000, sample_chars=sum(map(len, sample))), "tok-bench")
        train_s = time.perf_counter() - start
        fig["train"] = {"mb": utf8_mb(sample), "s": train_s, "estimate_1gb_s": train_s * 1000 / utf8_mb(sample),
                        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

        held = take_mb(texts[len(sample):], 20)
        encoder.encode_batch(sample[:256])  # untimed: builds the compiled encoder's tables
        start = time.perf_counter()
        ids = [i for b in range(0, len(held), 256) for i in encoder.encode_batch(held[b:b + 256])]
        encode_s = time.perf_counter() - start
        chars = sum(len(t) for t in held)
        fig["encode"] = {"mb": utf8_mb(held), "s": encode_s, "mb_s": utf8_mb(held) / encode_s,
                         "chars_per_token": chars / sum(len(i) for i in ids),
                         "distinct_piece_share": distinct_piece_share(encoder, take_mb(held, 2))}

        fig["shards"] = {"mb": utf8_mb(texts)}
        for workers in (1, 2):
            settings = ShardSettings(workers=workers)
            start = time.perf_counter()
            manifest = build_shards(storage, docs, encoder, settings, f"shards-{workers}", "bench")
            s = time.perf_counter() - start
            tokens = sum(manifest["splits"][k]["tokens"] for k in ("train", "val"))
            fig["shards"][f"{workers}_process"] = {"s": s, "mb_s": utf8_mb(texts) / s, "tokens": tokens}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    t, e, sh = fig["train"], fig["encode"], fig["shards"]
    one, two = sh["1_process"], sh["2_process"]
    print(f"train      {t['mb']:.0f} MB in {t['s']:.1f} s, peak RSS {t['peak_rss_mb']:.0f} MB "
          f"({fig['rss_before_train_mb']:.0f} MB before training: the generated corpus)"
          + (f"; 1 GB linear estimate {t['estimate_1gb_s']:.0f} s" if t["mb"] < 990 else ""))
    print(f"text       {fig['text']}: {e['distinct_piece_share']:.0%} of the encoded text's pre-tokenizer pieces are distinct")
    print(f"encode     {e['mb_s']:.1f} MB/s on one core ({e['chars_per_token']:.2f} characters per token)")
    print(f"shards     {sh['mb']:.0f} MB: 1 process {one['mb_s']:.1f} MB/s ({one['s']:.1f} s), "
          f"2 processes {two['mb_s']:.1f} MB/s ({two['s']:.1f} s, {two['mb_s'] / one['mb_s']:.2f}x)")
    checks = [
        ("encode MB/s per core", e["mb_s"], TARGET_ENCODE_MB_S_PER_CORE, e["mb_s"] >= TARGET_ENCODE_MB_S_PER_CORE),
        ("shards MB/s per core (1 process)", one["mb_s"], TARGET_SHARDS_MB_S_PER_CORE, one["mb_s"] >= TARGET_SHARDS_MB_S_PER_CORE),
        ("train 1 GB s (estimate)" if t["mb"] < 990 else "train 1 GB s", t["estimate_1gb_s"], TARGET_TRAIN_1GB_S,
         t["estimate_1gb_s"] <= TARGET_TRAIN_1GB_S),
    ]
    fig["targets"] = [{"name": n, "value": v, "target": tg, "met": ok} for n, v, tg, ok in checks]
    for n, v, tg, ok in checks:
        print(f"target {n}: {v:.1f} vs {tg} -> {'met' if ok else 'MISSED'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(fig, f, indent=2)
    return 0 if all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
