"""A synchronous client of PrefillService (the CLI, the decode reference and tests use it).

    client = PrefillClient("127.0.0.1:50051", token=None)
    outcome = client.prefill(text="...", kv="handle", logits="last")
    outcome = client.prefill(messages=[ChatMessage("user", "...")])  # the model's chat template
    kv = client.fetch_kv(outcome.handle.handle, include_token_ids=True)
    kv.keys[layer]       # torch [Hkv, N, d], exactly the worker's tensor
    client.release(outcome.handle.handle)

KV and logits arrive as raw little-endian bytes with dtype and shape; they are rebuilt into
preallocated tensors (one copy per piece), never unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from proxyprefill.protos import prefill_pb2 as pb
from proxyprefill.protos import prefill_pb2_grpc as pb_grpc
from proxyprefill.workers.prompts import ChatMessage

_NUMPY_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<i2", "float64": "<f8", "int64": "<i8"}
_KV_RETURNS = {"handle": pb.KV_RETURN_HANDLE, "inline": pb.KV_RETURN_INLINE, "none": pb.KV_RETURN_NONE}
_ATTENTION = {
    None: pb.ATTENTION_MODE_UNSPECIFIED,
    "proxy": pb.ATTENTION_MODE_PROXY,
    "dense": pb.ATTENTION_MODE_DENSE,
}


def tensor_from_bytes(data: bytes, dtype: str, shape: Iterable[int]):
    """A torch tensor of `dtype` and `shape` from raw little-endian bytes (bfloat16 via int16)."""
    import torch

    array = np.frombuffer(data, dtype=_NUMPY_DTYPES[dtype]).reshape(tuple(shape))
    tensor = torch.from_numpy(array.copy())
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def _numpy_view(tensor) -> np.ndarray:
    """A writable numpy view of a CPU tensor (bfloat16 seen as int16, the same bits)."""
    import torch

    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def header_dict(header: pb.KVHeader) -> dict:
    """The proto header as the engine's KVHeader fields (plus last_token_id)."""
    return {
        "model_id": header.model_id,
        "num_layers": header.num_layers,
        "num_kv_heads": header.num_kv_heads,
        "head_dim": header.head_dim,
        "dtype": header.dtype,
        "rope_theta": header.rope_theta,
        "rope_scaling": json.loads(header.rope_scaling_json or "null"),
        "num_tokens": header.num_tokens,
        "token_sha256": header.token_sha256,
        "layout": header.layout,
        "format_version": header.format_version,
    }


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
        from proxyprefill.workers.kv_files import KVHeader

        return KVHeader(**header_dict(self.header))

    def save(self, path) -> None:
        """Writes the KV as a safetensors KV file (workers/kv_files.py format); needs token ids."""
        from proxyprefill.workers.kv_files import KVData, save_kv

        if self.token_ids is None:
            raise ValueError("saving a KV file needs the token ids: fetch with include_token_ids=True")
        save_kv(
            path,
            KVData(header=self.kv_header(), keys=self.keys, values=self.values, token_ids=self.token_ids),
        )


