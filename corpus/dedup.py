"""Exact and near-duplicate removal, incremental: one link of a chain per cleaned partition.

The corpus is a fold over the raw partitions in chronological order. Link ``i``
dedups partition ``i`` against itself and against the index that links
``0 .. i-1`` left behind, then appends: its kept documents join the corpus, and
every document it saw joins the index. One run over the union of two weeks is
therefore the same computation as two weekly runs.

* Exact duplicates: same hash of the normalized text as an earlier document
  (an earlier link, or a copy earlier in this partition by the keeper order).
* Near duplicates: MinHash over character 5-grams (``shingle_chars``),
  documents cut to ``max_chars`` first. With ``b`` bands of ``r`` rows, a pair
  of Jaccard similarity J becomes a candidate with probability
  ``1 - (1 - J**r)**b``; the default 18 x 9 gives 0.925 at J = 0.8 and 0.035 at
  J = 0.5. Candidates come from equal band hashes, within the partition and
  against the index (DuckDB joins over Parquet, with a memory limit), and are
  verified by their estimated Jaccard (the share of equal signature values).
* Clusters are the connected components of the verified pairs, found by a
  union-find fed one batch of pairs at a time: memory grows with the documents
  that have a verified pair, never with all pairs.
* A cluster that reaches a document of an earlier link drops every document of
  this partition in it (the corpus only grows by appending). Otherwise it keeps
  one member, the earliest fetched, then the longest, then the smallest doc id,
  and drops the rest.

A link writes, under its folder::

    docs.parquet              DOC: this partition's kept documents
    dropped.parquet           DROPPED: the partition's extract and clean drops, then
                              exact_duplicate and near_duplicate
    index/bands.parquet       BANDS: (band, hash, doc_id) of every document of the
                              partition that is not an exact copy, kept or dropped, so
                              a later near duplicate of a dropped one is still found
    index/signatures.parquet  (doc_id, signature): the MinHash values, fixed-size binary
    index/exact.parquet       EXACT: (text_hash, doc_id, kept_doc_id)
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from corpus.clean import POOL_SLICE_DOCS
from corpus.pool import pool_map
from corpus.schema import DOC, DROPPED, conform
from corpus.settings import Settings
from corpus.storage import Storage

log = logging.getLogger(__name__)

BANDS = pa.schema([("band", pa.int16()), ("hash", pa.int64()), ("doc_id", pa.string())])
EXACT = pa.schema([("text_hash", pa.binary(16)), ("doc_id", pa.string()), ("kept_doc_id", pa.string())])


def signatures_schema(settings: DedupSettings) -> pa.Schema:
    return pa.schema([("doc_id", pa.string()), ("signature", pa.binary(4 * settings.bands * settings.rows))])


class DedupSettings(Settings):
    shingle_chars: int = Field(default=5, ge=1)
    bands: int = Field(default=18, ge=1)
    rows: int = Field(default=9, ge=1)
    threshold: float = Field(default=0.7, gt=0, le=1, description="estimated Jaccard to call a pair duplicate")
    max_chars: int = Field(default=500_000, gt=0, description="documents are cut to this before shingling")
    seed: int = 1
    # Runtime only (kept out of the step key): how fast, never what.
    memory_limit: str = "2GB"
    batch_docs: int = Field(default=1000, gt=0, description="documents per signature batch; pairs are read 10x as many at a time")
    workers: int = Field(default=0, ge=0, description="processes for the signatures; 0 means one per core")


def detection_probability(j: float, bands: int, rows: int) -> float:
    """Probability that a pair of Jaccard similarity ``j`` shares at least one band."""
    return 1.0 - (1.0 - j**rows) ** bands


# -- signatures ---------------------------------------------------------------


@lru_cache(maxsize=8)
def _permutations(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    return a, b


def minhash(text: str, settings: DedupSettings) -> np.ndarray:
    """The MinHash signature (bands * rows 32-bit values) of ``text``.

    Each character k-gram is hashed to 32 bits (a polynomial rolling hash,
    folded); each permutation is multiply-shift hashing, ``(a*x + b) mod
    2**64``, top 32 bits, taken once on the minimum since the shift is
    monotonic. Repeated k-grams change no minimum, so they are not removed.
    """
    from corpus.kernels import code_points, minhash_mins

    a, b = _permutations(settings.bands * settings.rows, settings.seed)
    k = settings.shingle_chars
    codes = code_points(text[: settings.max_chars])
    if len(codes) < k:
        codes = np.pad(codes, (0, k - len(codes)))
    return minhash_mins(codes, k, a, b)


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One signed 64-bit hash per band: shape (documents, bands)."""
    v = sigs.reshape(len(sigs), bands, rows).astype(np.uint64)
    h = np.full(v.shape[:2], 0xCBF29CE484222325, dtype=np.uint64)
    for i in range(rows):
        h = (h ^ v[:, :, i]) * np.uint64(0x100000001B3)
    h ^= h >> np.uint64(31)
    return h.view(np.int64)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal signature values, row by row."""
    return (a == b).mean(axis=-1)


def text_hash(text: str) -> bytes:
    """The exact-duplicate key: 16 bytes of BLAKE2b of the normalized text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class UnionFind:
    """Union-find over ids that appear as they come (memory: the ids seen)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent.setdefault(x, x)
        while parent != x:
            grand = self.parent[parent]
            self.parent[x] = grand
            x, parent = parent, grand
        return x

    def union(self, x: str, y: str) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            lo, hi = sorted((rx, ry))
            self.parent[hi] = lo


# -- the link -----------------------------------------------------------------


def _reader(con: duckdb.DuckDBPyConnection, sql: str, batch: int) -> Iterator[pa.RecordBatch]:
    rel = con.sql(sql)
    reader = rel.to_arrow_reader(batch) if hasattr(rel, "to_arrow_reader") else rel.fetch_arrow_reader(batch)
    yield from reader


def _matrix(column: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """A binary column of equal-length signatures as a (rows, width) uint32 matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, width), np.uint32)
    if not pa.types.is_fixed_size_binary(column.type):
        column = column.cast(pa.binary(4 * width))
    data = np.frombuffer(column.buffers()[1], dtype=np.uint8)
    start = column.offset * 4 * width
    return data[start : start + len(column) * 4 * width].view(np.uint32).reshape(len(column), width)


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def _write_query(con, storage: Storage, rel: str, sql: str, schema: pa.Schema, batch: int) -> int:
    """Stream a query's rows into ``rel`` (Parquet, ``schema``); returns the row count."""
    rows = 0
    with storage.open_atomic(rel) as f:
        with pq.ParquetWriter(f, schema, compression="zstd") as writer:
            for b in _reader(con, sql, batch):
                writer.write_table(conform(pa.Table.from_batches([b]), schema))
                rows += b.num_rows
    return rows


