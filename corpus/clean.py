"""The clean stage: normalize, compute quality signals, apply the Japanese rules.

Streams the extracted pages in batches: Python normalizes them and computes
the signals SQL cannot (:mod:`corpus.quality`), DuckDB computes the rest
(character classes with ``\\p{Hiragana}``, ``\\p{Katakana}``, ``\\p{Han}``;
sentence lengths) and applies the thresholds, with per-genre and per-source
overrides joined in as a table. Every dropped document keeps all its reasons
and every signal value; kept documents keep their signals too, so
``jagpt corpus why`` can explain either decision.

Exact and near duplicates are the dedup stage's job (corpus/dedup.py); here a
URL fetched more than once keeps only its newest copy (``superseded``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Iterator
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from corpus import quality
from corpus.pool import pool_map
from corpus.normalize import NormalForm, normalize
from corpus.schema import DOC, DROPPED, conform
from corpus.settings import Settings
from corpus.storage import Storage


class Thresholds(Settings):
    """The rules' thresholds (defaults: the Swallow corpus, Okazaki et al. 2024; zlib: LLM-jp)."""

    min_chars: int = Field(default=400, ge=0)
    max_chars: int = Field(default=1_000_000, gt=0, description="longer documents are dropped as too_long")
    min_japanese_ratio: float = Field(default=0.5, ge=0, le=1, description="Japanese chars / letters")
    min_hiragana_ratio: float = Field(default=0.2, ge=0, le=1, description="hiragana / Japanese chars")
    max_katakana_ratio: float = Field(default=0.5, ge=0, le=1, description="katakana / Japanese chars")
    min_mean_sentence_chars: float = Field(default=20, ge=0)
    max_mean_sentence_chars: float = Field(default=90, gt=0)
    max_sentence_chars: int = Field(default=200, gt=0, description="longest sentence; catches link lists and menus")
    max_dup_line_ratio: float = Field(default=0.30, ge=0, le=1)
    max_dup_line_char_ratio: float = Field(default=0.20, ge=0, le=1)
    max_dup_sentence_ratio: float = Field(default=0.30, ge=0, le=1)
    max_dup_sentence_char_ratio: float = Field(default=0.20, ge=0, le=1)
    max_top_2gram: float = Field(default=0.20, ge=0, le=1)
    max_top_3gram: float = Field(default=0.18, ge=0, le=1)
    max_top_4gram: float = Field(default=0.16, ge=0, le=1)
    max_dup_5gram: float = Field(default=0.15, ge=0, le=1)
    max_dup_6gram: float = Field(default=0.14, ge=0, le=1)
    max_dup_7gram: float = Field(default=0.13, ge=0, le=1)
    max_dup_8gram: float = Field(default=0.12, ge=0, le=1)
    max_dup_9gram: float = Field(default=0.11, ge=0, le=1)
    max_dup_10gram: float = Field(default=0.10, ge=0, le=1)
    max_trailing_off_ratio: float = Field(default=0.2, ge=0, le=1, description="sentences ending in ・ or …")
    max_ng_char_ratio: float = Field(default=0.05, ge=0, le=1, description="dropped at or above")
    min_zlib_ratio: float = Field(default=0.30, ge=0)
    max_zlib_ratio: float = Field(default=0.70, gt=0)