class KVAssembler:
    """Builds KVTransfer tensors from a stream of KVChunk messages."""

    def __init__(self):
        self.header: pb.KVHeader | None = None
        self.keys: list = []
        self.values: list = []
        self.token_ids = None
        self.bytes_received = 0

    def add(self, chunk: pb.KVChunk) -> None:
        import torch

        if chunk.HasField("header"):
            self.header = chunk.header
            h = chunk.header
            dtype = getattr(torch, h.dtype)
            shape = (h.num_kv_heads, h.num_tokens, h.head_dim)
            self.keys = [None] * h.num_layers
            self.values = [None] * h.num_layers
            self._dtype, self._shape = dtype, shape
        if self.header is None:
            raise ValueError("KV stream did not start with a header")
        if chunk.token_ids:
            if self.token_ids is None:
                self.token_ids = torch.empty(self.header.num_tokens, dtype=torch.int64)
            ids = tensor_from_bytes(chunk.token_ids, "int64", (chunk.token_end - chunk.token_start,))
            self.token_ids[chunk.token_start : chunk.token_end] = ids
            return
        if not chunk.keys:
            return
        layer = chunk.layer
        if self.keys[layer] is None:
            self.keys[layer] = torch.empty(self._shape, dtype=self._dtype)
            self.values[layer] = torch.empty(self._shape, dtype=self._dtype)
        span = slice(chunk.token_start, chunk.token_end)
        if chunk.dtype != self.header.dtype:
            raise ValueError(f"KV chunk dtype {chunk.dtype} differs from the header's {self.header.dtype}")
        shape = tuple(chunk.shape)
        for target, data in ((self.keys[layer], chunk.keys), (self.values[layer], chunk.values)):
            # one copy: from the message's bytes straight into the preallocated tensor
            _numpy_view(target)[:, span] = np.frombuffer(data, dtype=_NUMPY_DTYPES[chunk.dtype]).reshape(
                shape
            )
        self.bytes_received += len(chunk.keys) + len(chunk.values)

    def result(self) -> KVTransfer:
        if self.header is None:
            raise ValueError("no KV received")
        present = [i for i, k in enumerate(self.keys) if k is not None]
        return KVTransfer(
            header=self.header,
            keys=[self.keys[i] for i in present],
            values=[self.values[i] for i in present],
            token_ids=self.token_ids,
            bytes_received=self.bytes_received,
        )


@dataclass
class PrefillOutcome:
    accepted: pb.Accepted | None = None
    summary: pb.Summary | None = None
    handle: pb.KVHandle | None = None
    logits: object = None  # torch float32 [P, vocab]
    logit_positions: list = field(default_factory=list)
    kv: KVTransfer | None = None
    events: int = 0


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
            request.tokens.ids.extend(int(t) for t in token_ids)
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
        assembler = None
        for event in self.prefill_events(request, timeout=timeout):
            outcome.events += 1
            if on_event is not None:
                on_event(event)
            which = event.WhichOneof("event")
            if which == "accepted":
                outcome.accepted = event.accepted
            elif which == "logits":
                logit_rows.append(
                    tensor_from_bytes(event.logits.data, event.logits.dtype, event.logits.shape)
                )
                outcome.logit_positions.extend(event.logits.positions)
            elif which == "kv_chunk":
                assembler = assembler or KVAssembler()
                assembler.add(event.kv_chunk)
            elif which == "kv_handle":
                outcome.handle = event.kv_handle
            elif which == "summary":
                outcome.summary = event.summary
        if logit_rows:
            outcome.logits = torch.cat(logit_rows)
        if assembler is not None:
            outcome.kv = assembler.result()
        return outcome

    def fetch_kv(
        self,
        handle: str,
        max_chunk_bytes: int = 0,
        layer_start: int | None = None,
        layer_end: int | None = None,
        include_token_ids: bool = False,
        timeout: float | None = None,
    ) -> KVTransfer:
        request = pb.FetchKVRequest(
            handle=handle, max_chunk_bytes=max_chunk_bytes, include_token_ids=include_token_ids
        )
        if layer_start is not None:
            request.layer_start = layer_start
        if layer_end is not None:
            request.layer_end = layer_end
        assembler = KVAssembler()
        for chunk in self.stub.FetchKV(request, timeout=timeout, metadata=self._metadata):
            assembler.add(chunk)
        return assembler.result()

    def map_kv(
        self, handle: str, transport: str = "", device: int | None = None, timeout: float | None = None
    ) -> KVTransfer:
        """The KV of `handle` mapped in place from its worker on this host (no copy over gRPC):
        shared memory for CPU-resident KV, CUDA IPC for GPU-resident KV ("" lets the worker pick).
        The tensors stay valid after release; the memory goes when they do. Raises KVShareError
        on another host, grpc.RpcError for what the server refuses."""
        import torch

        from proxyprefill.workers.kv_share import TRANSPORT_ENUM, open_share, share_from_message

        if transport not in TRANSPORT_ENUM:
            raise ValueError(f"transport: expected one of {sorted(TRANSPORT_ENUM)}, got {transport!r}")
        request = pb.MapKVRequest(handle=handle, transport=TRANSPORT_ENUM[transport])
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

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
