"""One storage root for every stage: a local folder or ``gs://bucket/prefix``.

Everything a stage reads or writes goes through :class:`Storage`, addressed by a
path relative to the root. Writes are atomic: a reader never sees half a file.

* Local folders: write to a temporary sibling, then ``os.replace`` it into place.
* Object stores (``gs://``): an object becomes visible only when its upload
  completes, so a direct write is already atomic. A rename there would be a
  copy plus a delete, which is slower and no safer.

Folders that hold several files are published with a ``_SUCCESS.json`` marker
written last (see :mod:`corpus.steps`); readers trust only marked folders.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# gcsfs reads this when it is imported; the experimental zonal/HNS bucket probe
# fails against emulators and costs an extra request per bucket on real GCS.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

MARKER = "_SUCCESS.json"

log = logging.getLogger(__name__)


def retrying(fn: Callable[[], Any], attempts: int, what: str, first_wait_s: float = 0.5) -> Any:
    """``fn()``, tried up to ``attempts`` times with doubling waits: for writes to object stores,
    where a dropped connection or a 503 is worth another try. The last failure is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - object stores raise many kinds; the last one is re-raised
            if attempt == attempts:
                raise
            wait = first_wait_s * 2 ** (attempt - 1)
            log.warning("%s failed (attempt %d of %d: %s); retrying in %.1f s", what, attempt, attempts, e, wait)
            time.sleep(wait)


class Storage:
    """A storage root plus the few operations the stages need."""

    def __init__(self, root: str, options: dict[str, Any] | None = None):
        self.options = dict(options or {})
        protocol, _ = fsspec.core.split_protocol(root)
        self.protocol = protocol or "file"
        if self.protocol == "file":
            root = os.path.abspath(os.path.expanduser(fsspec.core.strip_protocol(root)))
        self.root = root.rstrip("/")
        self.fs = fsspec.filesystem(self.protocol, **self.options)
        self.is_local = self.protocol == "file"

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # -- addressing -------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path of a relative location (no protocol)."""
        base = self.fs._strip_protocol(self.root) if not self.is_local else self.root
        return posixpath.join(base, *[p.strip("/") for p in parts if p])

    def url(self, *parts: str) -> str:
        """The full URL of a relative location, for people and for logs."""
        p = self.path(*parts)
        return p if self.is_local else f"{self.protocol}://{p}"

    # -- reading ----------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty if it does not exist."""
        p = self.path(rel)
        if not self.fs.exists(p):
            return []
        self.fs.invalidate_cache(p)
        return sorted(posixpath.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False))

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching ``pattern`` (relative to the root)."""
        self.fs.invalidate_cache()
        base = self.path("")
        return sorted(posixpath.relpath(p, base) for p in self.fs.glob(self.path(pattern)))

    def read_parquet(self, rels: list[str], columns: list[str] | None = None) -> pa.Table:
        tables = []
        for rel in rels:
            with self.fs.open(self.path(rel), "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        if not tables:
            raise FileNotFoundError("no parquet files given")
        return pa.concat_tables(tables, promote_options="default")

    def parquet_rows(self, rel: str) -> int:
        """Rows in a Parquet file, from its footer."""
        with self.fs.open(self.path(rel), "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows

    def iter_parquet(
        self, rels: list[str], columns: list[str] | None = None, batch_size: int = 1024
    ) -> Iterator[pa.RecordBatch]:
        """The rows of ``rels``, file after file, one record batch at a time (bounded memory).

        ``pre_buffer=False``: pyarrow's pre-buffering reads every row group
        ahead, which holds the whole file in memory.
        """
        for rel in rels:
            with self.fs.open(self.path(rel), "rb") as f:
                yield from pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=batch_size, columns=columns)

    # -- DuckDB -----------------------------------------------------------
    def register_duckdb(self, con) -> None:
        """Let DuckDB connection ``con`` read files under this root (fsspec for remote roots)."""
        if not self.is_local:
            con.register_filesystem(self.fs)

    def duckdb_url(self, rel: str) -> str:
        """How DuckDB names ``rel`` once :meth:`register_duckdb` was called."""
        return self.path(rel) if self.is_local else self.url(rel)

    # -- writing (atomic) -------------------------------------------------
    @contextmanager
    def open_atomic(self, rel: str, exclusive: bool = False) -> Iterator[io.BufferedWriter]:
        """Open ``rel`` for binary writing; it appears whole on success, never otherwise.

        ``exclusive``: never replace an existing ``rel``; closing raises
        FileExistsError instead (and nothing is written), even when two
        writers race.
        """
        final = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                # link fails if the name exists; replace is atomic either way.
                (os.link if exclusive else os.replace)(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            buf = io.BytesIO()
            yield buf  # type: ignore[misc]
            # One upload, so the object appears whole. mode="create" sends ifGenerationMatch=0:
            # of two writers, the second gets 412 (FileExistsError) on GCS.
            self.fs.pipe_file(final, buf.getvalue(), **({"mode": "create"} if exclusive else {}))

    def create(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` whole if it does not exist; False (nothing written) if it does."""
        try:
            with self.open_atomic(rel, exclusive=True) as f:
                f.write(data)
        except FileExistsError:
            return False
        return True

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_atomic(rel) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")

    def write_parquet(self, rel: str, table: pa.Table, compression: str = "zstd") -> None:
        with self.open_atomic(rel) as f:
            pq.write_table(table, f, compression=compression)

    def put_dir(self, local_dir: str, rel: str) -> None:
        """Upload a finished local folder to ``rel`` (each file written atomically)."""
        for dirpath, _, files in os.walk(local_dir):
            for name in sorted(files):
                src = os.path.join(dirpath, name)
                sub = os.path.relpath(src, local_dir).replace(os.sep, "/")
                with open(src, "rb") as f, self.open_atomic(posixpath.join(rel, sub)) as out:
                    shutil.copyfileobj(f, out)

    def get_dir(self, rel: str, local_dir: str) -> None:
        """Download folder ``rel`` into ``local_dir``."""
        base = self.path(rel)
        self.fs.invalidate_cache(base)
        for src in self.fs.find(base):
            sub = posixpath.relpath(src, base)
            dst = os.path.join(local_dir, *sub.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with self.fs.open(src, "rb") as f, open(dst, "wb") as out:
                shutil.copyfileobj(f, out)

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    # -- markers ----------------------------------------------------------
    def is_published(self, rel: str) -> bool:
        return self.exists(posixpath.join(rel, MARKER))

    def publish(self, rel: str, info: dict[str, Any]) -> None:
        """Mark folder ``rel`` complete. Written last, after every file in it."""
        self.write_json(posixpath.join(rel, MARKER), info)

    def marker(self, rel: str) -> dict[str, Any]:
        return self.read_json(posixpath.join(rel, MARKER))
