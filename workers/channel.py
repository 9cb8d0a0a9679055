"""A direct channel from the server to a replica worker, for the one call on every request's path:
`prefill`. Everything else (cancel, abandon, fetch, share, release, probes) stays on Ray.

Why: a Ray streaming call costs about 9 ms on an idle machine before any work is done (the
token ids and the result go through the object store, each progress item is an object of its
own; bench/fixed_cost.py measured it), most of a request's fixed cost. Over this channel the
same call is one TCP connection, one message out and a few back.

Wire. The worker listens on its node's address (`PrefillChannel`, started on first use), and
tells the server where and with which key through Ray (`PrefillWorker.channel_endpoint`, a
`ChannelEndpoint`). A connection serves one call:

    worker -> server   32-byte nonce
    server -> worker   HMAC-SHA256(key, nonce)           the worker hangs up on a wrong answer
    server -> worker   frame: PrefillCall
    worker -> server   frame: Progress ... then one PrefillDone | PrefillStopped | PrefillFailed

A frame is an 8-byte little-endian length and a pickle. Pickles are only read from a peer that
proved it holds the key (the server got it from the worker through Ray), so the channel trusts
what Ray trusts; like Ray's own traffic it is not encrypted.

Ending early. A server that stops reading (its client went away) closes the connection and
calls `abandon` on Ray, as before; the worker's next send fails and closes the prefill's
generator, which stops the work. A worker that dies mid-call closes the connection: the server
raises `WorkerChannelLost`, which it answers as a lost worker (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import pickle
import secrets
import socket
import struct
import threading
from dataclasses import dataclass

import numpy as np

from .protocol import PrefillFailed, PrefillOptions, Progress

log = logging.getLogger("proxyprefill.workers")

NONCE_BYTES = 32
_LENGTH = struct.Struct("<Q")
MAX_CALL_BYTES = 1 << 30  # a PrefillCall larger than this is refused (1 GiB: 128M token ids)


class WorkerChannelLost(Exception):
    """The worker's channel closed before the call's final message: the worker died or
    restarted."""


class ChannelUnreachable(WorkerChannelLost):
    """Nothing answered at the endpoint (a restarted worker listens elsewhere): nothing was sent,
    so the call may be tried again at a new endpoint."""


@dataclass(frozen=True)
class ChannelEndpoint:
    """Where a worker's channel listens and the key that opens it, for one incarnation of it."""

    host: str
    port: int
    key: bytes
    incarnation: str

    def __repr__(self) -> str:  # the key stays out of logs
        return f"ChannelEndpoint({self.host}:{self.port}, incarnation={self.incarnation[:8]})"


@dataclass(frozen=True)
class PrefillCall:
    """The one message a server sends on a connection: PrefillWorker.prefill's arguments."""

    key: str
    token_ids: np.ndarray
    options: PrefillOptions


def _frame(message) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


def _answer(key: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, nonce, hashlib.sha256).digest()


def _node_address() -> str:
    """The address other nodes reach this one at: Ray's node IP inside Ray, else loopback."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # not inside Ray
        pass
    return "127.0.0.1"


# worker side -------------------------------------------------------------------------------------
class PrefillChannel:
    """The worker's listener: accepts connections on a thread and serves each on its own thread,
    relaying `serve_prefill(key, token_ids, options)` (a generator of protocol messages)."""

    def __init__(self, serve_prefill, incarnation: str, host: str | None = None):
        self._serve_prefill = serve_prefill
        host = host or _node_address()
        self._listener = socket.create_server((host, 0))
        port = self._listener.getsockname()[1]
        self.endpoint = ChannelEndpoint(host, port, secrets.token_bytes(32), incarnation)
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="prefill-channel", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):  # shutdown wakes the accepting thread; close alone would not
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(connection,), name="prefill-call", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                call = self._receive_call(connection)
            except (OSError, ValueError, EOFError) as error:
                log.warning("prefill channel: refused a connection: %s", error)
                return
            messages = self._serve_prefill(call.key, call.token_ids, call.options)
            try:
                for message in messages:
                    connection.sendall(_frame(message))
            except OSError:  # the server hung up: closing the generator stops the prefill
                pass
            except Exception as error:  # a bug in the worker: the server answers INTERNAL
                log.exception("prefill %s failed on the channel", call.key)
                with contextlib.suppress(OSError):
                    connection.sendall(_frame(PrefillFailed("internal", f"{type(error).__name__}: {error}")))
            finally:
                messages.close()

    def _receive_call(self, connection: socket.socket) -> PrefillCall:
        nonce = secrets.token_bytes(NONCE_BYTES)
        connection.settimeout(10.0)  # a peer that opens a connection and says nothing is dropped
        connection.sendall(nonce)
        if not hmac.compare_digest(_receive_exactly(connection, 32), _answer(self.endpoint.key, nonce)):
            raise ValueError("wrong key")
        (length,) = _LENGTH.unpack(_receive_exactly(connection, _LENGTH.size))
        if length > MAX_CALL_BYTES:
            raise ValueError(f"a call of {length} bytes")
        connection.settimeout(None)
        call = pickle.loads(_receive_exactly(connection, length))
        if not isinstance(call, PrefillCall):
            raise ValueError(f"expected a PrefillCall, got {type(call).__name__}")
        return call


def _receive_exactly(connection: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        received = connection.recv_into(view)
        if not received:
            raise EOFError("the peer closed the connection")
        view = view[received:]
    return buffer


# server side -------------------------------------------------------------------------------------
async def call_prefill(endpoint: ChannelEndpoint, key: str, token_ids: np.ndarray, options: PrefillOptions):
    """Async generator of the worker's messages for one prefill (see the module docstring).
    Raises ChannelUnreachable when nothing answers at the endpoint, WorkerChannelLost when the
    connection closes before the final message."""
    try:
        reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    except OSError as error:
        raise ChannelUnreachable(f"no prefill channel at {endpoint.host}:{endpoint.port}: {error}") from None
    try:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            nonce = await reader.readexactly(NONCE_BYTES)
            writer.write(_answer(endpoint.key, nonce) + _frame(PrefillCall(key, token_ids, options)))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError) as error:
            raise WorkerChannelLost(f"the worker's channel closed while sending: {error}") from None
        while True:
            try:
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                message = pickle.loads(await reader.readexactly(length))
            except (OSError, asyncio.IncompleteReadError) as error:
                raise WorkerChannelLost(f"the worker's channel closed mid-prefill: {error}") from None
            yield message
            if not isinstance(message, Progress):
                return
    finally:
        writer.close()  # also what tells the worker its server went away
