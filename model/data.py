"""Training and evaluation batches from a shard set, deterministic and resumable.

A split of N tokens is cut into W = (N - 1) // seq_len non-overlapping windows
of ``seq_len + 1`` tokens (x is a window's first ``seq_len`` tokens, y the same
shifted by one, so neighbouring windows share one token). Sample ``g`` of the
run (``g = step * global_batch + row``) lies in epoch ``g // W`` at position
``g % W``; a keyed permutation of ``[0, W)``, seeded by (seed, epoch), maps that
position to a window. Each epoch therefore visits every window once, in its own
order, and the windows are shifted by a seeded offset per epoch so that the
few tokens left over at the end of the split are not always the ones skipped.

The permutation is a Feistel network over the next even power of two (cycle
walking back into ``[0, W)``): one sample's window costs a few integer hashes,
with no table of W entries. So the batch of any step is computed directly,
which is what makes resume exact: a checkpoint stores the loader's
:meth:`Loader.state` (seed, step, the shard set and the shapes), and the run
continues with the very batch it would have read.

Hosts: the global batch does not depend on the number of processes. With
``grad_accum`` micro-batches of ``micro = global_batch / grad_accum`` rows,
process ``i`` of ``P`` gets rows ``[i * micro / P, (i + 1) * micro / P)`` of each
micro-batch (without ``grad_accum``: rows ``[i * B / P, (i + 1) * B / P)`` of the
batch), and reads only those windows. A run may resume on a different number
of hosts.

Bits per character: a model's mean loss in nats per token, times the split's
tokens per character (from the manifest, which counts both per split), over
ln 2. It compares models with different tokenizers, since it does not depend
on how the text was cut into tokens. The ratio is the whole split's, while the
loss is measured on the evaluation windows, so it assumes those windows are
typical of the split (they are its first windows, and documents were
shuffled into the shards).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

STATE_VERSION = 1
_FEISTEL_ROUNDS = 6


class TokenReader(Protocol):
    """What the loader needs from a shard reader (``encoder.shards.ShardReader``)."""

    manifest: dict
    num_tokens: int

    def read(self, offset: int, length: int) -> np.ndarray: ...


# -- the seeded permutation ---------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective hash of uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _keys(seed: int, epoch: np.ndarray, salt: int) -> np.ndarray:
    base = _mix(np.array([seed % 2**64], dtype=np.uint64)) ^ np.uint64(salt)
    return _mix(_mix(base) ^ epoch.astype(np.uint64))


def permute(index: np.ndarray, n: int, key: np.ndarray) -> np.ndarray:
    """``index`` (values in ``[0, n)``) mapped through the permutation of ``[0, n)`` keyed by ``key``.

    ``key`` has one entry per index, so one call can mix epochs. For a fixed
    key, distinct indices give distinct results.
    """
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    round_keys = [_mix(key + np.uint64(r + 1)) for r in range(_FEISTEL_ROUNDS)]
    y = index.astype(np.uint64).copy()
    todo = np.ones(len(y), dtype=bool)
    while todo.any():  # cycle walking: leave [0, 4^half) values outside [0, n) by applying it again
        left, right = y[todo] >> shift, y[todo] & mask
        for rk in round_keys:
            left, right = right, left ^ (_mix(right ^ rk[todo]) & mask)
        y[todo] = (left << shift) | right
        todo = y >= np.uint64(n)
    return y.astype(np.int64)


# -- checks -----------------------------------------------------------------------------


def shard_set_id(manifest: dict) -> str:
    """A short id of a shard set's content: its tokenizer and every split's shards and counts."""
    key = json.dumps({"tokenizer_id": manifest["tokenizer_id"], "splits": manifest["splits"]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def check_tokenizer(manifest: dict, tokenizer_id: str | None = None, vocab_size: int | None = None) -> None:
    """Raise ValueError when the shards were not encoded by the expected tokenizer, or need a larger vocabulary."""
    if tokenizer_id is not None and manifest["tokenizer_id"] != tokenizer_id:
        raise ValueError(
            f"the shards were encoded with tokenizer {manifest['tokenizer_id']}, but the model expects tokenizer "
            f"{tokenizer_id}: re-encode the shards with that tokenizer, or train a new model on these shards"
        )
    if vocab_size is not None and manifest["vocab_size"] > vocab_size:
        raise ValueError(
            f"the shards' vocabulary has {manifest['vocab_size']} ids (tokenizer {manifest['tokenizer_id']}), "
            f"more than the model's vocab_size {vocab_size}: token ids would fall outside the embedding table"
        )


def bits_per_char(loss_nats_per_token: float, manifest: dict, split: str = "val") -> float:
    """Bits per character of ``split`` for a mean cross-entropy in nats per token (see the module doc)."""
    s = manifest["splits"][split]
    if not s.get("chars"):
        raise ValueError(f"the manifest counts no characters for split {split!r}")
    return loss_nats_per_token * (s["tokens"] / s["chars"]) / math.log(2)


def _too_few(split: str, tokens: int, seq_len: int) -> ValueError:
    return ValueError(
        f"the {split} split has {tokens} tokens, fewer than seq_len + 1 = {seq_len + 1} for one window: "
        "crawl more pages or lower seq_len"
    )


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _read_windows(reader: TokenReader, starts: np.ndarray, length: int, pool: ThreadPoolExecutor | None) -> np.ndarray:
    def one(start: int) -> np.ndarray:
        return reader.read(int(start), length)

    parts = list(pool.map(one, starts)) if pool is not None and len(starts) > 1 else [one(s) for s in starts]
    if not parts:
        return np.empty((0, length), dtype=np.int32)
    return np.stack(parts).astype(np.int32)


# -- training batches -------------------------------------------------------------------


class Loader:
    """Batches of (x, y) int32 for one split, each a pure function of (seed, step).

    ``global_batch`` rows per optimizer step, all hosts together. Without
    ``grad_accum`` a batch is ``(global_batch / P, seq_len)``; with it,
    ``(grad_accum, global_batch / grad_accum / P, seq_len)``. ``step`` counts
    optimizer steps from 0; :meth:`__next__` returns the batch at
    :attr:`step` and advances it.
    """

    def __init__(
        self,
        reader: TokenReader,
        seq_len: int,
        global_batch: int,
        *,
        seed: int = 0,
        grad_accum: int | None = None,
        split: str = "train",
        tokenizer_id: str | None = None,
        vocab_size: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        read_threads: int = 8,
    ):
        if seq_len < 1 or global_batch < 1 or (grad_accum is not None and grad_accum < 1):
            raise ValueError(f"seq_len {seq_len}, global_batch {global_batch} and grad_accum {grad_accum} must be positive")
        self.reader, self.split = reader, split
        self.manifest = reader.manifest
        check_tokenizer(self.manifest, tokenizer_id, vocab_size)
        self.seq_len, self.global_batch, self.grad_accum, self.seed = seq_len, global_batch, grad_accum, seed
        self.process_index, self.process_count = _host(process_index, process_count)
        accum = grad_accum or 1
        if global_batch % (accum * self.process_count):
            raise ValueError(
                f"global_batch {global_batch} is not divisible by grad_accum {accum} x {self.process_count} processes"
            )
        self.micro_batch = global_batch // accum
        self.windows = (reader.num_tokens - 1) // seq_len
        if self.windows < 1:
            raise _too_few(split, reader.num_tokens, seq_len)
        self.leftover = reader.num_tokens - 1 - self.windows * seq_len
        self.shard_set = shard_set_id(self.manifest)
        self.step = 0
        self._pool = ThreadPoolExecutor(read_threads, thread_name_prefix="loader") if read_threads > 1 else None

    # -- which windows -------------------------------------------------------------
    def host_rows(self) -> np.ndarray:
        """This process's rows of the global batch (indices into the flattened ``(grad_accum, micro)`` rows)."""
        per = self.micro_batch // self.process_count
        lo = self.process_index * per
        micro = np.arange(lo, lo + per)
        return (np.arange(self.grad_accum or 1)[:, None] * self.micro_batch + micro[None, :]).reshape(-1)

    def window_starts(self, step: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Token offsets of the windows of ``step`` (this host's rows unless ``rows`` is given)."""
        if step < 0:
            raise ValueError(f"step {step} is negative")
        rows = self.host_rows() if rows is None else np.asarray(rows)
        sample = np.int64(step) * self.global_batch + rows.astype(np.int64)
        epoch, position = sample // self.windows, sample % self.windows
        window = permute(position, self.windows, _keys(self.seed, epoch, salt=1))
        offset = (_keys(self.seed, epoch, salt=2) % np.uint64(self.leftover + 1)).astype(np.int64)
        return offset + window * self.seq_len

    # -- batches ---------------------------------------------------------------------
    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This host's (x, y) for optimizer step ``step``."""
        tokens = _read_windows(self.reader, self.window_starts(step), self.seq_len + 1, self._pool)
        if self.grad_accum is not None:
            tokens = tokens.reshape(self.grad_accum, -1, self.seq_len + 1)
        return tokens[..., :-1], tokens[..., 1:]

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def prefetch(self, start_step: int, stop_step: int | None = None, depth: int = 2) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(step, x, y) from ``start_step`` on (to ``stop_step``, exclusive), read ``depth`` batches ahead
        in a background thread so that reads overlap the device's work."""
        q: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            step = start_step
            try:
                while stop_step is None or step < stop_step:
                    if not put((step, *self.batch(step))):
                        return
                    step += 1
                put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                put(e)

        thread = threading.Thread(target=work, name="loader-prefetch", daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    # -- position ----------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def epoch(self, step: int | None = None) -> float:
        """Epochs of the split consumed before ``step`` (default: the current step)."""
        step = self.step if step is None else step
        return step * self.global_batch / self.windows

    def state(self, step: int | None = None) -> dict[str, Any]:
        """The loader's position (JSON-able), to be saved with a checkpoint. ``step``: the next batch to read."""
        step = self.step if step is None else step
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "shard_set": self.shard_set,
            "tokenizer_id": self.manifest["tokenizer_id"],
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "grad_accum": self.grad_accum,
            "seed": self.seed,
            "step": step,
            "windows": self.windows,
            "epoch": step * self.global_batch // self.windows,
            "samples_seen": step * self.global_batch,
        }

    def restore(self, state: dict[str, Any]) -> Loader:
        """Continue from ``state`` (from :meth:`state`); raises ValueError unless it was saved for this same
        shard set, tokenizer, split, shapes and seed."""
        mine = self.state(step=0)
        keys = ("version", "split", "shard_set", "tokenizer_id", "seq_len", "global_batch", "grad_accum", "seed")
        diff = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
        if diff:
            raise ValueError(
                "the saved loader position does not belong to this data or these settings ("
                + "; ".join(diff)
                + "): resume with the same shards and batch settings, or start a new run"
            )
        self.step = int(state["step"])
        return self

    @classmethod
    def from_state(
        cls,
        reader: TokenReader,
        state: dict[str, Any],
        *,
        tokenizer_id: str | None = None,
        vocab_size: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        read_threads: int = 8,
    ) -> Loader:
        """The loader that ``state`` was saved from, at its step, over ``reader`` (checked like :meth:`restore`)."""
        loader = cls(
            reader, state["seq_len"], state["global_batch"], seed=state["seed"], grad_accum=state["grad_accum"],
            split=state["split"], tokenizer_id=tokenizer_id, vocab_size=vocab_size,
            process_index=process_index, process_count=process_count, read_threads=read_threads,
        )
        return loader.restore(state)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


# -- evaluation batches -------------------------------------------------------------------


class EvalSet:
    """A fixed list of evaluation batches: the split's first windows, in order.

    Up to ``num_batches`` batches of ``batch_size`` rows (fewer when the split
    is small; a split with fewer than ``batch_size`` windows gives one smaller
    batch). The same windows at every evaluation and for any host count; each
    process gets its rows of every batch. A split shorter than ``seq_len + 1``
    is evaluated with windows of all its tokens (logged), as a tiny corpus
    needs; a split with fewer than 2 tokens per process is an error.
    """

    def __init__(
        self,
        reader: TokenReader,
        seq_len: int,
        batch_size: int,
        num_batches: int,
        *,
        split: str = "val",
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.reader, self.split = reader, split
        self.manifest = reader.manifest
        self.process_index, self.process_count = _host(process_index, process_count)
        if reader.num_tokens - 1 < seq_len:
            if reader.num_tokens < 2:
                raise _too_few(split, reader.num_tokens, seq_len)
            log.warning(
                "the %s split has only %d tokens: evaluating windows of %d tokens instead of seq_len %d",
                split, reader.num_tokens, reader.num_tokens - 1, seq_len,
            )
            seq_len = reader.num_tokens - 1
        self.seq_len = seq_len
        windows = (reader.num_tokens - 1) // seq_len
        P = self.process_count
        rows = min(batch_size, windows) // P * P
        if rows < 1:
            raise ValueError(
                f"the {split} split has {windows} windows of {seq_len + 1} tokens, fewer than the {P} processes: "
                "crawl more pages or lower seq_len"
            )
        self.batch_size = rows
        self.num_batches = max(1, min(num_batches, windows // rows))
        self._batches: list[tuple[np.ndarray, np.ndarray]] | None = None

    def window_starts(self, index: int) -> np.ndarray:
        per = self.batch_size // self.process_count
        first = index * self.batch_size + self.process_index * per
        return np.arange(first, first + per, dtype=np.int64) * self.seq_len

    def batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """This host's (x, y) of every evaluation batch (read once, then kept)."""
        if self._batches is None:
            self._batches = []
            for i in range(self.num_batches):
                tokens = _read_windows(self.reader, self.window_starts(i), self.seq_len + 1, None)
                self._batches.append((tokens[:, :-1], tokens[:, 1:]))
        return self._batches

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return self.num_batches

    def bits_per_char(self, loss_nats_per_token: float) -> float:
        return bits_per_char(loss_nats_per_token, self.manifest, self.split)
