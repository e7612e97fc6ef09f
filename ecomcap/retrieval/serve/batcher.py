"""Concurrent search requests batched into one encoder forward and one index call, with a
bound on what may wait: beyond it a request is shed at once (the page answers 503 with
Retry-After) instead of queueing forever behind a slow model.

The event loop only parses requests and renders pages; the batch runs on a worker thread
(NumPy/FAISS/torch release the GIL there). Batches form from whatever queued while the previous
one ran, plus up to `max_wait_ms` for more, so one client pays no wait and sixteen share a forward.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """More requests are waiting than the page may hold: shed this one."""


class Expired(TimeoutError):
    """The search did not finish within the batcher's timeout (not an error raised by the search)."""


class QueryBatcher:
    def __init__(self, run: Callable[[list[str], list[int]], list[dict]], max_batch: int = 32,
                 max_wait_ms: float = 1.0, max_pending: int = 256, timeout_s: float = 10.0) -> None:
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.max_pending, self.timeout_s = max_pending, timeout_s
        self.pending = 0
        self.batches = self.queries = self.shed = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="search-batch")

    async def submit(self, query: str, top: int) -> dict:
        """The result of one checked query; Overloaded when `max_pending` already wait,
        Expired when the batch does not finish within `timeout_s`."""
        if self.pending >= self.max_pending:
            self.shed += 1
            raise Overloaded(f"{self.pending} searches waiting")
        queue = self._start()
        fut = asyncio.get_running_loop().create_future()
        self.pending += 1
        try:
            queue.put_nowait((query, top, fut))
            return await asyncio.wait_for(fut, self.timeout_s)  # cancels `fut` on timeout: the batch skips it
        except asyncio.TimeoutError:
            if fut.cancelled():  # our wait ran out; a TimeoutError of the search itself passes through
                raise Expired(f"search did not finish within {self.timeout_s:g} s") from None
            raise
        finally:
            self.pending -= 1

    def _start(self) -> asyncio.Queue:
        """The batching task on the running loop (again if the loop changed, as a test client's
        loop per request does, or if it died); returns its queue."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._serve(self._queue))
        return self._queue

    async def _serve(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [b for b in batch if not b[2].done()]  # a caller that timed out cancelled its future
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._pool, self.run, [b[0] for b in live], [b[1] for b in live])
            except Exception as exc:  # the batch's error is each caller's error
                for _, _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.queries += len(live)
            for (_, _, fut), res in zip(live, results):
                if not fut.done():
                    fut.set_result(res)

    def stats(self) -> dict:
        return {"batches": self.batches, "queries": self.queries, "shed": self.shed, "pending": self.pending,
                "mean_batch": round(self.queries / self.batches, 2) if self.batches else 0.0}

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
