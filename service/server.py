"""The gRPC front end (grpc.aio): validates, admits and routes requests; the Ray workers compute.

    server = PrefillServer(config, WorkerPool.start(...))
    port = await server.start()
    ...
    await server.drain()          # what SIGTERM does: NOT_SERVING, finish in-flight work, stop

What the server knows of a worker is its index and model description; what a worker knows of a
request is a plan (token ids, chunk size, logits, attention settings, where to keep the KV). The
KV tensors stay on the worker that made them, under a lease kept here (service/leases.py); the
KV-handle RPCs (FetchKV, MapKV, PushKV, RenewLease, ReleaseKV) are in service/kv_handles.py, and
the KV's wire format in workers/kv_wire.py.

Sharded requests: when the pool has a pipeline route (pipeline_workers >= 2), a request that
forces pipeline_stages > 1, or a long one (> shard_above_tokens) for which the planner picks more
than one stage, is admitted to that route, which the server addresses like any worker (name
"pipeline"); its KV handle, lease, FetchKV and release work unchanged. The planner's refusal is
RESOURCE_EXHAUSTED before any work; a stage lost mid-request is UNAVAILABLE.

Cancellation: a client that cancels, or whose deadline passes, makes grpc.aio cancel the handler
task; the handler then abandons the request on its worker, which stops the prefill at the next
layer, drops its partial KV and frees any KV it kept, and waits for that before it gives back the
request's slot and pending tokens (so cancelled work never runs beside admitted work). A FetchKV
whose client went away cancels its worker stream.

Workers: every second each worker is pinged (`_watch_workers`). One that is down is routed around
and health says NOT_SERVING while no worker is up; one that answers with a new incarnation
restarted and lost its KV, so its leases are dropped (FAILED_PRECONDITION, no phantom bytes); one
gone for good (Ray will not restart it) is replaced by a new actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from dataclasses import replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proxyprefill.protos import prefill_pb2 as pb
from proxyprefill.protos import prefill_pb2_grpc as pb_grpc
from proxyprefill.workers.heap import keep_freed_memory
from proxyprefill.workers.kv_wire import encode_event, header_message, pass_through
from proxyprefill.workers.prompts import PromptEncoder
from proxyprefill.workers.protocol import (
    PrefillDone,
    PrefillFailed,
    PrefillOptions,
    PrefillOutcome,
    Progress,
)

from . import audit, replies, tracing, wire
from .admission import Admission, AdmissionError
from .auth import Authenticator, AuthError, Principal
from .config import ServerConfig
from .errors import ServiceError, worker_error
from .kv_handles import KVHandleRPCs
from .leases import LeaseTable, new_handle
from .metrics import ServiceMetrics
from .metrics_http import MetricsEndpoint
from .upkeep import Upkeep
from .validation import Limits, PrefillPlan, RequestError, validate_prefill

log = logging.getLogger("proxyprefill.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PrefillService"].full_name
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# how a streaming call ends under its handler: cancelled while it waits on work (CancelledError),
# or closed by the handler while one of its events was being sent (GeneratorExit, see wire.py)
_CALL_ENDED = (asyncio.CancelledError, GeneratorExit)
_CLEANUP_SECONDS = 60.0  # how long a stop waits for cancelled prefills to free their work and KV

# a worker's PrefillFailed.error -> status (anything else: INTERNAL)
_WORKER_ERROR_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _finished(outcome: PrefillOutcome | None) -> PrefillDone:
    """The worker's final message when the prefill finished; else the status it ended with."""
    if isinstance(outcome, PrefillFailed):
        raise RequestError(_WORKER_ERROR_CODES.get(outcome.error, grpc.StatusCode.INTERNAL), outcome.message)
    if not isinstance(outcome, PrefillDone):  # stopped on the worker, or the stream ended without one
        raise RequestError(grpc.StatusCode.CANCELLED, "prefill was cancelled on its worker")
    return outcome


