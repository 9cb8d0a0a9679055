"""Same-host KV handoff: the worker shares its KV memory; a decode process on its host maps it.

gRPC moves KV at a few hundred MB/s because every byte is copied into messages and out again. A
decode process on the worker's machine needs none of that; it can read the memory in place:

- **GPU-resident KV** (the engine ran on CUDA): the worker exports CUDA IPC handles of the
  tensors it already keeps under the handle; no copy at all. A process on the same host opens
  them on its GPU (the same GPU, or another one of the host that has peer access).
- **CPU-resident KV**: the worker copies every layer once into one POSIX shared-memory segment
  (`/dev/shm/<name>`); the decode process maps that file copy-on-write (`torch.from_file`), so
  its tensors cost no copy until it writes to them.

Lifetime follows the lease: the worker keeps the tensors (and the segment) until the handle is
released or expires, then drops the tensors and unlinks the segment. A mapping a decode process
still holds stays readable until it unmaps, and the worker never waits on a client:

- shared memory: the kernel frees the pages with the last mapping, so a decoder that dies
  holding one frees it with its death;
- CUDA IPC: torch keeps an exported GPU block (in its "limbo") until the consumer decrements
  the export's reference counter. Each MapKV therefore gets an export of its own (one counter,
  one release), and the worker remembers which process asked (`ProcessRef`): a consumer killed
  before it let go never decrements, so `CudaExports.reap` does it on the dead process's behalf
  and the block is freed.

Worker and server exchange `KVShare` (typed); the server turns it into the `KVMapping` message
and the client turns that back into tensors with `open_share`.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import torch

SHARED_MEMORY = "shared_memory"
CUDA_IPC = "cuda_ipc"
SHM_DIR = Path("/dev/shm")


class KVShareError(RuntimeError):
    """The KV cannot be mapped here (another host, no /dev/shm, no CUDA)."""


@functools.cache
def host_id() -> str:
    """This machine's boot id: two processes can share memory only where it is the same."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        import socket

        return socket.gethostname()


@dataclass
class CudaIpc:
    """What `UntypedStorage._share_cuda_` returns for a tensor's storage."""

    device: int
    handle: bytes
    storage_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


@dataclass
class SharedTensorInfo:
    """One shared tensor: shape and strides (elements), and where its bytes are."""

    shape: list[int]
    stride: list[int]
    offset_bytes: int = 0  # shared memory: byte offset in the segment
    storage_offset: int = 0  # CUDA IPC: element offset in the storage
    cuda: CudaIpc | None = None


@dataclass
class KVShare:
    """A worker's answer to a map request: how to reach every layer's keys and values."""

    transport: str
    host_id: str
    dtype: str
    keys: list[SharedTensorInfo]
    values: list[SharedTensorInfo]
    shm_name: str = ""
    shm_bytes: int = 0
    token_ids: bytes = b""  # int64 little-endian [N]


@dataclass
class SharedKV:
    """What a worker keeps alive for one handle's share: the segment (CPU) or nothing extra
    (CUDA: the stored tensors themselves are shared)."""

    share: KVShare
    segment: shared_memory.SharedMemory | None = field(default=None, repr=False)

    def close(self) -> None:
        """Unlinks the segment; mappings already made stay valid until their owners unmap."""
        if self.segment is not None:
            self.segment.close()
            try:
                self.segment.unlink()
            except FileNotFoundError:
                pass
            self.segment = None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _share_cpu(keys: list[torch.Tensor], values: list[torch.Tensor], name: str) -> SharedKV:
    tensors = keys + values
    total = sum(t.numel() * t.element_size() for t in tensors)
    segment = shared_memory.SharedMemory(name=name, create=True, size=max(1, total))
    infos, offset, source = [], 0, None
    buffer = torch.frombuffer(segment.buf, dtype=torch.uint8, count=max(1, total))
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        source = tensor.detach().contiguous().view(-1).view(torch.uint8)
        buffer[offset : offset + nbytes].copy_(source)
        shape = list(tensor.shape)
        infos.append(
            SharedTensorInfo(shape=shape, stride=list(torch.empty(shape).stride()), offset_bytes=offset)
        )
        offset += nbytes
    del buffer, source  # no exported views may outlive the segment's close()
    layers = len(keys)
    share = KVShare(
        transport=SHARED_MEMORY,
        host_id=host_id(),
        dtype=_dtype_name(keys[0].dtype),
        keys=infos[:layers],
        values=infos[layers:],
        shm_name=segment.name,
        shm_bytes=total,
    )
    return SharedKV(share, segment)


