"""Micro-batching of concurrent requests: an asyncio queue drained into one model call.

``MicroBatcher.submit(item)`` queues an item and waits for its result. A worker task takes the
first waiting item, then collects more for up to ``wait_ms`` milliseconds or until ``max_batch``
items, and runs ``fn(items) -> results`` once in ``executor`` (the model's thread), so the event
loop keeps accepting requests meanwhile. ``fn`` returns one result per item; a result that is an
exception is raised in that item's caller only. Items whose caller went away (a cancelled
future) are dropped before the call.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

log = logging.getLogger("core.serve")


class MicroBatcher:
    def __init__(self, fn: Callable[[list], list], executor, *, max_batch: int = 8, wait_ms: float = 5.0,
                 name: str = "batch"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.fn, self.executor, self.name = fn, executor, name
        self.max_batch, self.wait = int(max_batch), max(0.0, float(wait_ms)) / 1000.0
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0       # model calls made
        self.items = 0         # items served

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._worker(), name=f"{self.name}-worker")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None

    @property
    def pending(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def submit(self, item) -> Any:
        if self.queue is None:
            raise RuntimeError(f"{self.name} batcher is not running")
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((item, fut))
        return await fut

    async def _collect(self) -> list:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(i, f) for i, f in await self._collect() if not f.done()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [i for i, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} requests")
            except asyncio.CancelledError:
                for _, f in batch:
                    if not f.done():
                        f.cancel()
                raise
            except Exception as e:  # the call itself failed: every caller gets the error
                log.exception("%s: a batch of %d failed", self.name, len(batch))
                results = [e] * len(batch)
            self.batches += 1
            self.items += len(batch)
            for (_, f), r in zip(batch, results):
                if f.done():
                    continue
                if isinstance(r, BaseException):
                    f.set_exception(r)
                else:
                    f.set_result(r)
