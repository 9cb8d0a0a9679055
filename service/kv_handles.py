"""The KV-handle RPCs of PrefillServer: FetchKV, MapKV, PushKV, RenewLease and ReleaseKV.

A mixin of PrefillServer (service/server.py), which owns the state these use: the leases
(service/leases.py), the worker pool, the metrics and the config. The KV's wire format is
workers/kv_wire.py; `_worker_kv` is also how Prefill streams inline KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc

from proxyprefill.protos import prefill_pb2 as pb
from proxyprefill.workers.kv_push import KVPushError, PushTarget
from proxyprefill.workers.kv_share import (
    KVShareError,
    consumer_from_message,
    share_to_message,
    transport_name,
)
from proxyprefill.workers.kv_wire import encode_chunk, header_message
from proxyprefill.workers.protocol import KVMissing, KVUnavailable

from . import audit
from .errors import ServiceError, WorkerGone, worker_error
from .leases import Lease
from .validation import RequestError


def _refuse_sharded(lease: Lease) -> None:
    """MapKV and PushKV serve the KV of one worker; a sharded prefill's is on several stages."""
    if lease.worker == "pipeline":
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "handle: a sharded prefill's KV lives on several stages; use FetchKV",
        )


class KVHandleRPCs:
    """PrefillServer's KV-handle methods; they use the server's `leases`, `pool`, `metrics`,
    `config`, `_identify`, `_abort`, `_update_gauges` and `_worker_index`."""

    async def _worker_kv(self, worker: int, handle: str, max_chunk_bytes: int, plan=None, request=None):
        """KV pieces of `handle` from its worker (inline prefill or FetchKV)."""
        if request is not None:
            args = (
                request.layer_start if request.HasField("layer_start") else 0,
                request.layer_end if request.HasField("layer_end") else None,
                request.include_token_ids,
            )
        else:
            args = (0, None, plan.include_token_ids)
        stream = self.pool.fetch(worker, handle, max_chunk_bytes, *args)
        finished = False
        try:
            async for ref in stream:
                item = await ref
                if isinstance(item, KVMissing):
                    raise WorkerGone()
                if isinstance(item, KVUnavailable):  # a pipeline stage died mid-stream; the KV is gone
                    self.leases.lose(handle)
                    self._update_gauges()
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, item.message)
                yield item
            finished = True
        except WorkerGone:
            self.leases.lose(handle)
            self._update_gauges()
            if request is not None:  # released or expired while this fetch started: say which
                self.leases.get(handle, "")
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the KV is no longer on its worker (restarted); prefill again",
            ) from None
        except ServiceError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise worker_error(error) from None
        finally:
            if not finished:  # the reader went away or failed: stop the worker's stream
                self.pool.cancel_stream(stream)

    async def FetchKV(self, request, context):
        try:
            principal = self._identify(context)
            lease = self.leases.get(request.handle, principal.name)
            max_chunk = request.max_chunk_bytes or self.config.default_kv_chunk_bytes
            if max_chunk < 1024:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"max_chunk_bytes must be >= 1024, got {max_chunk}"
                )
            max_chunk = min(max_chunk, self.config.max_kv_chunk_bytes)
            layers = lease.header["num_layers"]
            start = request.layer_start if request.HasField("layer_start") else 0
            end = request.layer_end if request.HasField("layer_end") else layers
            if not 0 <= start < end <= layers:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"layer_start/layer_end must satisfy 0 <= start < end <= {layers}, got [{start}, {end})",
                )
        except ServiceError as error:
            await self._abort(context, "FetchKV", error.code, error.message)
            return
        header = header_message(lease.header, lease.last_token_id)
        worker = self._worker_index(lease.worker)
        try:
            async with contextlib.aclosing(
                self._worker_kv(worker, lease.handle, max_chunk, request=request)
            ) as pieces:
                async for item in pieces:
                    yield encode_chunk(item, header)
                    header = None
                    self.metrics.kv_bytes_sent.inc(item.nbytes)
        except ServiceError as error:
            await self._abort(context, "FetchKV", error.code, error.message)
            return
        self.metrics.requests.labels("FetchKV", "OK").inc()
        audit.handle_event(lease.handle, "fetched", principal.name, layers=f"{start}-{end}")

    async def MapKV(self, request, context):
        """Same-host handoff (workers/kv_share.py): the worker shares the KV memory (a segment
        once per handle, or CUDA IPC handles for this consumer); the lease keeps it, ReleaseKV or
        expiry unlinks it."""
        try:
            principal = self._identify(context)
            lease = self.leases.get(request.handle, principal.name)
            try:
                transport = transport_name(request.transport)
                consumer = consumer_from_message(request.consumer) if request.HasField("consumer") else None
            except KVShareError as error:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
            _refuse_sharded(lease)
            share = await self._on_worker(lease, self.pool.share, transport, consumer, expected=KVShareError)
        except KVShareError as error:
            await self._abort(context, "MapKV", grpc.StatusCode.FAILED_PRECONDITION, str(error))
            return None
        except ServiceError as error:
            await self._abort(context, "MapKV", error.code, error.message)
            return None
        self.metrics.requests.labels("MapKV", "OK").inc()
        audit.handle_event(lease.handle, "mapped", principal.name, transport=share.transport)
        return share_to_message(share, header_message(lease.header, lease.last_token_id))

    async def PushKV(self, request, context):
        """KV pushed to a receiver over gloo or NCCL (workers/kv_push.py); gRPC only controls."""
        try:
            principal = self._identify(context)
            lease = self.leases.get(request.handle, principal.name)
            try:
                target = PushTarget.parse(
                    request.rendezvous, request.backend, request.transfer_id, request.timeout_seconds or 60
                )
            except KVPushError as error:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
            _refuse_sharded(lease)
            started = time.perf_counter()
            sent = await self._on_worker(lease, self.pool.push, target, expected=KVPushError)
        except KVPushError as error:
            await self._abort(context, "PushKV", grpc.StatusCode.UNAVAILABLE, str(error))
            return None
        except ServiceError as error:
            await self._abort(context, "PushKV", error.code, error.message)
            return None
        self.metrics.kv_bytes_sent.inc(sent)
        self.metrics.requests.labels("PushKV", "OK").inc()
        audit.handle_event(lease.handle, "pushed", principal.name, backend=target.backend, bytes=sent)
        return pb.PushKVResponse(
            header=header_message(lease.header, lease.last_token_id),
            bytes_sent=sent,
            seconds=time.perf_counter() - started,
        )

    async def _on_worker(self, lease: Lease, method, *args, expected: type[Exception]):
        """`method(worker, handle, *args)` on the lease's worker; its `expected` error passes
        through, a missing handle loses the lease (FAILED_PRECONDITION)."""
        try:
            answer = await method(self._worker_index(lease.worker), lease.handle, *args)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, expected):
                raise cause from None
            raise worker_error(error) from None
        if answer is None:
            self.leases.lose(lease.handle)
            self._update_gauges()
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the KV is no longer on its worker (restarted); prefill again",
            )
        return answer

    async def RenewLease(self, request, context):
        try:
            principal = self._identify(context)
            lease = self.leases.renew(request.handle, principal.name, request.lease_seconds)
        except ServiceError as error:
            await self._abort(context, "RenewLease", error.code, error.message)
            return None
        self.metrics.requests.labels("RenewLease", "OK").inc()
        audit.handle_event(
            lease.handle, "renewed", principal.name, expires_at_unix_ms=lease.expires_at_unix_ms
        )
        return _lease_info(lease)

    async def ReleaseKV(self, request, context):
        try:
            principal = self._identify(context)
            lease = self.leases.release(request.handle, principal.name)
        except ServiceError as error:
            await self._abort(context, "ReleaseKV", error.code, error.message)
            return None
        audit.handle_event(lease.handle, "released", principal.name, kv_bytes=lease.kv_bytes)
        freed = 0
        with contextlib.suppress(Exception):
            freed = await self.pool.release(self._worker_index(lease.worker), lease.handle)
        self._update_gauges()
        if not freed:  # its worker restarted or died before the watch noticed: the KV was lost
            message = "the KV of this handle was lost with its worker (restarted); nothing was released"
            await self._abort(context, "ReleaseKV", grpc.StatusCode.FAILED_PRECONDITION, message)
            return None
        self.metrics.requests.labels("ReleaseKV", "OK").inc()
        return pb.ReleaseKVResponse(released_bytes=freed)  # what the worker freed, not the record


def _lease_info(lease: Lease) -> pb.LeaseInfo:
    return pb.LeaseInfo(
        handle=lease.handle,
        expires_at_unix_ms=lease.expires_at_unix_ms,
        kv_bytes=lease.kv_bytes,
        num_tokens=lease.num_tokens,
    )