class _Marks:
    """A stream of (position, flag) rows sorted by position, taken in order (memory: one batch)."""

    def __init__(self, batches: Iterator[pa.RecordBatch]):
        self.batches = batches
        self.pos = np.zeros(0, np.int64)
        self.flag = np.zeros(0, bool)
        self.done = False

    def below(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        while not self.done and (len(self.pos) == 0 or self.pos[-1] < limit):
            try:
                b = next(self.batches)
            except StopIteration:
                self.done = True
                break
            self.pos = np.concatenate([self.pos, b.column(0).to_numpy().astype(np.int64)])
            self.flag = np.concatenate([self.flag, b.column(1).to_numpy(zero_copy_only=False).astype(bool)])
        k = int(np.searchsorted(self.pos, limit))
        taken = self.pos[:k], self.flag[:k]
        self.pos, self.flag = self.pos[k:], self.flag[k:]
        return taken


def _write_kept(con, storage: Storage, rel: str, work: str, batch: int) -> int:
    """The partition's documents minus this link's drops, in their order, with ``dup_cluster`` set.

    Streams the local work file against the sorted positions DuckDB gives, so
    no query ever sorts the texts.
    """
    marks = _Marks(_reader(con, MARKED_POS_SQL, batch * 10))
    rows = 0
    # pre_buffer=False here and below: pre-buffering reads every row group ahead, the whole file.
    with open(work, "rb") as src, storage.open_atomic(rel) as f, pq.ParquetWriter(f, DOC, compression="zstd") as writer:
        for b in pq.ParquetFile(src, pre_buffer=False).iter_batches(batch_size=batch):
            t = pa.Table.from_batches([b])
            pos = t["pos"].to_numpy()
            marked, dropped = marks.below(int(pos[-1]) + 1)
            keep = ~np.isin(pos, marked[dropped])
            has_dups = np.isin(pos, marked[~dropped])
            cluster = pa.array([d if h else None for d, h in zip(t["doc_id"].to_pylist(), has_dups.tolist())], pa.string())
            t = t.set_column(t.schema.get_field_index("dup_cluster"), "dup_cluster", cluster).filter(pa.array(keep))
            writer.write_table(conform(t, DOC))
            rows += t.num_rows
    return rows


def _hash_texts(texts: pa.Array, settings: DedupSettings) -> tuple[np.ndarray, list[bytes]]:
    """The MinHash signatures (a matrix) and the exact-duplicate keys of some texts."""
    values = [t or "" for t in texts.to_pylist()]
    if not values:
        return np.zeros((0, settings.bands * settings.rows), np.uint32), []
    return np.stack([minhash(t, settings) for t in values]), [text_hash(t) for t in values]


def _signature_pass(storage: Storage, docs: str, settings: DedupSettings, work: str, bands: str) -> int:
    """Copy the partition's documents to a local work file with their hashes and signatures."""
    n = settings.bands * settings.rows
    with storage.fs.open(storage.path(docs), "rb") as f:
        source = pq.ParquetFile(f, pre_buffer=False)
        schema = source.schema_arrow
        work_schema = schema.append(pa.field("pos", pa.int64())).append(pa.field("text_hash", pa.binary(16)))
        work_schema = work_schema.append(pa.field("signature", pa.binary(4 * n)))
        band_schema = pa.schema([("pos", pa.int64()), ("band", pa.int16()), ("hash", pa.int64()), ("doc_id", pa.string())])
        pos = 0
        with pq.ParquetWriter(work, work_schema) as w, pq.ParquetWriter(bands, band_schema) as wb:
            # The signatures are computed by worker processes, a slice of a batch each; the work
            # file is still written a whole batch at a time.
            ours, theirs = itertools.tee(source.iter_batches(batch_size=settings.batch_docs))
            text_column = schema.get_field_index("text")
            slices = (b.column(text_column).slice(i, POOL_SLICE_DOCS) for b in theirs for i in range(0, b.num_rows, POOL_SLICE_DOCS))
            hashed = pool_map(functools.partial(_hash_texts, settings=settings), slices, settings.workers or os.cpu_count() or 1)
            for batch in ours:
                parts = [next(hashed) for _ in range(0, batch.num_rows, POOL_SLICE_DOCS)]
                sigs = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, n), np.uint32)
                ids = batch.column(schema.get_field_index("doc_id")).to_pylist()
                positions = np.arange(pos, pos + batch.num_rows, dtype=np.int64)
                table = pa.Table.from_batches([batch]).append_column("pos", pa.array(positions))
                table = table.append_column("text_hash", pa.array([h for p in parts for h in p[1]], pa.binary(16)))
                table = table.append_column("signature", pa.array([s.tobytes() for s in sigs], pa.binary(4 * n)))
                w.write_table(table)
                bh = band_hashes(sigs, settings.bands, settings.rows)
                wb.write_table(
                    pa.table(
                        {
                            "pos": np.repeat(positions, settings.bands),
                            "band": np.tile(np.arange(settings.bands, dtype=np.int16), batch.num_rows),
                            "hash": bh.reshape(-1),
                            "doc_id": pa.array(np.repeat(np.array(ids, dtype=object), settings.bands), pa.string()),
                        },
                        schema=band_schema,
                    )
                )
                pos += batch.num_rows
            for _ in hashed:  # every slice is taken; this lets the workers stop
                pass
    return pos


