"""A synchronous client of PrefillService (the CLI, the decode reference and tests use it).

    client = PrefillClient("127.0.0.1:50051", token=None)
    outcome = client.prefill(text="...", kv="handle", logits="last")
    outcome = client.prefill(messages=[ChatMessage("user", "...")])  # the model's chat template
    kv = client.fetch_kv(outcome.handle.handle, include_token_ids=True)
    kv.keys[layer]       # torch [Hkv, N, d], exactly the worker's tensor
    client.release(outcome.handle.handle)

KV and logits arrive as raw little-endian bytes with dtype and shape; they are rebuilt into
preallocated tensors (one copy per piece), never unpickled. FetchKV's chunks are read without a
protobuf parse of their bulk fields (workers/kv_wire.py), over several streams at once when asked.
"""

from __future__ import annotations

import array
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np

from proxyprefill.protos import prefill_pb2 as pb
from proxyprefill.protos import prefill_pb2_grpc as pb_grpc
from proxyprefill.workers.kv_wire import (
    NUMPY_DTYPES,
    KVSink,
    TensorSink,
    chunk_from_message,
    deliver,
    header_from_message,
    read_chunk,
    widened,
)
from proxyprefill.workers.prompts import ChatMessage

_FETCH_KV = "/proxyprefill.v1.PrefillService/FetchKV"
_KV_RETURNS = {"handle": pb.KV_RETURN_HANDLE, "inline": pb.KV_RETURN_INLINE, "none": pb.KV_RETURN_NONE}
_ATTENTION = {
    None: pb.ATTENTION_MODE_UNSPECIFIED,
    "proxy": pb.ATTENTION_MODE_PROXY,
    "dense": pb.ATTENTION_MODE_DENSE,
}


def packed_int32(token_ids) -> bytes:
    """Token ids as little-endian int32 bytes (TokenIds.packed_int32). A list or tuple goes through
    array.array, which refuses anything but ints in int32's range (about 1 ms at 32k ids, where
    protobuf's repeated field took 1.6 ms to fill and serialise); arrays and tensors through numpy,
    after the same checks."""
    if isinstance(token_ids, list | tuple):
        try:
            packed = array.array("i", token_ids)
        except TypeError as error:
            raise ValueError(f"token_ids must be integers: {error}") from None
        except OverflowError as error:
            raise ValueError(f"token_ids must fit in int32: {error}") from None
        if sys.byteorder != "little":
            packed.byteswap()
        return packed.tobytes()
    if hasattr(token_ids, "detach"):  # torch
        token_ids = token_ids.detach().cpu().numpy()
    ids = np.asarray(token_ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"token_ids must be integers, got an array of {ids.dtype}")
    ids = ids.reshape(-1)
    if ids.size and (ids.min() < -(2**31) or ids.max() >= 2**31):
        raise ValueError("token_ids must fit in int32")
    return ids.astype("<i4").tobytes()


def logits_from_message(message: pb.Logits) -> np.ndarray:
    """A Logits piece as float32 [rows, vocab], widened exactly from the dtype it came in (numpy:
    one thread, where torch's CPU conversion wakes a thread pool per call)."""
    raw = np.frombuffer(message.data, dtype=NUMPY_DTYPES[message.dtype]).reshape(tuple(message.shape))
    return widened(raw, message.dtype)


def tensor_from_bytes(data: bytes, dtype: str, shape: Iterable[int]):
    """A torch tensor of `dtype` and `shape` from raw little-endian bytes (bfloat16 via int16)."""
    import torch

    array = np.frombuffer(data, dtype=NUMPY_DTYPES[dtype]).reshape(tuple(shape))
    tensor = torch.from_numpy(array.copy())
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


@dataclass
class KVTransfer:
    """KV received from FetchKV (or inline): per-layer [Hkv, N, d] tensors and the header."""

    header: pb.KVHeader
    keys: list
    values: list
    token_ids: object = None  # torch int64 [N] when asked for
    bytes_received: int = 0
    transport: str = "grpc"  # or how it was mapped: "shared_memory", "cuda_ipc"

    def kv_header(self):
        return header_from_message(self.header)

    def save(self, path) -> None:
        """Writes the KV as a safetensors KV file (workers/kv_files.py format); needs token ids."""
        from proxyprefill.workers.kv_files import KVData, save_kv

        if self.token_ids is None:
            raise ValueError("saving a KV file needs the token ids: fetch with include_token_ids=True")
        save_kv(
            path,
            KVData(header=self.kv_header(), keys=self.keys, values=self.values, token_ids=self.token_ids),
        )


