"""A direct channel from the server to a replica worker, for the one call on every request's path:
`prefill`. Everything else (cancel, abandon, fetch, share, release, probes) stays on Ray.

Why: a Ray streaming call costs about 9 ms on an idle CPU machine before any work is done (the
token ids and the result go through the object store, each progress item is an object of its
own), most of a request's fixed cost. Over this channel the same call is one message out and a
few back on a kept TCP connection; on an H200 host the hop to the worker and back fell from 8.5 to
about 4 ms at 32k tokens (BENCHMARKS.md, "The prefill over a direct channel").

Wire. The worker listens on its node's address (`PrefillChannel`, started on first use), and
tells the server where and with which key through Ray (`PrefillWorker.channel_endpoint`, a
`ChannelEndpoint`). A connection is opened with

    worker -> server   32-byte nonce
    server -> worker   HMAC-SHA256(key, nonce)           the worker hangs up on a wrong answer

and then serves one call after another:

    server -> worker   frame: PrefillCall
    worker -> server   frame: Progress ... then one PrefillDone | PrefillStopped | PrefillFailed

A frame is an 8-byte little-endian length and a pickle. Pickles are only read from a peer that
proved it holds the key (the server got it from the worker through Ray), so the channel trusts
what Ray trusts; like Ray's own traffic it is not encrypted. The server keeps a connection whose
call ended with its final message for the next call (`ChannelClient`), so that an idle worker
answers without a new connection, thread and handshake.

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
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.accepted = 0  # connections accepted so far
        threading.Thread(target=self._accept, name="prefill-channel", daemon=True).start()

    def close(self) -> None:
        """Stops listening and hangs up every connection, as the worker's exit would."""
        self._closed.set()
        with self._lock:
            sockets = [self._listener, *self._connections]
        for each in sockets:
            with contextlib.suppress(OSError):  # shutdown wakes a thread blocked on it; close would not
                each.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                each.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                self._connections.add(connection)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(connection,), name="prefill-call", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        try:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._authenticate(connection)
        except (OSError, ValueError, EOFError) as error:
            log.warning("prefill channel: refused a connection: %s", error)
        else:
            while self._serve_call(connection):
                pass
        finally:
            with self._lock:
                self._connections.discard(connection)
            connection.close()

    def _serve_call(self, connection: socket.socket) -> bool:
        """Receives one call and relays its messages; False when the connection is done."""
        try:
            call = _receive_frame(connection, MAX_CALL_BYTES)
        except (OSError, EOFError):  # the server closed an idle connection
            return False
        except Exception as error:  # a frame that does not unpickle: this peer is not our server
            log.warning("prefill channel: an unreadable call: %s: %s", type(error).__name__, error)
            return False
        if not isinstance(call, PrefillCall):
            log.warning("prefill channel: expected a PrefillCall, got %s", type(call).__name__)
            return False
        messages = self._serve_prefill(call.key, call.token_ids, call.options)
        try:
            for message in messages:
                connection.sendall(_frame(message))
            return True
        except OSError:  # the server hung up: closing the generator stops the prefill
            return False
        except Exception as error:  # a bug in the worker: the server answers INTERNAL
            log.exception("prefill %s failed on the channel", call.key)
            with contextlib.suppress(OSError):
                connection.sendall(_frame(PrefillFailed("internal", f"{type(error).__name__}: {error}")))
            return False
        finally:
            messages.close()

    def _authenticate(self, connection: socket.socket) -> None:
        nonce = secrets.token_bytes(NONCE_BYTES)
        connection.settimeout(10.0)  # a peer that opens a connection and says nothing is dropped
        connection.sendall(nonce)
        if not hmac.compare_digest(_receive_exactly(connection, 32), _answer(self.endpoint.key, nonce)):
            raise ValueError("wrong key")
        connection.settimeout(None)


def _receive_frame(connection: socket.socket, max_bytes: int):
    (length,) = _LENGTH.unpack(_receive_exactly(connection, _LENGTH.size))
    if length > max_bytes:
        raise EOFError(f"a frame of {length} bytes")
    return pickle.loads(_receive_exactly(connection, length))


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
class ChannelClient:
    """The server's calls to one worker incarnation's channel. Connections whose call ended with
    its final message wait for the next call; each belongs to the event loop that opened it."""

    def __init__(self, endpoint: ChannelEndpoint):
        self.endpoint = endpoint
        self._idle: list[tuple[asyncio.AbstractEventLoop, asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._lock = threading.Lock()  # servers on other loops may share a pool

    async def prefill(self, key: str, token_ids: np.ndarray, options: PrefillOptions):
        """Async generator of the worker's messages for one prefill (see the module docstring).
        Raises ChannelUnreachable when nothing answers at the endpoint, WorkerChannelLost when the
        connection closes before the final message."""
        reader, writer = await self._connection()
        finished = False
        try:
            try:
                writer.write(_frame(PrefillCall(key, token_ids, options)))
                await writer.drain()
            except OSError as error:
                raise WorkerChannelLost(f"the worker's channel closed while sending: {error}") from None
            while True:
                try:
                    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                    message = pickle.loads(await reader.readexactly(length))
                except (OSError, asyncio.IncompleteReadError) as error:
                    raise WorkerChannelLost(f"the worker's channel closed mid-prefill: {error}") from None
                if not isinstance(message, Progress):
                    finished = True
                yield message
                if finished:
                    return
        finally:
            if finished:
                with self._lock:
                    self._idle.append((asyncio.get_running_loop(), reader, writer))
            else:
                writer.close()  # also what tells the worker its server went away

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An idle connection of this loop that is still open, else a new authenticated one."""
        loop = asyncio.get_running_loop()
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):
                owner, reader, writer = self._idle[i]
                if owner is loop:
                    del self._idle[i]
                    if not (reader.at_eof() or writer.is_closing()):
                        return reader, writer
                    writer.close()  # the worker hung up while it waited (it restarted)
        endpoint = self.endpoint
        try:
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        except OSError as error:
            where = f"{endpoint.host}:{endpoint.port}"
            raise ChannelUnreachable(f"no prefill channel at {where}: {error}") from None
        try:
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.write(_answer(endpoint.key, await reader.readexactly(NONCE_BYTES)))
        except (OSError, asyncio.IncompleteReadError) as error:
            writer.close()
            raise WorkerChannelLost(f"the worker's channel closed while connecting: {error}") from None
        return reader, writer

    def close(self) -> None:
        """Closes the idle connections (the worker's threads serving them end)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for loop, _, writer in idle:
            with contextlib.suppress(RuntimeError):  # that loop is closed: its sockets went with it
                loop.call_soon_threadsafe(writer.close)