EXACT_SQL = """
CREATE TABLE docs AS
  SELECT pos, doc_id, url, source, genre, fetched_at, n_chars, text_hash,
    row_number() OVER w AS copy_rank, first_value(pos) OVER w AS first_pos
  FROM read_parquet({work})
  WINDOW w AS (PARTITION BY text_hash ORDER BY fetched_at, n_chars DESC, doc_id, url, pos);
CREATE TABLE prior AS
  SELECT d.pos, e.doc_id AS prior_id, e.kept_doc_id AS prior_kept FROM docs d JOIN ({earlier_exact}) e USING (text_hash);
CREATE TABLE survivors AS
  SELECT pos, doc_id, text_hash FROM docs WHERE copy_rank = 1 AND pos NOT IN (SELECT pos FROM prior);
CREATE TABLE sb AS
  SELECT band, hash, doc_id FROM read_parquet({bands}) WHERE pos IN (SELECT pos FROM survivors);
CREATE TABLE sig AS
  SELECT doc_id, signature FROM read_parquet({work}) WHERE pos IN (SELECT pos FROM survivors);
"""

# Candidate pairs (a: this partition, b: this partition or an earlier link) with both signatures.
WITHIN_SQL = """
SELECT c.a, c.b, s1.signature AS sa, s2.signature AS sb
FROM (SELECT DISTINCT x.doc_id AS a, y.doc_id AS b FROM sb x JOIN sb y
      ON x.band = y.band AND x.hash = y.hash AND x.doc_id < y.doc_id) c
JOIN sig s1 ON s1.doc_id = c.a JOIN sig s2 ON s2.doc_id = c.b
"""
ACROSS_SQL = """
SELECT c.a, c.b, s1.signature AS sa, s2.signature AS sb
FROM (SELECT DISTINCT x.doc_id AS a, y.doc_id AS b FROM sb x JOIN read_parquet({bands}) y
      ON x.band = y.band AND x.hash = y.hash) c
JOIN sig s1 ON s1.doc_id = c.a JOIN read_parquet({signatures}) s2 ON s2.doc_id = c.b
"""