def transfer_from_sink(sink: TensorSink) -> KVTransfer:
    """The KVTransfer a TensorSink assembled (the layers it received, in order)."""
    if sink.message is None:
        raise ValueError("no KV received")
    present = [i for i, k in enumerate(sink.keys) if k is not None]
    return KVTransfer(
        header=sink.message,
        keys=[sink.keys[i] for i in present],
        values=[sink.values[i] for i in present],
        token_ids=sink.token_ids,
        bytes_received=sink.bytes_received,
    )


@dataclass
class PrefillOutcome:
    accepted: pb.Accepted | None = None
    summary: pb.Summary | None = None
    handle: pb.KVHandle | None = None
    logits: object = None  # torch float32 [P, vocab] (widened exactly when they came as bfloat16)
    logit_positions: list = field(default_factory=list)
    kv: KVTransfer | None = None
    events: int = 0


# FetchKV calls in parallel by default: one gRPC stream carries 0.8-1.0 GB/s on an H200 host's
# loopback, four carry 1.3-1.6 GB/s (BENCHMARKS.md, "FetchKV streams and piece sizes")
FETCH_STREAMS = 4


class PrefillClient:
    def __init__(
        self,
        target: str,
        token: str | None = None,
        root_certificates: bytes | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        channel: grpc.Channel | None = None,
    ):
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if channel is None:
            if root_certificates is not None:
                credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
                channel = grpc.secure_channel(target, credentials, options=options)
            else:
                channel = grpc.insecure_channel(target, options=options)
        self.channel = channel
        self.stub = pb_grpc.PrefillServiceStub(channel)
        # FetchKV's answers as raw bytes, read by kv_wire.read_chunk
        self._fetch_raw = channel.unary_stream(
            _FETCH_KV, request_serializer=pb.FetchKVRequest.SerializeToString, response_deserializer=None
        )
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PrefillClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def request(
        token_ids: Iterable[int] | None = None,
        text: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        kv: str = "handle",
        logits: str | list[int] = "none",
        chunk_size: int = 0,
        attention: str | None = None,
        lease_seconds: int = 0,
        request_id: str = "",
        include_token_ids: bool = False,
        add_special_tokens: bool = False,
        add_generation_prompt: bool = True,
        pipeline_stages: int = 0,
        **proxy_settings,
    ) -> pb.PrefillRequest:
        """One PrefillRequest. The prompt is exactly one of `token_ids`, `text` (tokenised by the
        server; `add_special_tokens` as the decode side tokenises) or `messages` (formatted by the
        model's chat template, ending with the assistant header unless `add_generation_prompt` is
        False)."""
        request = pb.PrefillRequest(
            request_id=request_id,
            chunk_size=chunk_size,
            add_special_tokens=add_special_tokens,
            pipeline_stages=pipeline_stages,
        )
        if sum(given is not None for given in (token_ids, text, messages)) != 1:
            raise ValueError("give exactly one of token_ids, text and messages")
        if token_ids is not None:
            request.tokens.packed_int32 = packed_int32(token_ids)
        elif text is not None:
            request.text = text
        else:
            request.chat.SetInParent()  # chat input, even with no messages (the server refuses those)
            request.chat.add_generation_prompt = add_generation_prompt
            for message in messages:
                request.chat.messages.add(role=message.role, content=message.content)
        request.returns.kv = _KV_RETURNS[kv]
        request.returns.lease_seconds = lease_seconds
        request.returns.include_token_ids = include_token_ids
        if isinstance(logits, str):
            request.returns.logits = {
                "none": pb.LOGITS_RETURN_NONE,
                "last": pb.LOGITS_RETURN_LAST,
                "all": pb.LOGITS_RETURN_ALL,
            }[logits]
        else:
            request.returns.logits = pb.LOGITS_RETURN_POSITIONS
            request.returns.logit_positions.extend(logits)
        request.attention.mode = _ATTENTION[attention]
        for name, value in proxy_settings.items():
            setattr(request.attention, name, value)
        return request

    def prefill_events(self, request: pb.PrefillRequest, timeout: float | None = None):
        """The raw event stream (a gRPC call object: iterate it, or .cancel() it)."""
        return self.stub.Prefill(request, timeout=timeout, metadata=self._metadata)

    def prefill(
        self,
        token_ids: Iterable[int] | None = None,
        text: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        timeout: float | None = None,
        on_event: Callable[[pb.PrefillEvent], None] | None = None,
        **options,
    ) -> PrefillOutcome:
        """Runs one prefill and collects its events (see `request` for the options)."""
        import torch

        request = self.request(token_ids=token_ids, text=text, messages=messages, **options)
        outcome = PrefillOutcome()
        logit_rows: list = []
        sink = None
        for event in self.prefill_events(request, timeout=timeout):
            outcome.events += 1
            if on_event is not None:
                on_event(event)
            which = event.WhichOneof("event")
            if which == "accepted":
                outcome.accepted = event.accepted
            elif which == "logits":
                logit_rows.append(logits_from_message(event.logits))
                outcome.logit_positions.extend(event.logits.positions)
            elif which == "kv_chunk":
                sink = sink or TensorSink()
                deliver(chunk_from_message(event.kv_chunk), sink)
            elif which == "kv_handle":
                outcome.handle = event.kv_handle
            elif which == "summary":
                outcome.summary = event.summary
        if logit_rows:
            outcome.logits = torch.from_numpy(
                logit_rows[0] if len(logit_rows) == 1 else np.concatenate(logit_rows)
            )
        if sink is not None:
            outcome.kv = transfer_from_sink(sink)
        return outcome

    def fetch_kv(
        self,
        handle: str,
        max_chunk_bytes: int = 0,
        layer_start: int | None = None,
        layer_end: int | None = None,
        include_token_ids: bool = False,
        timeout: float | None = None,
        streams: int = FETCH_STREAMS,
    ) -> KVTransfer:
        """The KV of `handle` over FetchKV; `streams` > 1 splits the layers into that many ranges
        fetched in parallel (each its own call; needs `layer_end` or asks GetModelInfo)."""
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        sink = TensorSink()
        first = 0 if layer_start is None else layer_start
        if streams == 1:
            self.fetch_kv_into(
                sink, handle, max_chunk_bytes, layer_start, layer_end, include_token_ids, timeout
            )
            return transfer_from_sink(sink)
        last = self.model_info(timeout=timeout).num_layers if layer_end is None else layer_end
        bounds = np.linspace(first, last, min(streams, last - first) + 1).round().astype(int).tolist()
        ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
        with ThreadPoolExecutor(len(ranges), thread_name_prefix="fetch-kv") as threads:
            calls = [
                threads.submit(
                    self.fetch_kv_into,
                    sink,
                    handle,
                    max_chunk_bytes,
                    start,
                    end,
                    include_token_ids and i == 0,
                    timeout,
                )
                for i, (start, end) in enumerate(ranges)
            ]
            for call in calls:
                call.result()
        return transfer_from_sink(sink)

    def fetch_kv_into(
        self,
        sink: KVSink,
        handle: str,
        max_chunk_bytes: int = 0,
        layer_start: int | None = None,
        layer_end: int | None = None,
        include_token_ids: bool = False,
        timeout: float | None = None,
    ) -> None:
        """One FetchKV call, every chunk handed to `sink` as it arrives."""
        request = pb.FetchKVRequest(
            handle=handle, max_chunk_bytes=max_chunk_bytes, include_token_ids=include_token_ids
        )
        if layer_start is not None:
            request.layer_start = layer_start
        if layer_end is not None:
            request.layer_end = layer_end
        for data in self._fetch_raw(request, timeout=timeout, metadata=self._metadata):
            deliver(read_chunk(data), sink)

    def map_kv(
        self, handle: str, transport: str = "", device: int | None = None, timeout: float | None = None
    ) -> KVTransfer:
        """The KV of `handle` mapped in place from its worker on this host (no copy over gRPC):
        shared memory for CPU-resident KV, CUDA IPC for GPU-resident KV ("" lets the worker pick).
        The tensors stay valid after release; the memory goes when they do. Raises KVShareError
        on another host, grpc.RpcError for what the server refuses."""
        import torch

        from proxyprefill.workers.kv_share import (
            TRANSPORT_ENUM,
            ProcessRef,
            consumer_to_message,
            open_share,
            share_from_message,
        )

        if transport not in TRANSPORT_ENUM:
            raise ValueError(f"transport: expected one of {sorted(TRANSPORT_ENUM)}, got {transport!r}")
        request = pb.MapKVRequest(handle=handle, transport=TRANSPORT_ENUM[transport])
        me = ProcessRef.this_process()
        if me is not None:  # lets the worker free CUDA IPC memory should this process die holding it
            request.consumer.CopyFrom(consumer_to_message(me))
        mapping = self.stub.MapKV(request, timeout=timeout, metadata=self._metadata)
        share = share_from_message(mapping)
        keys, values = open_share(share, device)
        token_ids = (
            torch.frombuffer(bytearray(share.token_ids), dtype=torch.int64) if share.token_ids else None
        )
        return KVTransfer(
            header=mapping.header, keys=keys, values=values, token_ids=token_ids, transport=share.transport
        )

    def get_kv(self, handle: str, transport: str = "auto", timeout: float | None = None) -> KVTransfer:
        """The KV of `handle` by the fastest way that works from here: `auto` maps it in place
        when the worker is on this host (MapKV) and streams it over gRPC (FetchKV) otherwise;
        `grpc`, `shared_memory` or `cuda_ipc` force one way."""
        from proxyprefill.workers.kv_share import KVShareError

        if transport == "grpc":
            return self.fetch_kv(handle, include_token_ids=True, timeout=timeout)
        if transport != "auto":
            return self.map_kv(handle, transport, timeout=timeout)
        try:
            return self.map_kv(handle, timeout=timeout)
        except KVShareError:
            pass  # another host, or a transport this process cannot open
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
                raise
        return self.fetch_kv(handle, include_token_ids=True, timeout=timeout)

    def push_kv(
        self,
        handle: str,
        backend: str = "gloo",
        host: str = "127.0.0.1",
        device=None,
        timeout_seconds: int = 60,
    ) -> KVTransfer:
        """The KV of `handle` pushed by its worker into this process over a torch.distributed
        link (workers/kv_push.py): `gloo` over TCP, `nccl` GPU to GPU (`device`: where the
        tensors land). `host` is this process's address as the worker can reach it."""
        import time
        import uuid

        from proxyprefill.workers.kv_push import KVReceiver

        receiver = KVReceiver(host, backend, device, timeout_seconds)
        transfer_id = uuid.uuid4().hex
        request = pb.PushKVRequest(
            handle=handle,
            rendezvous=receiver.address,
            backend=backend,
            transfer_id=transfer_id,
            timeout_seconds=timeout_seconds,
        )
        call = self.stub.PushKV.future(request, timeout=timeout_seconds + 30, metadata=self._metadata)
        # receive only once the worker is at the rendezvous: a refusal (bad handle, bad field)
        # ends the call first, and then nothing is left waiting
        deadline = time.monotonic() + timeout_seconds
        while not receiver.sender_arrived(transfer_id):
            if call.done():
                call.result()  # raises the server's status
                raise RuntimeError("PushKV answered before its worker reached the rendezvous")
            if time.monotonic() > deadline:
                call.cancel()
                raise TimeoutError(f"the worker did not reach {receiver.address} in {timeout_seconds} s")
            time.sleep(0.005)
        keys, values = receiver.receive(transfer_id)
        response = call.result()
        return KVTransfer(
            header=response.header,
            keys=keys,
            values=values,
            bytes_received=response.bytes_sent,
            transport=f"push-{backend}",
        )

    def renew(self, handle: str, lease_seconds: int = 0, timeout: float | None = None) -> pb.LeaseInfo:
        return self.stub.RenewLease(
            pb.RenewLeaseRequest(handle=handle, lease_seconds=lease_seconds),
            timeout=timeout,
            metadata=self._metadata,
        )

    def release(self, handle: str, timeout: float | None = None) -> pb.ReleaseKVResponse:
        return self.stub.ReleaseKV(
            pb.ReleaseKVRequest(handle=handle), timeout=timeout, metadata=self._metadata
        )

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)

    def wait_until_serving(self, timeout: float = 600.0, poll_seconds: float = 0.5) -> None:
        """Blocks until the server's health is SERVING (its workers are loaded and warmed up);
        TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        status = "UNKNOWN"
        while time.monotonic() < deadline:
            try:
                status = self.health(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
            except grpc.RpcError as error:
                status = error.code().name
            if status == "SERVING":
                return
            time.sleep(poll_seconds)
        raise TimeoutError(f"the server was not SERVING after {timeout:.0f} s (last status {status})")

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