class CleanSettings(Thresholds):
    normal_form: NormalForm = "NFKC"
    content_tags: bool = Field(default=False, description="replace URLs, e-mails, phones, dates, prices by tags")
    ng_words: list[str] = Field(default=[], description="added to the bundled corpus/ng_words.txt")
    bundled_ng_words: bool = True
    blocked_domains: list[str] = Field(default=[], description="pages of these domains and their subdomains are dropped")
    # Threshold overrides, e.g. per_genre: {novel: {min_hiragana_ratio: 0.3, max_dup_line_ratio: 0.4}}.
    # A source's override wins over its genre's.
    per_genre: dict[str, dict[str, float]] = {}
    per_source: dict[str, dict[str, float]] = {}
    memory_limit: str = "2GB"
    batch_docs: int = Field(default=2000, gt=0)
    workers: int = Field(default=0, ge=0, description="processes for the Python-side signals; 0 means one per core")

    @model_validator(mode="after")
    def _overrides_are_thresholds(self) -> CleanSettings:
        for kind, table in (("per_genre", self.per_genre), ("per_source", self.per_source)):
            for name, override in table.items():
                unknown = sorted(set(override) - set(Thresholds.model_fields))
                if unknown:
                    raise ValueError(f"{kind}.{name}: {unknown} are not thresholds; use {sorted(Thresholds.model_fields)}")
                Thresholds(**{**self.thresholds().model_dump(), **override})
        return self

    def thresholds(self, source: str | None = None, genre: str | None = None) -> Thresholds:
        values = {k: getattr(self, k) for k in Thresholds.model_fields}
        values.update(self.per_genre.get(genre or "", {}))
        values.update(self.per_source.get(source or "", {}))
        return Thresholds(**values)


# (reason, signal, comparison, threshold): a document breaking any rule is dropped.
RULES = [
    ("too_short", "n_chars", "<", "min_chars"),
    ("too_long", "n_chars", ">", "max_chars"),
    ("not_japanese", "japanese_ratio", "<", "min_japanese_ratio"),
    ("low_hiragana", "hiragana_ratio", "<", "min_hiragana_ratio"),
    ("high_katakana", "katakana_ratio", ">", "max_katakana_ratio"),
    ("short_sentences", "mean_sentence_chars", "<", "min_mean_sentence_chars"),
    ("long_sentences", "mean_sentence_chars", ">", "max_mean_sentence_chars"),
    ("overlong_sentence", "max_sentence_chars", ">", "max_sentence_chars"),
    ("dup_lines", "dup_line_ratio", ">", "max_dup_line_ratio"),
    ("dup_line_chars", "dup_line_char_ratio", ">", "max_dup_line_char_ratio"),
    ("dup_sentences", "dup_sentence_ratio", ">", "max_dup_sentence_ratio"),
    ("dup_sentence_chars", "dup_sentence_char_ratio", ">", "max_dup_sentence_char_ratio"),
    *[(f"top_{n}gram", f"top_{n}gram", ">", f"max_top_{n}gram") for n in quality.TOP_NGRAMS],
    *[(f"dup_{n}gram", f"dup_{n}gram", ">", f"max_dup_{n}gram") for n in quality.DUP_NGRAMS],
    ("trailing_off", "trailing_off_ratio", ">", "max_trailing_off_ratio"),
    ("ng_words", "ng_char_ratio", ">=", "max_ng_char_ratio"),
    ("too_compressible", "zlib_ratio", "<", "min_zlib_ratio"),
    ("incompressible", "zlib_ratio", ">", "max_zlib_ratio"),
]

# Documents per task of the worker processes: small enough to spread a batch over every core.
POOL_SLICE_DOCS = 250

SQL_SIGNALS = ["n_chars", "japanese_ratio", "hiragana_ratio", "katakana_ratio", "mean_sentence_chars", "max_sentence_chars"]
ALL_SIGNALS = SQL_SIGNALS + quality.SIGNAL_NAMES

SIGNALS_SQL = r"""
WITH counted AS (
  SELECT *,
    -- Runs (+), not single characters: the same count with far fewer replacements.
    length(regexp_replace(text, '[^\p{Hiragana}]+', '', 'g')) AS n_hira,
    length(regexp_replace(text, '[^\p{Katakana}ー]+', '', 'g')) AS n_kata,
    length(regexp_replace(text, '[^\p{Han}々〆]+', '', 'g')) AS n_han,
    length(regexp_replace(text, '[^\p{L}]+', '', 'g')) AS n_letters,
    -- A closing bracket after the full stop belongs to the sentence: 「はい。」
    list_filter(string_split_regex(regexp_replace(text, '([。！？!?])[」』）)]+', '\1', 'g'), '[。！？!?\n]+'),
                lambda s: length(trim(s)) > 0) AS sentences
  FROM signals
), scored AS (
  SELECT *,
    (n_hira + n_kata + n_han) / greatest(n_letters, 1) AS japanese_ratio,
    n_hira / greatest(n_hira + n_kata + n_han, 1) AS hiragana_ratio,
    n_kata / greatest(n_hira + n_kata + n_han, 1) AS katakana_ratio,
    coalesce(list_avg(list_transform(sentences, lambda s: length(s))), 0) AS mean_sentence_chars,
    coalesce(list_max(list_transform(sentences, lambda s: length(s))), 0) AS max_sentence_chars,
    row_number() OVER (PARTITION BY url ORDER BY fetched_at DESC, doc_id) AS fetch_rank
  FROM counted
)
SELECT scored.* EXCLUDE (sentences, n_hira, n_kata, n_han, n_letters),
  list_filter([{rules},
    CASE WHEN blocked THEN 'blocked_domain' END,
    CASE WHEN fetch_rank > 1 THEN 'superseded' END
  ], lambda x: x IS NOT NULL) AS reasons
FROM scored JOIN thresholds t USING (source, genre)
"""


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def is_blocked(url: str, domains: list[str]) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return any(host == d or host.endswith("." + d) for d in domains)


