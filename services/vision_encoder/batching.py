"""Merging concurrent encode requests into one packed engine call (pure asyncio, no Ray).

Requests wait in arrival order; a batch closes on a request count, a patch budget or a short
wait, then runs in a worker thread so the event loop keeps accepting requests.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass

from services.common.errors import InvalidInputError
from services.common.threads import ComputeThreads
from services.vision_encoder.engine import EncodedImage, EncoderEngine, ImageToEncode


@dataclass
class _Pending:
    images: list[ImageToEncode]
    future: asyncio.Future[list[EncodedImage]]

    @property
    def patches(self) -> int:
        return sum(image.num_patches for image in self.images)


class EncodeBatcher:
    """Merges concurrent `encode` calls into one engine call, run in a worker thread (`executor`'s).

    A batch closes when it holds `max_batch_size` requests, when the next request would take it
    past `max_batch_patches` patches (a single larger request runs alone), or `batch_wait_timeout_s`
    after its first request. Requests wait in arrival order. (`@serve.batch` does the same by
    request count but needs a replica context; this one also runs in plain asyncio tests.)
    """

    def __init__(
        self,
        engine: EncoderEngine,
        *,
        max_batch_size: int,
        max_batch_patches: int,
        batch_wait_timeout_s: float,
        executor: Executor | None = None,
        threads: ComputeThreads | None = None,
    ) -> None:
        if max_batch_size < 1 or max_batch_patches < 1 or batch_wait_timeout_s < 0:
            raise InvalidInputError("batching limits must be positive")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_batch_patches = max_batch_patches
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.executor = executor  # where engine calls run (None: the loop's default executor)
        self.threads = threads  # marks those calls busy on the machine's core board
        self.batches = 0  # engine calls made
        self.batched_requests = 0
        self.pending_images = 0  # images queued or being encoded (Serve's autoscaling figure)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def encode(self, images: list[ImageToEncode]) -> list[EncodedImage]:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run(), name="encode-batcher")
        pending = _Pending(images, loop.create_future())
        self._queue.put_nowait(pending)  # type: ignore[union-attr]
        self.pending_images += len(images)
        try:
            return await pending.future
        finally:
            self.pending_images -= len(images)

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        carry: _Pending | None = None
        while True:
            first = carry or await queue.get()
            batch, carry = await self._collect(queue, first)
            batch = [p for p in batch if not p.future.done()]  # callers that gave up
            if batch:
                await self._execute(batch)

    async def _collect(
        self, queue: asyncio.Queue[_Pending], first: _Pending
    ) -> tuple[list[_Pending], _Pending | None]:
        loop = asyncio.get_running_loop()
        batch, patches = [first], first.patches
        deadline = loop.time() + self.batch_wait_timeout_s
        while len(batch) < self.max_batch_size:
            try:
                nxt = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0))
            except TimeoutError:
                break
            if patches + nxt.patches > self.max_batch_patches:
                return batch, nxt  # opens the next batch
            batch.append(nxt)
            patches += nxt.patches
        return batch, None

    def _encode(self, images: list[ImageToEncode]) -> list[EncodedImage]:
        if self.threads is None:
            return self.engine.encode(images)
        with self.threads.computing():
            return self.engine.encode(images)

    async def _execute(self, batch: list[_Pending]) -> None:
        flat = [image for p in batch for image in p.images]
        self.batches += 1
        self.batched_requests += len(batch)
        try:
            loop = asyncio.get_running_loop()
            encoded = await loop.run_in_executor(self.executor, self._encode, flat)
        except Exception as e:  # the whole call failed: every caller in it hears why
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        start = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(encoded[start : start + len(p.images)])
            start += len(p.images)
