"""Explain the corpus: why one page is in it or not, and what was kept and dropped.

Both read ``corpus/current.json``, which the corpus build writes last: the
extract, clean and dedup step folders that make up the current corpus.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import pyarrow.parquet as pq

from corpus.clean import RULES, CleanSettings
from corpus.storage import Storage

CURRENT = "corpus/current.json"


@dataclass
class Corpus:
    extract: list[str]
    clean: list[str]
    dedup: list[str]

    @classmethod
    def current(cls, storage: Storage) -> Corpus:
        if not storage.exists(CURRENT):
            raise LookupError(f"no corpus built under {storage.url('corpus')}: run `jagpt pipeline` or `jagpt corpus rebuild`")
        data = storage.read_json(CURRENT)
        return cls(data["extract"], data["clean"], data["dedup"])


def write_current(storage: Storage, extract: list[str], clean: list[str], dedup: list[str]) -> None:
    storage.write_json(CURRENT, {"extract": extract, "clean": clean, "dedup": dedup})


def _rows(storage: Storage, files: list[str], url: str) -> list[dict]:
    found = []
    for rel in files:
        if not storage.exists(rel):
            continue
        with storage.fs.open(storage.path(rel), "rb") as f:
            found += pq.read_table(f, filters=[("url", "=", url)]).to_pylist()
    return found


def _doc_url(storage: Storage, corpus: Corpus, doc_id: str | None) -> str | None:
    for rel in [f"{d}/docs.parquet" for d in corpus.dedup]:
        with storage.fs.open(storage.path(rel), "rb") as f:
            rows = pq.read_table(f, columns=["url", "doc_id"], filters=[("doc_id", "=", doc_id)]).to_pylist()
        if rows:
            return rows[0]["url"]
    return None


def _crawl_rows(storage: Storage, url: str) -> list[dict]:
    return _rows(storage, storage.glob("state/source=*/pages.parquet"), url)


def _broken_rules(signals: dict, thresholds: dict) -> list[str]:
    lines = []
    for reason, signal, op, threshold in RULES:
        value, limit = signals.get(signal), thresholds[threshold]
        if value is None:
            continue
        broken = {"<": value < limit, ">": value > limit, ">=": value >= limit}[op]
        if broken:
            lines.append(f"{reason}: {signal} {value} {op} {threshold} {limit}")
    return lines


def why(storage: Storage, url: str, settings: CleanSettings) -> list[str]:
    """What happened to ``url`` at each stage, as lines for people."""
    corpus = Corpus.current(storage)
    lines = [url]
    crawl = _crawl_rows(storage, url)
    for c in crawl:
        note = f" ({c['reason']})" if c["reason"] else ""
        lines.append(f"  crawl: last fetched {c['fetched_at']:%Y-%m-%d %H:%M} UTC, HTTP {c['status'] or '-'}, {c['outcome']}{note}")
    if not crawl:
        lines.append("  crawl: not in any source's crawl state")
    kept = _rows(storage, [f"{d}/docs.parquet" for d in corpus.dedup], url)
    # A dedup link's dropped table carries its partition's extract and clean drops too.
    dropped = _rows(storage, [f"{d}/dropped.parquet" for d in corpus.dedup], url)
    for d in dropped:
        lines.append(f"  {d['stage']}: dropped for {', '.join(d['reasons'])}")
        detail = d["detail"] or ""
        if d["stage"] == "clean" and detail.startswith("{"):
            thresholds = settings.thresholds(d["source"], d["genre"]).model_dump()
            lines += [f"    {rule}" for rule in _broken_rules(json.loads(detail), thresholds)]
        elif d["stage"] == "dedup" and detail.startswith("{"):
            match = json.loads(detail)
            kept_url = _doc_url(storage, corpus, match.get("kept_doc_id"))
            lines.append(f"    the corpus keeps doc {match.get('kept_doc_id')} ({kept_url or 'url unknown'}); "
                         f"estimated Jaccard {match.get('jaccard')} with doc {match.get('matched_doc_id')}")
        elif detail:
            lines.append(f"    {detail}")
    for k in kept:
        signals = json.loads(k["signals"] or "{}")
        lines.append(f"  in the corpus: doc {k['doc_id']}, {k['n_chars']} characters, source {k['source']} ({k['genre']})")
        lines.append("    " + ", ".join(f"{name} {value}" for name, value in signals.items()))
    if not kept:
        lines.append("  => not in the corpus" if dropped or crawl else "  => never seen by jagpt")
    return lines


def stats(storage: Storage) -> dict:
    """Kept documents and characters, and drops by reason, per source."""
    corpus = Corpus.current(storage)
    per_source: dict[str, dict] = defaultdict(lambda: {"kept": 0, "characters": 0, "dropped": defaultdict(int)})
    for d in corpus.dedup:
        with storage.fs.open(storage.path(f"{d}/docs.parquet"), "rb") as f:
            t = pq.read_table(f, columns=["source", "n_chars"])
        for source, n in zip(t["source"].to_pylist(), t["n_chars"].to_pylist()):
            per_source[source]["kept"] += 1
            per_source[source]["characters"] += n
    for rel in [f"{d}/dropped.parquet" for d in corpus.dedup]:
        with storage.fs.open(storage.path(rel), "rb") as f:
            t = pq.read_table(f, columns=["source", "stage", "reasons"])
        for source, stage, reasons in zip(*(t[c].to_pylist() for c in t.column_names)):
            for r in reasons:
                per_source[source]["dropped"][f"{stage}:{r}"] += 1
    return {s: {**v, "dropped": dict(sorted(v["dropped"].items()))} for s, v in sorted(per_source.items())}
