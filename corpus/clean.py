"""The clean stage: normalize, filter for Japanese quality, and drop exact duplicates.

The signals are computed in DuckDB SQL over the extracted Parquet; every dropped
document keeps all of its reasons and its signal values.
"""

from __future__ import annotations

import hashlib
import json

import duckdb
import pyarrow as pa
from pydantic import Field

from corpus.normalize import NormalForm, normalize
from corpus.schema import DOC, DROPPED, conform
from corpus.settings import Settings
from corpus.storage import Storage


class CleanSettings(Settings):
    normal_form: NormalForm = "NFKC"
    min_chars: int = Field(default=400, ge=0)
    min_japanese_ratio: float = Field(default=0.5, ge=0, le=1, description="Japanese chars / letters")
    min_hiragana_ratio: float = Field(default=0.2, ge=0, le=1, description="hiragana / Japanese chars")
    max_katakana_ratio: float = Field(default=0.5, ge=0, le=1, description="katakana / Japanese chars")
    min_mean_sentence_chars: float = Field(default=20, ge=0)
    max_mean_sentence_chars: float = Field(default=90, gt=0)
    max_sentence_chars: int = Field(default=200, gt=0, description="longest sentence; catches link lists and menus")
    memory_limit: str = "2GB"


def arrow_of(relation) -> pa.Table:
    result = relation.arrow()
    return result.read_all() if isinstance(result, pa.RecordBatchReader) else result


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


SIGNALS_SQL = r"""
WITH counted AS (
  SELECT *,
    length(text) AS n_chars,
    length(regexp_replace(text, '[^\p{Hiragana}]', '', 'g')) AS n_hira,
    length(regexp_replace(text, '[^\p{Katakana}ー]', '', 'g')) AS n_kata,
    length(regexp_replace(text, '[^\p{Han}々〆]', '', 'g')) AS n_han,
    length(regexp_replace(text, '[^\p{L}]', '', 'g')) AS n_letters,
    list_filter(string_split_regex(text, '[。！？!?\n]+'), lambda s: length(trim(s)) > 0) AS sentences
  FROM docs
), ratios AS (
  SELECT *,
    (n_hira + n_kata + n_han) / greatest(n_letters, 1) AS japanese_ratio,
    n_hira / greatest(n_hira + n_kata + n_han, 1) AS hiragana_ratio,
    n_kata / greatest(n_hira + n_kata + n_han, 1) AS katakana_ratio,
    coalesce(list_avg(list_transform(sentences, lambda s: length(s))), 0) AS mean_sentence_chars,
    coalesce(list_max(list_transform(sentences, lambda s: length(s))), 0) AS max_sentence_chars,
    row_number() OVER (PARTITION BY url ORDER BY fetched_at DESC) AS fetch_rank
  FROM counted
), ranked AS (
  -- Only the newest fetch of each URL competes for a doc id, so a page that
  -- was refetched unchanged is never dropped twice over.
  SELECT *, row_number() OVER (PARTITION BY doc_id, fetch_rank = 1 ORDER BY fetched_at, url) AS copy_rank
  FROM ratios
)
SELECT *,
  list_filter([
    CASE WHEN n_chars < $min_chars THEN 'too_short' END,
    CASE WHEN japanese_ratio < $min_japanese_ratio THEN 'not_japanese' END,
    CASE WHEN hiragana_ratio < $min_hiragana_ratio THEN 'low_hiragana' END,
    CASE WHEN katakana_ratio > $max_katakana_ratio THEN 'high_katakana' END,
    CASE WHEN mean_sentence_chars < $min_mean_sentence_chars THEN 'short_sentences' END,
    CASE WHEN mean_sentence_chars > $max_mean_sentence_chars THEN 'long_sentences' END,
    CASE WHEN max_sentence_chars > $max_sentence_chars THEN 'overlong_sentence' END,
    CASE WHEN copy_rank > 1 THEN 'exact_duplicate' END,
    CASE WHEN fetch_rank > 1 THEN 'superseded' END
  ], lambda x: x IS NOT NULL) AS reasons
FROM ranked
"""


def clean(
    storage: Storage, extracted: list[str], earlier_dropped: list[str], settings: CleanSettings, out: str
) -> dict:
    """Clean the extracted tables ``extracted`` into ``out``/docs.parquet and dropped.parquet.

    ``earlier_dropped`` (the extract stage's drops) are carried into this
    stage's dropped table, so one table explains every page that is not kept.
    """
    table = storage.read_parquet(extracted)
    texts = [normalize(t, settings.normal_form) for t in table["text"].to_pylist()]
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    table = table.append_column("doc_id", pa.array([doc_id(t) for t in texts], pa.string()))

    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{settings.memory_limit}'")
    con.register("docs", table)
    params = settings.model_dump(exclude={"normal_form", "memory_limit"})
    scored = arrow_of(con.sql(SIGNALS_SQL, params=params))
    con.register("scored", scored)

    kept = arrow_of(con.sql("SELECT *, NULL::VARCHAR AS dup_cluster FROM scored WHERE len(reasons) = 0 ORDER BY doc_id"))
    dropped = arrow_of(
        con.sql(
            """SELECT url, source, genre, fetched_at, 'clean' AS stage, reasons,
                 to_json({n_chars: n_chars, japanese_ratio: round(japanese_ratio, 4),
                          hiragana_ratio: round(hiragana_ratio, 4), katakana_ratio: round(katakana_ratio, 4),
                          mean_sentence_chars: round(mean_sentence_chars, 1), max_sentence_chars: max_sentence_chars})::VARCHAR AS detail,
                 doc_id, n_chars
               FROM scored WHERE len(reasons) > 0 ORDER BY url"""
        )
    )
    previous = [conform(storage.read_parquet([p]), DROPPED) for p in earlier_dropped]
    all_dropped = pa.concat_tables(previous + [conform(dropped, DROPPED)])
    storage.write_parquet(f"{out}/docs.parquet", conform(kept, DOC))
    storage.write_parquet(f"{out}/dropped.parquet", all_dropped)
    return {"documents": table.num_rows, "kept": kept.num_rows, "dropped": reason_counts(all_dropped)}


def reason_counts(dropped: pa.Table) -> dict[str, int]:
    """How many documents each reason dropped (a document may have several)."""
    counts: dict[str, int] = {}
    for reasons in dropped["reasons"].to_pylist():
        for r in reasons:
            counts[r] = counts.get(r, 0) + 1
    return dict(sorted(counts.items()))


def explain(detail: str) -> dict:
    return json.loads(detail) if detail and detail.startswith("{") else {"detail": detail}
