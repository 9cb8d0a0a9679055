"""The server's background upkeep: expiring leases, probing the workers, replacing a worker that
is gone for good, and the health status that follows from them.

A mixin of PrefillServer (service/server.py), which owns the state these use: the leases, the
pool, admission (which workers are routable), the health servicer and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from grpc_health.v1 import health_pb2

from . import audit

log = logging.getLogger("proxyprefill.service")

SWEEP_SECONDS = 1.0  # how often expired leases are freed
WATCH_SECONDS = 1.0  # how often every worker is pinged


class Upkeep:
    """PrefillServer's background tasks; they use the server's `leases`, `pool`, `admission`,
    `health`, `metrics`, `pipeline_index`, `_incarnations`, `_replacing`, `_serving`,
    `_draining`, `_update_gauges` and `_worker_index`, and its SERVICE_NAME as `service_name`."""

    async def _sweep_expired(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            for lease in self.leases.pop_expired():
                self.metrics.leases_expired.inc()
                log.info("lease expired handle=%s... bytes=%d", lease.handle[:8], lease.kv_bytes)
                audit.handle_event(lease.handle, "expired", lease.owner, kv_bytes=lease.kv_bytes)
                with contextlib.suppress(Exception):
                    await self.pool.release(self._worker_index(lease.worker), lease.handle)
            self._update_gauges()

    async def _probe_workers(self) -> bool:
        """One probe of every worker; True when a routable worker is available."""
        workers = range(len(self.pool.names))
        states = await asyncio.gather(*(self.pool.probe(worker) for worker in workers))
        for worker, state in zip(workers, states, strict=True):
            self._note_worker_state(worker, state)
        return any(self.admission.available(w) for w in workers if w != self.pipeline_index)

    async def _watch_workers(self) -> None:
        while True:
            try:
                await self._set_serving(await self._probe_workers())
            except Exception:  # the watch must outlive any one bad round
                log.exception("watching the workers")
            await asyncio.sleep(WATCH_SECONDS)

    def _note_worker_state(self, worker: int, state) -> None:
        """Routing, leases and replacement after one probe of `worker` (a WorkerState)."""
        name = self.pool.names[worker]
        known = self._incarnations.get(worker)
        restarted = state.alive and known is not None and state.incarnation != known
        if state.gone or restarted:
            lost = self.leases.lose_worker(name)
            if lost:
                log.warning(
                    "%s lost its KV (%s): %d leases dropped, %d bytes",
                    name,
                    "gone" if state.gone else "restarted",
                    len(lost),
                    sum(lease.kv_bytes for lease in lost),
                )
                self._update_gauges()
        if state.alive:
            self._incarnations[worker] = state.incarnation
        usable = state.alive and state.ready
        if self.admission.available(worker) != usable:
            status = "warming up" if state.alive and not state.ready else "up" if usable else "down"
            log.warning("%s is %s", name, status)
            self.admission.set_available(worker, usable)
        if state.gone and worker not in self._replacing and worker != self.pipeline_index:
            self._replacing[worker] = asyncio.create_task(self._replace_worker(worker))

    async def _replace_worker(self, worker: int) -> None:
        try:
            await asyncio.to_thread(self.pool.replace, worker)
        except Exception:
            log.exception("replacing %s failed; the next probe tries again", self.pool.names[worker])
        finally:
            self._replacing.pop(worker, None)

    async def _set_serving(self, serving: bool) -> None:
        if serving == self._serving or self._draining:
            return
        self._serving = serving
        statuses = health_pb2.HealthCheckResponse
        status = statuses.SERVING if serving else statuses.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(self.service_name, status)
        log.warning("health: %s", "SERVING" if serving else "NOT_SERVING (no worker is up and warmed up)")
