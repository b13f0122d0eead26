"""Item pipeline: pages and fetch-log rows go to Parquet under the storage root
in batches, each file published atomically, so a killed crawl loses at most
the batch in flight and never leaves a half-written file."""

from __future__ import annotations

import sys
import time

import pyarrow as pa

from corpus.schema import RAW_PAGE
from corpus.storage import Storage
from crawlers import state


class ParquetPagePipeline:
    def __init__(self, crawler):
        self.stats = crawler.stats
        s = crawler.settings
        job = s.getdict("JAGPT_JOB")
        self.storage = Storage(job["storage"]["root"], job["storage"]["options"])
        self.run_dir = state.run_dir(job["source"]["name"], job["run_id"])
        self.part = job["first_part"]
        self.batch_rows = s.getint("JAGPT_BATCH_ROWS", 200)
        self.label = job["source"]["name"]
        self.pages: list[dict] = []
        self.fetches: list[dict] = []
        self.last_progress = 0.0

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def process_item(self, item, spider=None):
        self.fetches.append(item["fetch"])
        if "page" in item:
            self.pages.append(item["page"])
        if len(self.fetches) >= self.batch_rows:
            self.flush()
        self.progress()
        return item

    def progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_progress >= 2.0:
            self.last_progress = now
            g = self.stats.get_value
            failed = sum(v for k, v in self.stats.get_stats().items() if k.startswith("jagpt/failed/"))
            print(
                f"[crawl {self.label}] responses={g('response_received_count', 0)} "
                f"new={g('jagpt/pages/new', 0)} changed={g('jagpt/pages/changed', 0)} "
                f"unchanged={g('jagpt/pages/unchanged', 0)} gone={g('jagpt/pages/gone', 0)} failed={failed}",
                file=sys.stdout,
                flush=True,
            )

    def flush(self) -> None:
        # Pages before their log rows: a crash in between leaves stored pages that
        # the resumed run still knows about (it reads both), never a log row
        # claiming a page that is not there.
        if self.pages:
            table = pa.Table.from_pylist(self.pages, schema=RAW_PAGE)
            self.storage.write_parquet(f"{self.run_dir}/part-{self.part:05d}.parquet", table)
        if self.fetches:
            table = pa.Table.from_pylist(self.fetches, schema=state.FETCH)
            self.storage.write_parquet(f"{self.run_dir}/fetch-{self.part:05d}.parquet", table)
        self.part += 1
        self.pages, self.fetches = [], []

    def close_spider(self, spider=None):
        self.flush()
        self.progress(force=True)