# Every drop of the link: the document it duplicates and the corpus document kept for its cluster.
DROPS_SQL = """
CREATE TABLE drops AS
  SELECT d.pos, 'exact_duplicate' AS reason, p.prior_kept AS kept_doc_id, p.prior_id AS matched_doc_id, 1.0 AS jaccard
    FROM docs d JOIN prior p USING (pos)
  UNION ALL
  SELECT d.pos, 'exact_duplicate', coalesce(nr.kept_doc_id, f.doc_id), f.doc_id, 1.0
    FROM docs d JOIN docs f ON f.pos = d.first_pos LEFT JOIN near nr ON nr.doc_id = f.doc_id
    WHERE d.copy_rank > 1 AND d.pos NOT IN (SELECT pos FROM prior)
  UNION ALL
  SELECT s.pos, 'near_duplicate', nr.kept_doc_id, nr.matched_doc_id, nr.jaccard
    FROM survivors s JOIN near nr USING (doc_id)
"""

# Positions, in the partition's order, of the documents this link drops (dropped = true) and of
# the kept ones it dropped duplicates of (dropped = false).
MARKED_POS_SQL = """
SELECT pos, true AS dropped FROM drops
UNION ALL
SELECT pos, false FROM docs WHERE doc_id IN (SELECT kept_doc_id FROM drops) AND pos NOT IN (SELECT pos FROM drops)
ORDER BY pos
"""

DROPPED_SQL = """
SELECT d.url, d.source, d.genre, d.fetched_at, 'dedup' AS stage, [x.reason] AS reasons,
  to_json({kept_doc_id: x.kept_doc_id, matched_doc_id: x.matched_doc_id, jaccard: x.jaccard})::VARCHAR AS detail,
  d.doc_id, d.n_chars
FROM drops x JOIN docs d USING (pos) ORDER BY d.doc_id, d.url, d.pos
"""

NEAR = pa.schema([("doc_id", pa.string()), ("kept_doc_id", pa.string()), ("matched_doc_id", pa.string()), ("jaccard", pa.float64())])
NO_EARLIER_EXACT = "SELECT NULL::BLOB AS text_hash, NULL::VARCHAR AS doc_id, NULL::VARCHAR AS kept_doc_id WHERE false"