class PrefillServer(KVHandleRPCs, Upkeep, pb_grpc.PrefillServiceServicer):
    service_name = SERVICE_NAME

    def __init__(
        self,
        config: ServerConfig,
        pool,
        metrics: ServiceMetrics | None = None,
        tracer: tracing.RequestTracer | None = None,
    ):
        self.config = config
        self.pool = pool
        self.served = pool.description  # the model the workers serve, and how (a WorkerDescription)
        self.model_info = self.served.model
        self.limits = Limits.from_config(config, self.model_info)
        self.leases = LeaseTable(
            config.kv_memory_cap_bytes, config.default_lease_seconds, config.max_lease_seconds
        )
        self.pipeline_index = getattr(pool, "pipeline_index", None)  # the sharded route, if any
        self.admission = Admission(
            len(pool.names),
            config.max_pending_tokens,
            config.worker_slots,
            dedicated_workers=0 if self.pipeline_index is None else 1,
        )
        self.auth = Authenticator.from_config(config)
        self.metrics = metrics or ServiceMetrics(self.model_info.model_id)
        if tracer is None:
            tracer = tracing.RequestTracer.from_environment() if config.tracing else tracing.NO_TRACING
        self.tracer = tracer  # one span per RPC, when tracing is on (service/tracing.py)
        self.health = health.aio.HealthServicer()
        self._prompts: PromptEncoder | None = None  # text and chat input; None: no tokenizer
        self._server: grpc.aio.Server | None = None
        self._sweeper: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None
        self._incarnations: dict[int, str] = {}  # worker -> incarnation it last answered
        self._replacing: dict[int, asyncio.Task] = {}  # workers gone for good, being replaced
        self._prefills: set[asyncio.Task] = set()  # handlers in _run_prefill (drain waits for them)
        self._serving = True
        self._draining = False
        self._stopped = asyncio.Event()
        self._metrics_http: MetricsEndpoint | None = None  # /metrics when metrics_port is set
        self.port: int | None = None

    # lifecycle -------------------------------------------------------------------------------
    async def start(self) -> int:
        """Binds, starts serving, and returns the port (useful with listen 'HOST:0')."""
        keep_freed_memory()  # the server's process: every request's buffers, reused (workers/heap.py)
        if self.served.has_tokenizer:
            self._prompts = PromptEncoder(await asyncio.to_thread(self.pool.tokenizer))
        limit = self.config.max_message_bytes
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        )
        server.add_generic_rpc_handlers((self._method_handlers(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        if self.config.tls_enabled:
            credentials = _server_credentials(self.config)
            self.port = server.add_secure_port(self.config.listen, credentials)
        else:
            self.port = server.add_insecure_port(self.config.listen)
        if self.config.metrics_port is not None:
            self._metrics_http = MetricsEndpoint(
                self.metrics.registry,
                self.config.metrics_host,
                self.config.metrics_port,
                self.auth if self.config.metrics_require_token else None,
            )
        await server.start()
        self._server = server
        # SERVING only once a worker is up and warmed up (WorkerState.ready); the watch turns it on
        self._serving = await self._probe_workers()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self._serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)
        self._sweeper = asyncio.create_task(self._sweep_expired())
        self._watcher = asyncio.create_task(self._watch_workers())
        log.info(
            "serving %s on port %s (%d workers)",
            self.model_info.model_id,
            self.port,
            len(self.pool.actors),
        )
        return self.port

    def _method_handlers(self) -> grpc.GenericRpcHandler:
        """The service's handlers: each identifies the caller, then reads and parses its one request
        message itself (service/wire.py). KV goes out pre-serialised (workers/kv_wire.py), so the
        streaming methods' serializer passes bytes through."""
        methods = [
            wire.Method("Prefill", pb.PrefillRequest, self.Prefill, pass_through, True),
            wire.Method("FetchKV", pb.FetchKVRequest, self.FetchKV, pass_through, True),
            wire.Method("RenewLease", pb.RenewLeaseRequest, self.RenewLease, pb.LeaseInfo.SerializeToString),
            wire.Method(
                "ReleaseKV", pb.ReleaseKVRequest, self.ReleaseKV, pb.ReleaseKVResponse.SerializeToString
            ),
            wire.Method(
                "GetModelInfo", pb.GetModelInfoRequest, self.GetModelInfo, pb.ModelInfo.SerializeToString
            ),
            wire.Method("MapKV", pb.MapKVRequest, self.MapKV, pb.KVMapping.SerializeToString),
            wire.Method("PushKV", pb.PushKVRequest, self.PushKV, pb.PushKVResponse.SerializeToString),
        ]
        methods = [
            replace(m, behaviour=self.tracer.traced(m.name, SERVICE_NAME, m.behaviour, m.streams_responses))
            for m in methods
        ]
        return wire.generic_handler(SERVICE_NAME, methods, self._identify, self._abort)

    async def drain(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new prefills, let in-flight RPCs finish
        within `grace` seconds, then free every lease's KV."""
        if self._draining:
            await self._stopped.wait()
            return
        self._draining = True
        self.admission.close()
        await self.health.enter_graceful_shutdown()
        grace = self.config.drain_seconds if grace is None else grace
        log.info("draining: %d running, %d queued", self.admission.running, self.admission.queue_depth)
        if self._server is not None:
            await self._server.stop(grace)
        if self._prefills:  # cancelled by the stop: let them stop their work and free their KV
            await asyncio.wait(set(self._prefills), timeout=_CLEANUP_SECONDS)
        for task in (self._sweeper, self._watcher, *self._replacing.values()):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for lease in self.leases.drain_all():
            with contextlib.suppress(Exception):
                await self.pool.release(self._worker_index(lease.worker), lease.handle)
        self._update_gauges()
        if self._metrics_http is not None:
            self._metrics_http.close()
        self.tracer.shutdown()
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(self.drain()))

    # helpers ---------------------------------------------------------------------------------
    def _identify(self, context) -> Principal:
        return self.auth.identify(context.invocation_metadata(), context.peer())

    def _worker_index(self, name: str) -> int:
        return self.pool.names.index(name)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.queue_depth.set(self.admission.queue_depth)
        m.running.set(self.admission.running)
        m.pending_tokens.set(self.admission.pending_tokens)
        m.kv_bytes_held.set(self.leases.held_bytes)
        m.kv_handles.set(len(self.leases))

    def _kv_bytes_estimate(self, num_tokens: int) -> int:
        info = self.model_info
        item = _DTYPE_BYTES.get(info.dtype, 4)
        return 2 * info.num_layers * info.num_kv_heads * info.head_dim * item * num_tokens

    async def _abort(self, context, method: str, code: grpc.StatusCode, message: str):
        self.metrics.requests.labels(method, code.name).inc()
        await context.abort(code, message)

    # Prefill ---------------------------------------------------------------------------------
    async def Prefill(self, request, context):
        accepted_at = time.perf_counter()
        try:
            principal = self._identify(context)
            if self._draining:
                raise AdmissionError(
                    grpc.StatusCode.UNAVAILABLE, "server is draining; retry on another replica"
                )
            if request.WhichOneof("input") in ("text", "chat"):  # tokenising: off the event loop
                plan = await asyncio.to_thread(validate_prefill, request, self.limits, self._prompts)
            else:
                plan = validate_prefill(request, self.limits, None)
        except ServiceError as error:
            await self._abort(context, "Prefill", error.code, error.message)
            return
        rpc = tracing.current_rpc()
        rpc.set(request_id=plan.request_id, num_tokens=plan.num_tokens)

        reservation = None
        try:
            stages = await self._pipeline_stages(plan)
            if plan.kv_return != "none":
                reservation = self.leases.reserve(self._kv_bytes_estimate(plan.num_tokens))
            ticket = self.admission.admit(plan.num_tokens, self.pipeline_index if stages > 1 else None)
        except ServiceError as error:
            if reservation is not None:
                self.leases.cancel(reservation)
            await self._abort(context, "Prefill", error.code, error.message)
            return

        worker_name = self.pool.names[ticket.worker]
        rpc.set(worker=worker_name, pipeline_stages=stages)
        self._update_gauges()
        log.info(
            "prefill accepted request_id=%s tokens=%d worker=%s position=%d",
            plan.request_id,
            plan.num_tokens,
            worker_name,
            ticket.queue_position,
        )
        try:
            yield pb.PrefillEvent(
                accepted=pb.Accepted(
                    request_id=plan.request_id,
                    num_tokens=plan.num_tokens,
                    queue_position=ticket.queue_position,
                    pending_tokens=ticket.pending_tokens,
                    worker=worker_name,
                    pipeline_stages=stages,
                )
            )
            async with contextlib.aclosing(
                self._run_prefill(plan, ticket, worker_name, principal, reservation, accepted_at, stages)
            ) as events:
                async for event in events:
                    yield event
        except ServiceError as error:
            await self._abort(context, "Prefill", error.code, error.message)
        except _CALL_ENDED:
            self.metrics.requests.labels("Prefill", "CANCELLED").inc()
            raise
        else:
            self.metrics.requests.labels("Prefill", "OK").inc()
        finally:
            self.admission.finish(ticket)
            if reservation is not None:
                self.leases.cancel(reservation)
            self._update_gauges()

    async def _pipeline_stages(self, plan: PrefillPlan) -> int:
        """How many pipeline stages the request runs over: what it forces, else 1 up to
        shard_above_tokens, else the planner's choice. RESOURCE_EXHAUSTED, naming the bytes, when
        it fits no split (before any work)."""
        forced = plan.pipeline_stages
        if self.pipeline_index is None or forced == 1:
            return 1
        if forced == 0 and plan.num_tokens <= self.config.shard_above_tokens:
            return 1
        pending = self.admission.worker_pending_tokens()[self.pipeline_index]
        try:
            decision = await self.pool.plan(
                plan.num_tokens,
                plan.chunk_size,
                plan.num_logit_positions,
                forced or None,
                pending,
                self.config.shard_above_tokens,
            )
        except Exception as error:
            raise worker_error(error) from None
        if "refused" in decision:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{decision['refused']} [needs {decision['needed_bytes']} bytes, "
                f"{decision['available_bytes']} bytes available]",
            )
        log.info(
            "prefill request_id=%s planned over %d stage(s): %s",
            plan.request_id,
            decision["stages"],
            decision["reason"],
        )
        return int(decision["stages"])

    async def _run_prefill(
        self, plan: PrefillPlan, ticket, worker_name, principal, reservation, accepted_at, stages=1
    ):
        key = uuid.uuid4().hex
        keep_handle = new_handle() if plan.kv_return != "none" else None
        kept = False  # KV stored on the worker that no lease owns yet
        unclaimed = None  # the lease this call made, until its summary is sent (then the caller's)
        # a request that chose no attention settings runs the worker's defaults: its calibrated
        # profile when it has one (sharded stages have none, so they always get the settings)
        worker_defaults = not plan.attention_chosen and stages == 1
        options = PrefillOptions(
            chunk_size=plan.chunk_size,
            logits=plan.logits,
            attention=None if worker_defaults else plan.attention,
            config=None if worker_defaults else plan.proxy_config,
            keep_handle=keep_handle,
            stages=stages,
        )
        worker = ticket.worker
        handler = asyncio.current_task()
        self._prefills.add(handler)
        rpc = tracing.current_rpc()  # its open stages end with it when the request fails
        waiting = rpc.child("queue_wait")
        try:
            async with self.admission.turn(ticket):
                waiting.end()
                running = rpc.child("worker_prefill", worker=worker_name)
                queue_seconds = time.perf_counter() - accepted_at
                self.metrics.queue_latency.observe(queue_seconds)
                self._update_gauges()
                outcome = None
                try:
                    async for message in self.pool.prefill(worker, key, plan.token_ids, options):
                        if isinstance(message, Progress):
                            yield pb.PrefillEvent(
                                progress=pb.Progress(tokens_done=message.done, total_tokens=message.total)
                            )
                        else:
                            outcome = message
                            # from here the worker holds the KV: a cancellation anywhere before
                            # the lease owns it (the admission turn's exit included) must free it
                            kept = keep_handle is not None and isinstance(message, PrefillDone)
                except _CALL_ENDED:
                    self.metrics.cancelled.inc()
                    log.info("prefill cancelled request_id=%s", plan.request_id)
                    await wire.finish_despite_cancellation(self._abandon(worker, key, keep_handle))
                    raise
                except Exception as error:
                    failure = worker_error(error)
                    if failure.code == grpc.StatusCode.UNAVAILABLE:  # lost: route around it until
                        self.admission.set_available(worker, False)  # the watch hears from it again
                    raise failure from None
                running.end()
            result = _finished(outcome)
            self.metrics.time_to_first_token.observe(time.perf_counter() - accepted_at)
            returning = rpc.child("kv_return")
            for piece in replies.logit_pieces(result, self.config.max_kv_chunk_bytes):
                yield pb.PrefillEvent(logits=piece)
            header = header_message(result.header, int(plan.token_ids[-1]))
            if plan.kv_return == "inline":
                async for event in self._inline_kv(worker, keep_handle, plan, header):
                    yield event
            elif plan.kv_return == "handle":
                lease = self.leases.commit(
                    reservation,
                    keep_handle,
                    owner=principal.name,
                    worker=worker_name,
                    kv_bytes=result.kv_bytes,
                    num_tokens=result.num_tokens,
                    seconds=plan.lease_seconds,
                    header=result.header,
                    last_token_id=int(plan.token_ids[-1]),
                )
                kept, unclaimed = False, lease
                yield self._handle_event(lease, plan, principal, header, worker_name)
            returning.end()
            summary = self._summary(plan, result, queue_seconds, accepted_at)
            rpc.set(sparsity=summary.sparsity)
            yield pb.PrefillEvent(summary=summary)
            unclaimed = None
        finally:
            if kept:  # cancelled or failed after the worker kept KV: nobody owns it
                with contextlib.suppress(Exception):
                    await wire.finish_despite_cancellation(self.pool.release(worker, keep_handle))
            if unclaimed is not None:
                await wire.finish_despite_cancellation(self._release_unclaimed(unclaimed))
            self._prefills.discard(handler)

    async def _inline_kv(self, worker: int, handle: str, plan: PrefillPlan, header: pb.KVHeader):
        """The kept KV as kv_chunk events, pre-serialised; the header rides on the first."""
        first_header = header
        async with contextlib.aclosing(
            self._worker_kv(worker, handle, self.config.default_kv_chunk_bytes, plan)
        ) as pieces:
            async for piece in pieces:
                yield encode_event(piece, first_header)
                first_header = None
                self.metrics.kv_bytes_sent.inc(piece.nbytes)

    def _handle_event(self, lease, plan: PrefillPlan, principal, header: pb.KVHeader, worker_name: str):
        audit.handle_event(
            lease.handle, "created", principal.name, request_id=plan.request_id, kv_bytes=lease.kv_bytes
        )
        self._update_gauges()
        return pb.PrefillEvent(
            kv_handle=pb.KVHandle(
                handle=lease.handle,
                expires_at_unix_ms=lease.expires_at_unix_ms,
                kv_bytes=lease.kv_bytes,
                header=header,
                worker=worker_name,
            )
        )

    async def _release_unclaimed(self, lease) -> None:
        """Frees the KV of a handle whose Prefill call ended (cancelled, past its deadline) before
        its summary: the caller may never have read the handle, and nobody else knows it. A
        caller that did read it and then cancelled loses it too (the proto says so)."""
        try:
            self.leases.release(lease.handle, lease.owner)
        except ServiceError:  # already released by its caller, or lost with its worker
            return
        audit.handle_event(lease.handle, "released", lease.owner, reason="call_ended_before_summary")
        log.info("released an unclaimed handle=%s... bytes=%d", lease.handle[:8], lease.kv_bytes)
        with contextlib.suppress(Exception):
            await self.pool.release(self._worker_index(lease.worker), lease.handle)
        self._update_gauges()

    async def _abandon(self, worker: int, key: str, keep_handle: str | None) -> None:
        """Stops prefill `key` on its worker and waits until it has ended (the caller still holds
        its slot and tokens), freeing any KV it kept; a lost worker has nothing left to stop."""
        try:
            await self.pool.abandon(worker, key, keep_handle)
        except Exception as error:
            log.warning("abandoning prefill %s on %s: %s", key, self.pool.names[worker], error)

    def _summary(
        self, plan: PrefillPlan, result: PrefillDone, queue_seconds: float, accepted_at: float
    ) -> pb.Summary:
        """The request's Summary; its figures also go to the metrics and the log."""
        summary = replies.summary_message(plan, result, queue_seconds, time.perf_counter() - accepted_at)
        m = self.metrics
        m.prefill_latency.observe(summary.timings.total_seconds)
        m.estimate_seconds.observe(result.estimate_seconds)
        m.tokens_per_second.observe(summary.tokens_per_second)
        m.prompt_tokens.inc(result.num_tokens)
        m.prompt_length.observe(result.num_tokens)
        m.sparsity.observe(summary.sparsity)
        log.info(
            "prefill done request_id=%s tokens=%d sparsity=%.3f prefill_s=%.3f total_s=%.3f",
            plan.request_id,
            result.num_tokens,
            summary.sparsity,
            result.total_seconds,
            summary.timings.total_seconds,
        )
        return summary

    async def GetModelInfo(self, request, context):
        try:
            self._identify(context)
        except AuthError as error:
            await self._abort(context, "GetModelInfo", error.code, error.message)
            return None
        self.metrics.requests.labels("GetModelInfo", "OK").inc()
        return replies.model_info_message(
            self.served,
            self.limits,
            self.config,
            num_workers=len(self.pool.actors),
            has_chat_template=self._prompts is not None and self._prompts.has_chat_template,
        )


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    from pathlib import Path

    key = Path(config.tls_key).read_bytes()
    cert = Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca)
    )


async def serve(config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    """Runs the service until SIGTERM/SIGINT (then drains): local Ray unless ray_address is set.

    A signal that comes while the workers start is held until they are up (stopping Ray in the
    middle of ray.init or of a model load leaves it hung), then the workers and Ray are shut down
    without serving; without this the process died of the signal and its Ray processes ran on."""
    from proxyprefill.workers.ray_pool import WorkerPool

    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    pool = await asyncio.to_thread(WorkerPool.start, config.engine_kwargs(), **config.pool_kwargs())
    server = PrefillServer(config, pool)
    try:
        if stop_requested.is_set():
            log.warning("stop signal during start-up: shutting the workers and Ray down")
            return
        await server.start()
        server.install_signal_handlers()
        if ready is not None:
            ready.set()
        if not stop_requested.is_set():  # else it came while the server started: drain at once
            await server.wait()
    finally:
        await server.drain(0)
        pool.shutdown()
