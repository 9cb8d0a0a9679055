"""The service in-process, on a background event loop: for the `demo` command, benchmarks and tests.

    with LocalService(config) as service:          # starts local Ray and the workers if needed
        client = PrefillClient(service.target)
        ...

`LocalService(config, pool=pool)` serves an existing WorkerPool (several servers, e.g. one with
auth and one without, can share one pool); the pool is then left running on stop.
"""

from __future__ import annotations

import asyncio
import threading

from .config import ServerConfig
from .server import PrefillServer


class LocalService:
    def __init__(self, config: ServerConfig, pool=None):
        self.config = config
        self.pool = pool
        self._owns_pool = pool is None
        self.server: PrefillServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def target(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def start(self) -> LocalService:
        if self.pool is None:
            from proxyprefill.workers.ray_pool import WorkerPool

            self.pool = WorkerPool.start(self.config.engine_kwargs(), **self.config.pool_kwargs())
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="proxyprefill-server", daemon=True)
        self._thread.start()
        self.server = self.call(self._make_server())
        self.port = self.call(self.server.start())
        return self

    async def _make_server(self) -> PrefillServer:
        return PrefillServer(self.config, self.pool)  # built on the loop: it creates asyncio objects

    def call(self, coroutine, timeout: float | None = None):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float = 0.0) -> None:
        if self.server is not None:
            self.call(self.server.drain(grace))
            self.server = None
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()
            self.loop = None
        if self._owns_pool and self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
