"""Map a function over items in worker processes that may hang or crash.

:func:`robust_map` is a small process pool for work that must not stop on one
bad input: a page that makes a parser loop forever, or crash its process with a
segfault, costs that one item and never the whole run.

How it knows which item hung or crashed: every worker has its own pipe. The
parent sends a worker a chunk of items only when the worker is idle, and the
worker sends back one answer per item, in order, as soon as it has it. A pipe
message is complete once sent, so at any moment the parent knows exactly which
item a worker is on (the first unanswered one of its chunk) and since when (the
previous answer). So:

* an item that runs longer than ``timeout_s`` gets its worker killed; the item is
  reported as ``timeout`` and the rest of the chunk goes back in the queue;
* a worker that dies (segfault, ``os._exit``, the kernel's OOM killer) has its
  current item reported as ``crash``, with the exit code;
* a dead or killed worker is replaced, so every core stays busy.

Nothing is done twice: answers that arrived before a worker died are kept.
Chunks keep the per-item cost of the pipes small.

Workers are started with ``spawn``, not ``fork``: the parent may hold threads
(JAX, Prefect) that a forked child would inherit in an undefined state. ``fn``
and ``initializer`` must therefore be importable (module level, or a
``functools.partial`` of such a function), and so must the items and results.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import pickle
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait
from typing import Any

log = logging.getLogger(__name__)

OK, ERROR, TIMEOUT, CRASH = "ok", "error", "timeout", "crash"
_READY = "ready"


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _worker_main(conn, fn: Callable[[Any], Any], initializer: Callable[[], Any] | None) -> None:
    """A worker: answer each item of each chunk it is sent, in order, one message per item."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    if initializer is not None:
        initializer()
    conn.send(_READY)
    while True:
        try:
            chunk = conn.recv()
        except EOFError:  # the parent closed the pipe: no more work
            return
        for item in chunk:
            try:
                answer = (OK, fn(item))
            except Exception as e:
                answer = (ERROR, describe(e))
            try:
                conn.send(answer)
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                conn.send((ERROR, f"result cannot be sent back: {describe(e)}"))