def _share_cuda(keys: list[torch.Tensor], values: list[torch.Tensor]) -> SharedKV:
    # every call wraps each storage in a new torch export with its own reference counter
    infos = []
    for tensor in keys + values:
        ipc = CudaIpc(*tensor.untyped_storage()._share_cuda_())
        infos.append(
            SharedTensorInfo(
                shape=list(tensor.shape),
                stride=list(tensor.stride()),
                storage_offset=tensor.storage_offset(),
                cuda=ipc,
            )
        )
    layers = len(keys)
    share = KVShare(
        transport=CUDA_IPC,
        host_id=host_id(),
        dtype=_dtype_name(keys[0].dtype),
        keys=infos[:layers],
        values=infos[layers:],
    )
    return SharedKV(share)


def share_kv(
    keys: list[torch.Tensor], values: list[torch.Tensor], token_ids, transport: str, name: str
) -> SharedKV:
    """Shares per-layer [Hkv, N, d] KV by `transport` ("" picks by where the KV is). `name`
    names the shared-memory segment (unique per handle)."""
    shared = _share(keys, values, transport, name)
    shared.share.token_ids = np.ascontiguousarray(token_ids, dtype="<i8").tobytes()
    return shared


def _share(keys, values, transport: str, name: str) -> SharedKV:
    on_gpu = keys[0].is_cuda
    transport = transport or (CUDA_IPC if on_gpu else SHARED_MEMORY)
    if transport == CUDA_IPC:
        if not on_gpu:
            raise KVShareError(
                "transport: CUDA IPC needs GPU-resident KV; this worker keeps it in CPU memory"
            )
        return _share_cuda(keys, values)
    if transport == SHARED_MEMORY:
        if not SHM_DIR.is_dir():
            raise KVShareError(f"transport: shared memory needs {SHM_DIR}, absent on the worker's host")
        return _share_cpu([k.cpu() for k in keys], [v.cpu() for v in values], name)
    raise KVShareError(f"transport: unknown {transport!r}")