class _Clusters:
    """Verified pairs folded into components, one batch at a time.

    Memory holds the documents of this partition that have a verified pair,
    never the pairs. Ties break on the doc id, so the result does not depend on
    the order the pairs come in.
    """

    def __init__(self) -> None:
        self.uf = UnionFind()
        self.best: dict[str, tuple[int, str]] = {}  # doc -> (-equal values, doc): its closest verified neighbour
        self.best_prior: dict[str, tuple[int, str]] = {}  # doc -> its closest verified document of an earlier link
        self.candidates = self.verified = 0

    def add(self, batch: pa.RecordBatch, width: int, need: float, prior: bool) -> None:
        self.candidates += batch.num_rows
        equal = (_matrix(batch.column(2), width) == _matrix(batch.column(3), width)).sum(axis=1)
        keep = np.nonzero(equal >= need)[0]
        self.verified += len(keep)
        a_ids, b_ids = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        for k in keep.tolist():
            x, y, score = a_ids[k], b_ids[k], -int(equal[k])
            self._closest(self.best, x, (score, y))
            if prior:
                self.uf.find(x)
                self._closest(self.best_prior, x, (score, y))
            else:
                self.uf.union(x, y)
                self._closest(self.best, y, (score, x))

    @staticmethod
    def _closest(table: dict, doc: str, candidate: tuple[int, str]) -> None:
        if candidate < table.get(doc, (1, "")):
            table[doc] = candidate

    def components(self) -> dict[str, list[str]]:
        members: dict[str, list[str]] = {}
        for x in list(self.uf.parent):
            members.setdefault(self.uf.find(x), []).append(x)
        return members


def _near_drops(con, clusters: _Clusters, width: int, earlier_exact: str | None) -> pa.Table:
    """Decide each component: which member stays, or none when an earlier link already has the cluster."""
    members = clusters.components()
    con.register("nodes", pa.table({"doc_id": pa.array(list(clusters.uf.parent), pa.string())}))
    order = {  # the keeper order: earliest fetched, then longest, then smallest doc id
        d: (t, -c, d)
        for d, t, c in con.sql(
            """SELECT doc_id, coalesce(epoch_us(fetched_at), 0), n_chars FROM docs
               WHERE copy_rank = 1 AND doc_id IN (SELECT doc_id FROM nodes)"""
        ).fetchall()
    }
    prior = {
        root: min(clusters.best_prior[m] for m in ms if m in clusters.best_prior)
        for root, ms in members.items()
        if any(m in clusters.best_prior for m in ms)
    }
    prior_kept: dict[str, str] = {}
    if prior:
        wanted = sorted({p[1] for p in prior.values()})
        con.register("wanted", pa.table({"doc_id": pa.array(wanted, pa.string())}))
        prior_kept = dict(
            con.sql(f"SELECT doc_id, kept_doc_id FROM read_parquet({earlier_exact}) WHERE doc_id IN (SELECT doc_id FROM wanted)").fetchall()
        )
    near: dict[str, list] = {name: [] for name in NEAR.names}
    for root, ms in members.items():
        if root in prior:
            kept, dropped = prior_kept[prior[root][1]], ms
        else:
            ms = sorted(ms, key=order.__getitem__)
            kept, dropped = ms[0], ms[1:]
        for m in sorted(dropped):
            score, matched = clusters.best[m]
            near["doc_id"].append(m)
            near["kept_doc_id"].append(kept)
            near["matched_doc_id"].append(matched)
            near["jaccard"].append(round(-score / width, 4))
    return pa.table(near, schema=NEAR)