def _rules_sql() -> str:
    # Documents too long to score are only too_long: their text is not scored.
    return ",\n    ".join(
        f"CASE WHEN scored.{sig} {op} t.{th} THEN '{reason}' END" if sig == "n_chars"
        else f"CASE WHEN scored.n_chars <= t.max_chars AND scored.{sig} {op} t.{th} THEN '{reason}' END"
        for reason, sig, op, th in RULES
    )


def _score(batch: pa.RecordBatch, settings: CleanSettings) -> pa.Table:
    """One batch of extracted pages, normalized, with their Python-side signals."""
    ng = quality.ng_pattern(tuple(settings.ng_words), settings.bundled_ng_words)
    blocked = [d.lower().lstrip(".") for d in settings.blocked_domains]
    out: dict[str, list] = {k: [] for k in ("url", "source", "genre", "fetched_at", "title", "text", "doc_id", "n_chars", "blocked", *quality.SIGNAL_NAMES)}
    limits: dict[tuple[str, str], int] = {}
    for row in batch.to_pylist():
        text = normalize(row["text"] or "", settings.normal_form, settings.content_tags)
        key = (row["source"], row["genre"])
        if key not in limits:
            limits[key] = settings.thresholds(*key).max_chars
        limit = limits[key]
        scored = quality.signals(text, ng) if len(text) <= limit else dict.fromkeys(quality.SIGNAL_NAMES)
        for k in ("url", "source", "genre", "fetched_at", "title"):
            out[k].append(row[k])
        out["doc_id"].append(doc_id(text))
        out["n_chars"].append(len(text))
        # Too long to score: SQL sees a stub; the document is dropped as too_long anyway.
        out["text"].append(text if len(text) <= limit else "")
        out["blocked"].append(is_blocked(row["url"], blocked))
        for k in quality.SIGNAL_NAMES:
            out[k].append(scored[k])
    return pa.table(out)


def _extracted_batches(storage: Storage, files: list[str], batch_docs: int) -> Iterator[pa.RecordBatch]:
    for path in files:
        # Closed explicitly: a Parquet reader left to the interpreter's final
        # teardown can abort the process at exit (apache/arrow#34314).
        with storage.fs.open(storage.path(path), "rb") as f, pq.ParquetFile(f, pre_buffer=False) as reader:
            yield from reader.iter_batches(batch_size=batch_docs, use_threads=False)


def _signal_batches(storage: Storage, files: list[str], settings: CleanSettings) -> Iterator[pa.Table]:
    """Normalized documents with their Python-side signals, in input order, a slice of a batch at a time.

    ``workers`` processes score slices of at most ``POOL_SLICE_DOCS`` documents.
    """
    slices = (
        b.slice(i, POOL_SLICE_DOCS)
        for b in _extracted_batches(storage, files, settings.batch_docs)
        for i in range(0, b.num_rows, POOL_SLICE_DOCS)
    )
    yield from pool_map(functools.partial(_score, settings=settings), slices, settings.workers or os.cpu_count() or 1)