# who mapped a CUDA IPC export, and whether it let go --------------------------------------
@dataclass(frozen=True)
class ProcessRef:
    """A process of this host, told apart from a later one reusing its pid: pid, start time
    (clock ticks after boot) and pid namespace (a pid means nothing in another namespace)."""

    pid: int
    start_ticks: int
    pid_namespace: int

    @classmethod
    def this_process(cls) -> ProcessRef | None:
        ticks = _start_ticks(os.getpid())
        return None if ticks is None else cls(os.getpid(), ticks, _pid_namespace())

    def alive(self) -> bool | None:
        """Whether the process still runs; None where this process cannot tell (another pid
        namespace)."""
        if self.pid_namespace != _pid_namespace():
            return None
        return _start_ticks(self.pid) == self.start_ticks


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _start_ticks(pid: int) -> int | None:
    """The process's start time from /proc/<pid>/stat; None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3
    return None if fields[0] in ("Z", "X") else int(fields[19])  # starttime is field 22


# torch's reference-counter files: a RefcountedMapAllocator segment in /dev/shm whose data (int64
# counters, one per export) starts after its 64-byte header
_REF_COUNTER_HEADER_BYTES = 64


def _export_counter(handle: bytes, offset: int) -> int | None:
    """An export's reference count (1 while its consumer holds it, 0 once let go); None when
    torch has retired the counter file (every export in it is over)."""
    try:
        with open(SHM_DIR / handle.decode().lstrip("/"), "rb") as counters:
            counters.seek(_REF_COUNTER_HEADER_BYTES + 8 * offset)
            raw = counters.read(8)
    except (OSError, UnicodeDecodeError):
        return None
    return int.from_bytes(raw, "little", signed=True) if len(raw) == 8 else None


@dataclass
class CudaExport:
    """One MapKV's CUDA IPC export: the consumer and each tensor's counter (handle, offset)."""

    consumer: ProcessRef | None
    counters: list[tuple[bytes, int]]


class CudaExports:
    """The CUDA IPC exports a worker made, until each consumer has let go or died."""

    def __init__(self):
        self._lock = threading.Lock()
        self._exports: list[CudaExport] = []

    def add(self, shared: SharedKV, consumer: ProcessRef | None) -> None:
        infos = shared.share.keys + shared.share.values
        counters = [(i.cuda.ref_counter_handle, i.cuda.ref_counter_offset) for i in infos if i.cuda]
        with self._lock:
            self._exports.append(CudaExport(consumer, counters))

    def reap(self) -> int:
        """Forgets the exports whose consumer let go, releases those of consumers that died
        holding them (torch then frees the blocks) and answers how many it released. Exports of
        a consumer we cannot see (another pid namespace) are kept until it lets go."""
        released = []
        with self._lock:
            before = len(self._exports)
            kept = []
            for export in self._exports:
                counts = [_export_counter(handle, offset) for handle, offset in export.counters]
                held = [c for c, count in zip(export.counters, counts, strict=True) if count and count > 0]
                if not held:
                    continue  # let go
                if export.consumer is not None and export.consumer.alive() is False:
                    released.append(held)
                else:
                    kept.append(export)
            self._exports = kept
        for held in released:
            for handle, offset in held:
                torch.UntypedStorage._release_ipc_counter_cuda(handle, offset)
        if len(kept) < before:
            torch.cuda.ipc_collect()  # frees the blocks of the exports that just ended
        return len(released)


def _open_cpu(share: KVShare) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    path = SHM_DIR / share.shm_name
    if not path.exists():
        raise KVShareError(f"shm_name: {path} is gone (released, expired, or another host)")
    dtype = getattr(torch, share.dtype)
    element = torch.empty((), dtype=dtype).element_size()
    # a private (copy-on-write) mapping of the whole segment: no copy, and writes stay ours
    whole = torch.from_file(os.fspath(path), shared=False, size=share.shm_bytes // element, dtype=dtype)

    def view(info: SharedTensorInfo) -> torch.Tensor:
        return whole.as_strided(info.shape, info.stride, info.offset_bytes // element)

    return [view(i) for i in share.keys], [view(i) for i in share.values]


def _open_cuda(share: KVShare, device: int | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if not torch.cuda.is_available():
        raise KVShareError("transport: CUDA IPC needs CUDA in the decode process")
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    dtype = getattr(torch, share.dtype)

    def view(info: SharedTensorInfo) -> torch.Tensor:
        ipc = info.cuda
        tensor = rebuild_cuda_tensor(
            torch.Tensor,
            torch.Size(info.shape),
            tuple(info.stride),
            info.storage_offset,
            torch.UntypedStorage,
            dtype,
            ipc.device,
            ipc.handle,
            ipc.storage_bytes,
            ipc.storage_offset_bytes,
            False,
            ipc.ref_counter_handle,
            ipc.ref_counter_offset,
            ipc.event_handle,
            ipc.event_sync_required,
        )
        return tensor if device is None or device == ipc.device else tensor.to(f"cuda:{device}")

    return [view(i) for i in share.keys], [view(i) for i in share.values]


def open_share(share: KVShare, device: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer [Hkv, N, d] keys and values mapped from `share`, in this process. CUDA tensors
    open on the worker's GPU (then copied to `device` when another one is asked for)."""
    if share.host_id != host_id():
        raise KVShareError("host_id: the KV lives on another host; fetch it over the network instead")
    if share.transport == SHARED_MEMORY:
        return _open_cpu(share)
    if share.transport == CUDA_IPC:
        return _open_cuda(share, device)
    raise KVShareError(f"transport: unknown {share.transport!r}")