class _Worker:
    """The parent's handle on one worker process and the items it holds."""

    def __init__(self, ctx, fn, initializer):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, fn, initializer), name="robust_map", daemon=True)
        self.proc.start()
        child.close()  # so the parent sees EOF when the worker dies
        self.ready = False
        self.todo: deque[int] = deque()  # indices sent and not yet answered, in order
        self.since = time.monotonic()  # when todo[0] started

    def assign(self, indices: list[int], items: list) -> bool:
        try:
            self.conn.send([items[i] for i in indices])
        except OSError:  # died before it could take the chunk: nothing to blame
            return False
        self.todo.extend(indices)
        self.since = time.monotonic()
        return True

    def drain(self, results: dict[int, tuple[str, Any]]) -> bool:
        """Take every answer already sent; False once the pipe is closed (the worker is gone)."""
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                if msg == _READY:
                    self.ready = True
                else:
                    results[self.todo.popleft()] = msg
                    self.since = time.monotonic()
        except (EOFError, OSError):
            return False
        return True

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        self.conn.close()  # an idle worker reads EOF and returns
        self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def robust_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    timeout_s: float | None,
    chunksize: int = 16,
    initializer: Callable[[], Any] | None = None,
) -> Iterator[tuple[str, Any]]:
    """Yield ``(status, value)`` for each item, in input order.

    * ``("ok", fn(item))``
    * ``("error", "ExceptionType: message")`` when ``fn`` raised an exception;
    * ``("timeout", timeout_s)`` when ``fn(item)`` ran longer than ``timeout_s``
      seconds (``None``: no limit); its worker was killed and replaced;
    * ``("crash", exitcode)`` when the worker died while running ``fn(item)``;
      a negative exit code is the signal that killed it (-11: segfault, -9: SIGKILL).

    ``initializer`` runs once in each worker before it takes work (imports,
    warm caches), so that start-up time never counts against an item. A worker
    that dies before it is ready raises ``RuntimeError``: that is a broken
    environment, not a bad item. Stopping the iteration early stops the workers.
    """
    items = list(items)
    n = len(items)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if n == 0:
        return
    if multiprocessing.current_process().daemon:
        # multiprocessing forbids it; say how to fix it instead of an AssertionError.
        raise RuntimeError(
            "robust_map cannot start worker processes from a daemonic process (a Dask worker started "
            "by a nanny, for one): start Dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False"
        )
    # Small inputs get small chunks, so that every worker gets some.
    chunksize = max(1, min(chunksize, math.ceil(n / (4 * workers))))
    queue: deque[int] = deque(range(n))
    results: dict[int, tuple[str, Any]] = {}
    ctx = multiprocessing.get_context("spawn")
    pool = [_Worker(ctx, fn, initializer) for _ in range(min(workers, math.ceil(n / chunksize)))]
    next_out = 0

    def requeue(w: _Worker) -> None:
        queue.extendleft(reversed(w.todo))
        w.todo.clear()

    try:
        while next_out < n:
            for w in pool:
                if w.ready and not w.todo and queue:
                    chunk = [queue.popleft() for _ in range(min(chunksize, len(queue)))]
                    if not w.assign(chunk, items):
                        queue.extendleft(reversed(chunk))

            busy = [w.since + timeout_s for w in pool if w.todo] if timeout_s is not None else []
            wait_s = max(0.0, min(busy) - time.monotonic()) if busy else None
            wait([w.conn for w in pool] + [w.proc.sentinel for w in pool], wait_s)

            survivors, failed_start = [], None
            for w in pool:
                alive = w.proc.is_alive()
                if w.drain(results) and alive:
                    if not (w.todo and timeout_s is not None and time.monotonic() - w.since > timeout_s):
                        survivors.append(w)
                        continue
                    culprit = w.todo[0]
                    w.proc.kill()
                    w.proc.join()
                    w.drain(results)  # it may have answered at the last moment
                    if w.todo and w.todo[0] == culprit:
                        results[w.todo.popleft()] = (TIMEOUT, timeout_s)
                        log.debug("item %d ran longer than %ss; its worker was killed", culprit, timeout_s)
                else:  # the worker is gone: blame the item it was on, if any
                    w.proc.join()
                    if not w.ready:
                        failed_start = w.proc.exitcode
                    elif w.todo:
                        culprit = w.todo.popleft()
                        results[culprit] = (CRASH, w.proc.exitcode)
                        log.debug("the worker running item %d died (exit code %s)", culprit, w.proc.exitcode)
                requeue(w)
                w.stop()
                if queue:  # replace it while there is work left for it
                    survivors.append(_Worker(ctx, fn, initializer))
            pool = survivors
            if failed_start is not None:
                raise RuntimeError(f"a pool worker died while starting (exit code {failed_start})")

            while next_out in results:
                yield results.pop(next_out)
                next_out += 1
    finally:
        for w in pool:
            w.stop(kill=True)


def pool_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
) -> Iterator[Any]:
    """``fn`` over ``items`` in ``workers`` processes, results in input order.

    A few items per worker are in flight, so memory stays bounded however many
    items come. With one worker, fewer than two items, or in a daemonic process
    (which may not start processes: a Dask worker under a nanny), everything
    runs here. ``fn`` must be importable (module level); the items and results
    are pickled. ``initializer(*initargs)`` runs once per process (here too
    when everything runs here): the place for state too big to send with
    every item.
    """
    items = iter(items)
    head = list(itertools.islice(items, 2))
    if len(head) < 2 or workers <= 1 or multiprocessing.current_process().daemon:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, itertools.chain(head, items))
        return
    # spawn, not fork: the parent may hold threads (DuckDB, Prefect) a forked child would inherit.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in itertools.chain(head, items):
            pending.append(pool.submit(fn, item))
            if len(pending) >= 3 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
