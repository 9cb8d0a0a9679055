"""KV pushed from the worker to a decode process over a torch.distributed point-to-point link.

For a decode process on another host (or one that wants its own copy), the tensors travel
through a collective-communication backend instead of gRPC messages: **gloo** (TCP, CPU tensors;
GPU-resident KV is copied to the host first) or **NCCL** (GPU to GPU, over NVLink or the
network; the two ends must be on different GPUs). gRPC stays the control plane:

    receiver = KVReceiver(host="10.0.0.5", backend="nccl", device="cuda:0")   # decode side
    PushKV(handle, rendezvous=receiver.address, backend="nccl")               # one RPC
    keys, values = receiver.receive(transfer_id)                              # meanwhile

The receiver hosts the rendezvous (a TCPStore). For each transfer the worker joins as rank 1 of
a two-rank group keyed by the transfer id, sends a small description (layers, heads, tokens, head
dim, dtype) and then every layer's keys and values as they are stored, and leaves; the receiver
(rank 0) allocates from the description and receives in place. Both ends time out rather than
hang when the other goes away.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_SENDER, _RECEIVER = 1, 0


class KVPushError(RuntimeError):
    """A push that cannot start or did not finish; the message names the field or the cause."""


@dataclass
class PushTarget:
    """Where and how a worker pushes one handle's KV."""

    host: str
    port: int
    backend: str
    transfer_id: str
    timeout_seconds: float = 60.0

    @classmethod
    def parse(cls, rendezvous: str, backend: str, transfer_id: str, timeout_seconds: float) -> PushTarget:
        host, sep, port = rendezvous.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise KVPushError(f"rendezvous: expected HOST:PORT, got {rendezvous!r}")
        if backend not in BACKENDS:
            raise KVPushError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if not transfer_id or len(transfer_id) > 64 or not transfer_id.replace("-", "").isalnum():
            raise KVPushError(f"transfer_id: 1-64 letters, digits or '-', got {transfer_id!r}")
        if not 0 < timeout_seconds <= 3600:
            raise KVPushError(f"timeout_seconds: must be in (0, 3600], got {timeout_seconds}")
        return cls(host.strip("[]"), int(port), backend, transfer_id, timeout_seconds)


def _arrival_key(transfer_id: str) -> str:
    return f"proxyprefill-kv/{transfer_id}/sender"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _group(store: dist.Store, host: str, rank: int, backend: str, transfer_id: str, timeout: timedelta):
    """A two-rank process group for one transfer (no global state: several run at once)."""
    prefix = dist.PrefixStore(f"proxyprefill-kv/{transfer_id}", store)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        # a receiver on loopback is reached on loopback; otherwise gloo binds the host's address
        device = (
            dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
            if _is_loopback(host)
            else dist.ProcessGroupGloo.create_default_device()
        )
        options._devices = [device]
        return dist.ProcessGroupGloo(prefix, rank, 2, options)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(prefix, rank, 2, options)


def push_kv(keys: list[torch.Tensor], values: list[torch.Tensor], target: PushTarget) -> int:
    """Sends per-layer [Hkv, N, d] KV to the receiver at `target`; returns the bytes sent."""
    timeout = timedelta(seconds=target.timeout_seconds)
    try:
        store = dist.TCPStore(target.host, target.port, world_size=2, is_master=False, timeout=timeout)
    except (RuntimeError, OSError) as error:
        raise KVPushError(f"rendezvous: cannot reach {target.host}:{target.port}: {error}") from None
    store.set(_arrival_key(target.transfer_id), "1")
    group = _group(store, target.host, _SENDER, target.backend, target.transfer_id, timeout)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if target.backend == "nccl" else torch.device("cpu")
    )
    heads, tokens, head_dim = keys[0].shape
    description = torch.tensor(
        [len(keys), heads, tokens, head_dim, _DTYPES.index(keys[0].dtype)], dtype=torch.int64, device=device
    )
    try:
        group.send([description], _RECEIVER, 0).wait()
        sent = 0
        for tag, tensor in enumerate(keys + values, start=1):
            tensor = tensor.to(device).contiguous()
            group.send([tensor], _RECEIVER, tag).wait()
            sent += tensor.numel() * tensor.element_size()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return sent
    except RuntimeError as error:
        raise KVPushError(f"push to {target.host}:{target.port} failed: {error}") from None
    finally:
        group.shutdown() if hasattr(group, "shutdown") else None


class KVReceiver:
    """The decode side of a push: hosts the rendezvous and receives one handle's KV per call."""

    def __init__(
        self, host: str = "127.0.0.1", backend: str = "gloo", device=None, timeout_seconds: float = 60
    ):
        if backend not in BACKENDS:
            raise KVPushError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.host, self.backend = host, backend
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self.timeout = timedelta(seconds=timeout_seconds)
        self._store = dist.TCPStore(
            host, 0, world_size=2, is_master=True, timeout=self.timeout, wait_for_workers=False
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self._store.port}"

    def sender_arrived(self, transfer_id: str) -> bool:
        """Whether the worker has reached the rendezvous for `transfer_id` (then `receive` will
        not wait on a sender that never comes)."""
        return self._store.check([_arrival_key(transfer_id)])

    def receive(self, transfer_id: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Blocks until the worker has pushed `transfer_id`; per-layer [Hkv, N, d] K and V."""
        group = _group(self._store, self.host, _RECEIVER, self.backend, transfer_id, self.timeout)
        wire = self.device if self.backend == "nccl" else torch.device("cpu")
        try:
            description = torch.empty(5, dtype=torch.int64, device=wire)
            group.recv([description], _SENDER, 0).wait()
            layers, heads, tokens, head_dim, dtype_index = description.tolist()
            tensors = []
            for tag in range(1, 2 * layers + 1):
                tensor = torch.empty(heads, tokens, head_dim, dtype=_DTYPES[dtype_index], device=wire)
                group.recv([tensor], _SENDER, tag).wait()
                tensors.append(tensor.to(self.device))
        except RuntimeError as error:
            raise KVPushError(f"receiving {transfer_id} failed: {error}") from None
        finally:
            group.shutdown() if hasattr(group, "shutdown") else None
        return tensors[:layers], tensors[layers:]
