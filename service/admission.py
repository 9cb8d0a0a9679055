"""Admission control and routing by pending prompt tokens.

A request is admitted when the prompt tokens already admitted and not yet finished, plus its own,
stay within `max_pending_tokens`; otherwise RESOURCE_EXHAUSTED. Prompt tokens, not request counts,
measure load: one 1M-token prompt costs more than a thousand short ones. An admitted request goes
to the worker with the fewest pending tokens (ties: the lowest index) among those not marked down
(`set_available`), and waits there for one of the worker's `slots` (prefills it runs at once).
A request holds its slot and tokens until its worker has really stopped working on it, cancelled
or not. Queue depth = admitted requests not yet running.

Runs on the server's event loop (asyncio); not thread-safe by design.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import grpc

from .errors import ServiceError


class AdmissionError(ServiceError):
    """Refused by admission: draining, queue full, or no worker up."""


@dataclass
class Ticket:
    worker: int
    tokens: int
    queue_position: int  # requests ahead of this one on its worker when admitted
    pending_tokens: int  # all pending tokens, this request included, when admitted
    running: bool = False
    finished: bool = False


@dataclass
class _Worker:
    slots: asyncio.Semaphore
    pending_tokens: int = 0
    waiting: int = 0
    running: int = 0
    available: bool = True  # False while the server's watch finds it down


class Admission:
    def __init__(
        self, num_workers: int, max_pending_tokens: int, slots_per_worker: int = 1, dedicated_workers: int = 0
    ):
        """`dedicated_workers`: how many workers at the end of the list take only the requests
        admitted to them by name (`admit(tokens, worker=i)`), such as the sharded route."""
        if num_workers < 1 or not 0 <= dedicated_workers < num_workers:
            raise ValueError("need num_workers >= 1 and 0 <= dedicated_workers < num_workers")
        self.max_pending_tokens = max_pending_tokens
        self._workers = [_Worker(asyncio.Semaphore(slots_per_worker)) for _ in range(num_workers)]
        self._routable = num_workers - dedicated_workers
        self._closed = False

    @property
    def pending_tokens(self) -> int:
        return sum(w.pending_tokens for w in self._workers)

    @property
    def queue_depth(self) -> int:
        return sum(w.waiting for w in self._workers)

    @property
    def running(self) -> int:
        return sum(w.running for w in self._workers)

    def worker_pending_tokens(self) -> list[int]:
        return [w.pending_tokens for w in self._workers]

    def set_available(self, worker: int, available: bool) -> None:
        """Routes new requests around a worker that is down (until it is back)."""
        self._workers[worker].available = available

    def available(self, worker: int) -> bool:
        return self._workers[worker].available

    def close(self) -> None:
        """Refuse every later admission (draining)."""
        self._closed = True

    def admit(self, tokens: int, worker: int | None = None) -> Ticket:
        """Admits a request to `worker`, or (None) to the routable worker with the fewest pending
        tokens."""
        if self._closed:
            raise AdmissionError(grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another replica")
        pending = self.pending_tokens
        if pending + tokens > self.max_pending_tokens:
            raise AdmissionError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {pending} prompt tokens pending, this prompt has {tokens}, "
                f"the limit is {self.max_pending_tokens}; retry later",
            )
        index = worker
        if index is None:
            up = [i for i in range(self._routable) if self._workers[i].available]
            if not up:
                raise AdmissionError(
                    grpc.StatusCode.UNAVAILABLE,
                    "no worker is ready (starting, warming up or restarting); retry shortly",
                )
            index = min(up, key=lambda i: (self._workers[i].pending_tokens, i))
        chosen = self._workers[index]
        if not chosen.available:
            raise AdmissionError(grpc.StatusCode.UNAVAILABLE, "the worker is restarting; retry shortly")
        chosen.pending_tokens += tokens
        chosen.waiting += 1
        ticket = Ticket(
            index, tokens, queue_position=chosen.waiting - 1 + chosen.running, pending_tokens=pending + tokens
        )
        return ticket

    @contextlib.asynccontextmanager
    async def turn(self, ticket: Ticket):
        """Waits for a slot on the ticket's worker, holds it for the body, then finishes the ticket
        (also when the body raises or the wait is cancelled)."""
        worker = self._workers[ticket.worker]
        try:
            async with worker.slots:
                worker.waiting -= 1
                worker.running += 1
                ticket.running = True
                try:
                    yield ticket
                finally:
                    worker.running -= 1
                    self.finish(ticket)
        finally:
            self.finish(ticket)

    def finish(self, ticket: Ticket) -> None:
        """Returns the ticket's tokens; idempotent, and safe for a ticket that never ran."""
        if ticket.finished:
            return
        ticket.finished = True
        worker = self._workers[ticket.worker]
        if not ticket.running:
            worker.waiting -= 1
        ticket.running = False
        worker.pending_tokens -= ticket.tokens