def _thresholds_table(settings: CleanSettings, pairs: list[tuple[str, str]]) -> pa.Table:
    rows = [{"source": s, "genre": g, **settings.thresholds(s, g).model_dump()} for s, g in pairs]
    return pa.Table.from_pylist(rows)


def clean(
    storage: Storage, extracted: list[str], earlier_dropped: list[str], settings: CleanSettings, out: str
) -> dict:
    """Clean the extracted tables ``extracted`` into ``out``/docs.parquet and dropped.parquet.

    ``earlier_dropped`` (the extract stage's drops) are carried into this
    stage's dropped table, so one table explains every page that is not kept.
    """
    with tempfile.TemporaryDirectory(prefix="jagpt-clean-") as tmp:
        signals_path = os.path.join(tmp, "signals.parquet")
        writer = None
        pairs: set[tuple[str, str]] = set()
        documents = 0
        for table in _signal_batches(storage, extracted, settings):
            pairs.update(zip(table["source"].to_pylist(), table["genre"].to_pylist()))
            # The input order breaks ties in the sorts below (exact copies share a doc id).
            table = table.append_column("pos", pa.array(range(documents, documents + table.num_rows), pa.int64()))
            documents += table.num_rows
            if writer is None:
                writer = pq.ParquetWriter(signals_path, table.schema)
            writer.write_table(table)
        if writer is None:
            return _write(storage, out, None, None, earlier_dropped, 0)
        writer.close()

        con = duckdb.connect()
        con.execute(f"SET memory_limit = '{settings.memory_limit}'")
        con.execute(f"SET temp_directory = '{tmp}'")
        con.register("thresholds", _thresholds_table(settings, sorted(pairs)))
        con.execute(f"CREATE VIEW signals AS SELECT * FROM read_parquet('{signals_path}')")
        # A table, not a view: the kept and the dropped queries below would each compute every signal again.
        con.execute("CREATE TABLE scored AS " + SIGNALS_SQL.replace("{rules}", _rules_sql()))
        signal_struct = "{" + ", ".join(f"{s}: round({s}, 4)" for s in ALL_SIGNALS) + "}"
        kept_path, dropped_path = os.path.join(tmp, "kept.parquet"), os.path.join(tmp, "dropped.parquet")
        con.execute(
            f"""COPY (SELECT doc_id, url, source, genre, fetched_at, title, text, n_chars, hiragana_ratio,
                        japanese_ratio, katakana_ratio, NULL::VARCHAR AS dup_cluster,
                        to_json({signal_struct})::VARCHAR AS signals
                      FROM scored WHERE len(reasons) = 0 ORDER BY doc_id, pos)
                TO '{kept_path}' (FORMAT parquet)"""
        )
        con.execute(
            f"""COPY (SELECT url, source, genre, fetched_at, 'clean' AS stage, reasons,
                        to_json({signal_struct})::VARCHAR AS detail, doc_id, n_chars
                      FROM scored WHERE len(reasons) > 0 ORDER BY url, doc_id, pos)
                TO '{dropped_path}' (FORMAT parquet)"""
        )
        con.close()
        return _write(storage, out, kept_path, dropped_path, earlier_dropped, documents)


def _write(storage: Storage, out: str, kept_path: str | None, dropped_path: str | None, earlier: list[str], documents: int) -> dict:
    kept = conform(pq.read_table(kept_path), DOC) if kept_path else DOC.empty_table()
    tables = [conform(storage.read_parquet([p]), DROPPED) for p in earlier]
    if dropped_path:
        tables.append(conform(pq.read_table(dropped_path), DROPPED))
    dropped = pa.concat_tables(tables) if tables else DROPPED.empty_table()
    storage.write_parquet(f"{out}/docs.parquet", kept)
    storage.write_parquet(f"{out}/dropped.parquet", dropped)
    return {"documents": documents, "kept": kept.num_rows, "dropped": reason_counts(dropped)}


def reason_counts(dropped: pa.Table) -> dict[str, int]:
    """How many documents each reason dropped (a document may have several)."""
    counts: dict[str, int] = {}
    for reasons in dropped["reasons"].to_pylist():
        for r in reasons:
            counts[r] = counts.get(r, 0) + 1
    return dict(sorted(counts.items()))
