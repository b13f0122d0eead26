"""Item pipeline: pages go to Parquet parts in batches, each part published atomically."""

from __future__ import annotations

import json
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from corpus.schema import RAW_PAGE


class ParquetPagePipeline:
    """Writes new and changed pages; pages whose bytes match the last stored copy
    are counted as unchanged and not written again."""

    def __init__(self, crawler):
        self.stats = crawler.stats
        s = crawler.settings
        self.out_dir = s.get("JAGPT_OUT_DIR")
        self.batch_rows = s.getint("JAGPT_BATCH_ROWS", 200)
        self.label = s.get("JAGPT_SOURCE", "")
        with open(s.get("JAGPT_SEEN_FILE"), encoding="utf-8") as f:
            self.seen: dict[str, str] = json.load(f)
        self.rows: list[dict] = []
        self.part = 0
        self.written = 0
        self.last_progress = 0.0

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def process_item(self, item, spider=None):
        previous = self.seen.get(item["url"])
        if previous == item["content_sha1"]:
            self.stats.inc_value("jagpt/pages/unchanged")
        else:
            self.stats.inc_value("jagpt/pages/new" if previous is None else "jagpt/pages/changed")
            self.seen[item["url"]] = item["content_sha1"]
            self.rows.append(item)
            if len(self.rows) >= self.batch_rows:
                self.flush()
        self.progress()
        return item

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_progress >= 2.0:
            self.last_progress = now
            g = self.stats.get_value
            print(
                f"[crawl {self.label}] fetched={g('response_received_count', 0)} "
                f"new={g('jagpt/pages/new', 0)} changed={g('jagpt/pages/changed', 0)} "
                f"unchanged={g('jagpt/pages/unchanged', 0)}",
                file=sys.stdout,
                flush=True,
            )

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=RAW_PAGE)
        final = os.path.join(self.out_dir, f"part-{self.part:05d}.parquet")
        tmp = final + ".tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, final)
        self.part += 1
        self.written += len(self.rows)
        self.rows = []

    def close_spider(self, spider=None):
        self.flush()
        self.progress(force=True)
