"""What every worker actor shares (workers/prefill_worker.py's PrefillWorker and
workers/pipeline_worker.py's PipelineWorker): per-request stop flags, outcome counters, and
running one prefill on a reused helper thread while its progress streams out of a Ray streaming
generator as `protocol.Progress` messages.

A new thread per prefill would leave a glibc malloc arena behind each time, so a few threads
are reused; the work reports progress through a queue because its callback cannot yield.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .protocol import PrefillFailed, PrefillStopped, Progress

log = logging.getLogger("proxyprefill.workers")

_STALE_CANCEL_SECONDS = 600.0
PREFILL_THREADS = 4  # helper threads a worker runs prefills on (the server admits fewer at once)


@dataclass
class PrefillRecord:
    """A worker's record of one prefill key: created by whichever of prefill / cancel / abandon
    comes first."""

    stop: threading.Event
    done: threading.Event  # set when the prefill has ended (its work stopped, its KV kept or not)
    created: float
    started: bool = False


class StreamingPrefills:
    """Per-request stop flags, outcome counters and the prefill threads of one worker actor.

    `_stream_prefill` yields Progress messages and returns (stopped_or_failed, result): a
    PrefillStopped or PrefillFailed message and None, or None and the work's result; a prefill
    stopped after its work finished returns (PrefillStopped(), result), so that the caller can
    drop what the result holds. Call `_init_requests()` in `__init__`; a subclass provides
    `release(handle)`.
    """

    def _init_requests(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[str, PrefillRecord] = {}
        self._outcomes = {"result": 0, "cancelled": 0, "error": 0}
        self._threads = ThreadPoolExecutor(PREFILL_THREADS, thread_name_prefix="prefill")
        self.incarnation = uuid.uuid4().hex
        self.warmed_up = threading.Event()  # set once the actor runs requests at full speed
        self.warmed_up.set()

    def ping(self) -> str:
        """This actor's incarnation (a restarted actor answers a new one)."""
        return self.incarnation

    def probe_state(self) -> tuple[str, bool]:
        """(incarnation, whether its start-up warm-up is over): what the server's watch reads."""
        return self.incarnation, self.warmed_up.is_set()

    def _request(self, key: str) -> PrefillRecord:
        with self._lock:
            now = time.monotonic()
            for stale in [k for k, r in self._requests.items() if now - r.created > _STALE_CANCEL_SECONDS]:
                self._requests.pop(stale)
            if key not in self._requests:
                self._requests[key] = PrefillRecord(threading.Event(), threading.Event(), now)
            return self._requests[key]

    def _begin_request(self, key: str) -> PrefillRecord:
        request = self._request(key)
        with self._lock:
            request.started = True
        return request

    def cancel(self, key: str) -> None:
        """Stops the prefill `key` at its next layer (or before it starts, if it has not yet)."""
        self._request(key).stop.set()

    def abandon(self, key: str, keep_handle: str | None, wait_seconds: float = 600.0) -> int:
        """Stops the prefill `key`, waits (up to `wait_seconds`) until it has ended, then frees the
        KV it kept under `keep_handle`, if any; returns the bytes freed. A prefill that has not
        started yet will stop before its first layer and keep nothing."""
        request = self._request(key)
        request.stop.set()
        with self._lock:
            started = request.started
        if started and not request.done.wait(wait_seconds):
            log.warning("prefill %s still running %.0f s after it was abandoned", key, wait_seconds)
        return self.release(keep_handle) if keep_handle else 0

    def _running(self) -> int:
        """Prefills under way (call with the lock held)."""
        return sum(1 for r in self._requests.values() if r.started and not r.done.is_set())

    def _count(self, kind: str) -> None:
        with self._lock:
            self._outcomes[kind] += 1

    def _stop_after_finishing(self) -> PrefillStopped:
        """A prefill that finished but was abandoned before its KV was kept counts as cancelled
        (call with the lock held)."""
        self._outcomes["result"] -= 1  # counted by _stream_prefill just before
        self._outcomes["cancelled"] += 1
        return PrefillStopped()

    def _stream_prefill(self, key: str, stop: threading.Event, work, classify_error=None):
        """Runs `work(progress)` on a helper thread (`progress(done, total)` streams a Progress)
        and returns its outcome (see the class docstring) once it ends; `classify_error(error)`
        may name the PrefillFailed of worker-specific exceptions. The outcome is counted."""
        from proxyprefill.workers.engine import PrefillCancelled, PrefillError

        events: queue.Queue = queue.Queue()
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = work(lambda done, total: events.put(Progress(done, total)))
            except PrefillCancelled:
                outcome["stopped"] = PrefillStopped()
            except PrefillError as error:
                outcome["failed"] = PrefillFailed("invalid", str(error))
            except Exception as error:
                failed = classify_error(error) if classify_error else None
                if failed is None:  # reported to the server, which answers INTERNAL
                    log.exception("prefill %s failed", key)
                    failed = PrefillFailed("internal", f"{type(error).__name__}: {error}")
                outcome["failed"] = failed
            finally:
                events.put(None)

        finished = self._threads.submit(run)
        while (item := events.get()) is not None:
            yield item
        finished.result()
        result = outcome.get("result")
        if "stopped" in outcome or (stop.is_set() and result is not None):
            self._count("cancelled")
            return PrefillStopped(), result
        if "failed" in outcome:
            self._count("error")
            return outcome["failed"], None
        self._count("result")
        return None, result

    def _end_request(self, key: str, request: PrefillRecord) -> None:
        request.stop.set()  # a consumer that went away also stops the work
        with self._lock:
            self._requests.pop(key, None)
        request.done.set()
