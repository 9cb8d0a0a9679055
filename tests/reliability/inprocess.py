"""WorkerPool's interface over PrefillWorker objects in this process, without Ray: the server's
lifecycle (cancel, abandon, fetch, release, probe, replace) against the real worker code, fast
enough for CI, with hooks that put a test in control of timing.

Streams behave as Ray's do: a worker generator is driven on its own thread whether or not the
server reads it (prefill: eagerly; fetch: up to `FETCH_DEPTH` items ahead, Ray's backpressure),
and `cancel_stream` ends one at its next item, as `ray.cancel` does.
"""

from __future__ import annotations

import asyncio
import threading

from proxyprefill.workers.prefill_worker import PrefillWorker, WarmUpPlan
from proxyprefill.workers.ray_pool import WorkerState

FETCH_DEPTH = 8  # as WorkerPool.fetch's _generator_backpressure_num_objects
_END = object()


class ActorDiedError(Exception):
    """What a call to a killed worker raises (named as Ray's, which the server maps to UNAVAILABLE)."""


async def _ready(item):
    return item


class Stream:
    """A worker generator driven on its own thread; async-iterates like an ObjectRefGenerator
    (each step gives an awaitable of the item)."""

    def __init__(self, generator, depth: int = 0):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._room = threading.Semaphore(depth) if depth else None
        self._cancelled = threading.Event()
        self.finished = threading.Event()
        threading.Thread(target=self._drive, args=(generator,), daemon=True).start()

    def _drive(self, generator) -> None:
        try:
            for item in generator:
                if not self._wait_for_room():
                    generator.close()  # GeneratorExit at its yield, as ray.cancel interrupts one
                    return
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except Exception as error:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, error)
        finally:
            self.finished.set()
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _END)

    def _wait_for_room(self) -> bool:
        while not self._cancelled.is_set():
            if self._room is None or self._room.acquire(timeout=0.05):
                return True
        return False

    def cancel(self) -> None:
        self._cancelled.set()

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if self._room is not None:
            self._room.release()
        if isinstance(item, Exception):
            raise item
        return _ready(item)


class _DeadWorker:
    """Stands in for a killed actor: every call fails as a call to a dead actor does."""

    def __getattr__(self, name):
        def call(*args, **kwargs):
            raise ActorDiedError("the actor died")

        return call


class InProcessPool:
    def __init__(self, engine_kwargs: dict, num_workers: int = 1, warm_up: WarmUpPlan | None = None):
        self.engine_kwargs = dict(engine_kwargs)
        self.workers = [
            PrefillWorker(f"worker-{i}", self.engine_kwargs, warm_up=warm_up) for i in range(num_workers)
        ]
        self.actors = self.workers
        self.descriptions = [worker.describe() for worker in self.workers]
        self.names = [d.worker for d in self.descriptions]
        self.pipeline_index = None
        self.replaced = 0

    @property
    def description(self):
        return self.descriptions[0]

    def tokenizer(self):
        return self.workers[0].tokenizer()

    # what the server calls ----------------------------------------------------------------------
    async def prefill(self, worker: int, key: str, token_ids, options):
        """The worker's messages, as WorkerPool.prefill yields them (driven eagerly, as the
        worker's channel sends them whether or not the server reads)."""
        async for item in Stream(self._call(worker, "prefill", key, token_ids, options)):
            yield await item

    def cancel(self, worker: int, key: str) -> None:
        self._call(worker, "cancel", key)

    def abandon(self, worker: int, key: str, keep_handle: str | None):
        return asyncio.to_thread(self._call, worker, "abandon", key, keep_handle)

    def fetch(self, worker: int, handle: str, max_chunk_bytes: int, *layers_and_ids) -> Stream:
        """layers_and_ids: layer_start, layer_end, include_token_ids (PrefillWorker.fetch)."""
        return Stream(self._call(worker, "fetch", handle, max_chunk_bytes, *layers_and_ids), FETCH_DEPTH)

    def cancel_stream(self, stream: Stream) -> None:
        stream.cancel()

    def release(self, worker: int, handle: str):
        return asyncio.to_thread(self._call, worker, "release", handle)

    async def probe(self, worker: int, timeout: float = 10.0) -> WorkerState:
        if isinstance(self.workers[worker], _DeadWorker):
            return WorkerState(alive=False, gone=True)
        incarnation, ready = self.workers[worker].probe_state()
        return WorkerState(alive=True, incarnation=incarnation, ready=ready)

    def replace(self, worker: int) -> None:
        self.workers[worker] = PrefillWorker(self.names[worker], self.engine_kwargs)
        self.replaced += 1

    def shutdown(self) -> None:
        self.workers = []

    def _call(self, worker: int, method: str, *args):
        return getattr(self.workers[worker], method)(*args)

    # what tests do --------------------------------------------------------------------------------
    def kill(self, worker: int) -> None:
        """The worker dies for good: its KV goes with it and every later call fails."""
        self.workers[worker] = _DeadWorker()

    def restart(self, worker: int) -> None:
        """The worker dies and comes back at once, empty (a new incarnation), as Ray restarts it."""
        self.workers[worker] = PrefillWorker(self.names[worker], self.engine_kwargs)