# the gRPC message (protos/prefill.proto: KVMapping) -----------------------------------------
TRANSPORT_ENUM = {"": 0, SHARED_MEMORY: 1, CUDA_IPC: 2}


def transport_name(enum_value: int) -> str:
    """The KVTransport enum value as the worker's transport name ("" = the worker picks)."""
    names = {v: k for k, v in TRANSPORT_ENUM.items()}
    if enum_value not in names:
        raise KVShareError(f"transport: unknown KVTransport value {enum_value}")
    return names[enum_value]


def share_to_message(share: KVShare, header):
    """A KVMapping message for `share`; `header` is the handle's KVHeader message."""
    from proxyprefill.protos import prefill_pb2 as pb

    def tensor(info: SharedTensorInfo) -> pb.SharedTensor:
        message = pb.SharedTensor(
            shape=info.shape,
            stride=info.stride,
            offset_bytes=info.offset_bytes,
            storage_offset=info.storage_offset,
        )
        if info.cuda is not None:
            ipc = info.cuda
            message.cuda_ipc_handle = ipc.handle
            message.cuda_storage_bytes = ipc.storage_bytes
            message.cuda_storage_offset_bytes = ipc.storage_offset_bytes
            message.cuda_device = ipc.device
            message.cuda_ref_counter_handle = ipc.ref_counter_handle
            message.cuda_ref_counter_offset = ipc.ref_counter_offset
            message.cuda_event_handle = ipc.event_handle or b""
            message.cuda_event_sync_required = ipc.event_sync_required
        return message

    return pb.KVMapping(
        header=header,
        transport=TRANSPORT_ENUM[share.transport],
        host_id=share.host_id,
        shm_name=share.shm_name,
        shm_bytes=share.shm_bytes,
        keys=[tensor(i) for i in share.keys],
        values=[tensor(i) for i in share.values],
        token_ids=share.token_ids,
    )


def share_from_message(message) -> KVShare:
    """The KVShare a KVMapping message describes."""

    def info(tensor) -> SharedTensorInfo:
        cuda = None
        if tensor.cuda_ipc_handle:
            cuda = CudaIpc(
                device=tensor.cuda_device,
                handle=tensor.cuda_ipc_handle,
                storage_bytes=tensor.cuda_storage_bytes,
                storage_offset_bytes=tensor.cuda_storage_offset_bytes,
                ref_counter_handle=tensor.cuda_ref_counter_handle,
                ref_counter_offset=tensor.cuda_ref_counter_offset,
                event_handle=tensor.cuda_event_handle or None,
                event_sync_required=tensor.cuda_event_sync_required,
            )
        return SharedTensorInfo(
            shape=list(tensor.shape),
            stride=list(tensor.stride),
            offset_bytes=tensor.offset_bytes,
            storage_offset=tensor.storage_offset,
            cuda=cuda,
        )

    return KVShare(
        transport=transport_name(message.transport),
        host_id=message.host_id,
        dtype=message.header.dtype,
        keys=[info(t) for t in message.keys],
        values=[info(t) for t in message.values],
        shm_name=message.shm_name,
        shm_bytes=message.shm_bytes,
        token_ids=message.token_ids,
    )


def consumer_to_message(process: ProcessRef):
    """A ProcessRef as the ConsumerProcess message MapKVRequest carries."""
    from proxyprefill.protos import prefill_pb2 as pb

    return pb.ConsumerProcess(
        pid=process.pid, start_ticks=process.start_ticks, pid_namespace=process.pid_namespace
    )


def consumer_from_message(message) -> ProcessRef:
    """A ConsumerProcess message as a ProcessRef; KVShareError naming the field when it is not
    filled in."""
    if message.pid == 0 or message.start_ticks == 0:
        raise KVShareError("consumer: pid and start_ticks must be set")
    return ProcessRef(message.pid, message.start_ticks, message.pid_namespace)
