"""Data contracts: the Arrow schemas of every Parquet table jagpt writes.

docs/architecture.md describes each column; tests check the files against these.
"""

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

RAW_PAGE = pa.schema(
    [
        ("url", pa.string()),
        ("final_url", pa.string()),
        ("source", pa.string()),
        ("genre", pa.string()),
        ("run_id", pa.string()),
        ("fetched_at", TS),
        ("http_status", pa.int32()),
        ("content_type", pa.string()),
        ("encoding", pa.string()),
        ("encoding_source", pa.string()),
        ("charset_declared", pa.string()),
        ("depth", pa.int32()),
        ("content_sha1", pa.string()),
        ("body", pa.binary()),
    ]
)

EXTRACTED = pa.schema(
    [
        ("url", pa.string()),
        ("source", pa.string()),
        ("genre", pa.string()),
        ("fetched_at", TS),
        ("content_sha1", pa.string()),
        ("title", pa.string()),
        ("published", pa.string()),
        ("lang", pa.string()),
        ("text", pa.string()),
    ]
)

DOC = pa.schema(
    [
        ("doc_id", pa.string()),
        ("url", pa.string()),
        ("source", pa.string()),
        ("genre", pa.string()),
        ("fetched_at", TS),
        ("title", pa.string()),
        ("text", pa.string()),
        ("n_chars", pa.int64()),
        ("hiragana_ratio", pa.float64()),
        ("japanese_ratio", pa.float64()),
        ("katakana_ratio", pa.float64()),
        ("dup_cluster", pa.string()),
        ("signals", pa.string()),  # JSON: every quality signal's value
    ]
)

DROPPED = pa.schema(
    [
        ("url", pa.string()),
        ("source", pa.string()),
        ("genre", pa.string()),
        ("fetched_at", TS),
        ("stage", pa.string()),
        ("reasons", pa.list_(pa.string())),
        ("detail", pa.string()),
        ("doc_id", pa.string()),
        ("n_chars", pa.int64()),
    ]
)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast ``table`` to ``schema``; a missing column is an error."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"table lacks columns {missing} of the contract")
    return table.select(schema.names).cast(schema)