def dedup_partition(
    storage: Storage,
    clean_dir: str,
    earlier: list[str],
    settings: DedupSettings,
    out: str,
    previous: dict | None = None,
) -> dict:
    """Dedup one cleaned partition against itself and the links ``earlier``; write link ``out``.

    ``earlier`` are the folders of all earlier links, oldest first; ``previous``
    is the stats of the link just before (for the running corpus figures).
    """
    width = settings.bands * settings.rows
    need = settings.threshold * width - 1e-9  # equal signature values a verified pair needs
    pair_batch = settings.batch_docs * 10
    with tempfile.TemporaryDirectory(prefix="jagpt-dedup-") as tmp:
        work, work_bands = os.path.join(tmp, "work.parquet"), os.path.join(tmp, "bands.parquet")
        documents = _signature_pass(storage, f"{clean_dir}/docs.parquet", settings, work, work_bands)
        con = duckdb.connect(os.path.join(tmp, "dedup.duckdb"))
        try:
            con.execute(f"SET memory_limit = '{settings.memory_limit}'")
            con.execute(f"SET temp_directory = '{os.path.join(tmp, 'spill')}'")
            con.execute("SET preserve_insertion_order = false")
            storage.register_duckdb(con)
            index = {
                name: _sql_list([storage.duckdb_url(f"{e}/index/{name}.parquet") for e in earlier])
                for name in ("bands", "signatures", "exact")
            }
            earlier_exact = f"SELECT text_hash, doc_id, kept_doc_id FROM read_parquet({index['exact']})" if earlier else NO_EARLIER_EXACT
            con.execute(EXACT_SQL.format(work=_sql_list([work]), bands=_sql_list([work_bands]), earlier_exact=earlier_exact))

            clusters = _Clusters()
            for b in _reader(con, WITHIN_SQL, pair_batch):
                clusters.add(b, width, need, prior=False)
            if earlier:
                for b in _reader(con, ACROSS_SQL.format(bands=index["bands"], signatures=index["signatures"]), pair_batch):
                    clusters.add(b, width, need, prior=True)
            con.register("near_rows", _near_drops(con, clusters, width, index["exact"] if earlier else None))
            con.execute("CREATE TABLE near AS SELECT * FROM near_rows")
            con.unregister("near_rows")
            con.execute(DROPS_SQL)

            # The kept documents, every drop, and the index entries of this partition.
            kept = _write_kept(con, storage, f"{out}/docs.parquet", work, settings.batch_docs)
            reasons: Counter[str] = Counter()
            with (
                storage.open_atomic(f"{out}/dropped.parquet") as f,
                pq.ParquetWriter(f, DROPPED, compression="zstd") as writer,
            ):
                earlier_drops = storage.iter_parquet([f"{clean_dir}/dropped.parquet"], batch_size=pair_batch)
                for b in itertools.chain(earlier_drops, _reader(con, DROPPED_SQL, pair_batch)):
                    t = conform(pa.Table.from_batches([b]), DROPPED)
                    reasons.update(r for rs in t["reasons"].to_pylist() for r in rs)
                    writer.write_table(t)
            for name, sql, schema in (
                ("bands", "SELECT band, hash, doc_id FROM sb ORDER BY band, hash, doc_id", BANDS),
                ("signatures", "SELECT doc_id, signature FROM sig ORDER BY doc_id", signatures_schema(settings)),
                (
                    "exact",
                    """SELECT s.text_hash, s.doc_id, coalesce(nr.kept_doc_id, s.doc_id) AS kept_doc_id
                       FROM survivors s LEFT JOIN near nr USING (doc_id) ORDER BY s.doc_id""",
                    EXACT,
                ),
            ):
                _write_query(con, storage, f"{out}/index/{name}.parquet", sql, schema, pair_batch)

            counts = dict(con.sql("SELECT reason, count(*) FROM drops GROUP BY reason").fetchall())
            clusters_hit = con.sql("SELECT count(DISTINCT kept_doc_id) FROM drops").fetchall()[0][0]
            composition = dict(
                con.sql(
                    f"""SELECT w.genre || ' / ' || w.source, sum(w.n_chars)::BIGINT FROM read_parquet({_sql_list([work])}) w
                        WHERE w.pos NOT IN (SELECT pos FROM drops) GROUP BY 1 ORDER BY 1"""
                ).fetchall()
            )
        finally:
            con.close()

    characters = int(sum(composition.values()))
    before = (previous or {}).get("corpus") or {"links": 0, "documents": 0, "characters": 0, "composition": {}, "dropped": {}}
    stats = {
        "documents": documents,
        "kept": kept,
        "exact_duplicates": counts.get("exact_duplicate", 0),
        "near_duplicates": counts.get("near_duplicate", 0),
        "clusters": clusters_hit,
        "candidate_pairs": clusters.candidates,
        "verified_pairs": clusters.verified,
        "characters": characters,
        # Running totals of the chain up to this link: the whole corpus, for the last link.
        "corpus": {
            "links": before["links"] + 1,
            "documents": before["documents"] + kept,
            "characters": before["characters"] + characters,
            "composition": _add(before["composition"], composition),
            "dropped": _add(before["dropped"], reasons),
        },
    }
    log.info("dedup %s: %s", out, {k: v for k, v in stats.items() if k != "corpus"})
    return stats


def _add(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + int(v)
    return dict(sorted(out.items()))
