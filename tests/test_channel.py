"""The worker's direct prefill channel (workers/channel.py) against a stand-in worker generator:
messages arrive in order and typed, the key is checked, a connection serves call after call,
a server that hangs up stops the work, a worker that fails or vanishes is reported as such."""

import asyncio
import socket
import threading

import numpy as np
import pytest

from proxyprefill.workers.channel import (
    ChannelClient,
    ChannelEndpoint,
    ChannelUnreachable,
    PrefillChannel,
    WorkerChannelLost,
)
from proxyprefill.workers.protocol import PrefillFailed, PrefillOptions, PrefillStopped, Progress

OPTIONS = PrefillOptions(chunk_size=64, logits="last")


class StandIn:
    """A worker's prefill generator: one Progress per chunk of `chunk_size` tokens, then
    PrefillStopped (enough to check relaying); records what it was called with and how it ended."""

    def __init__(self, pause: float = 0.0, fail_after: int | None = None):
        self.pause = pause
        self.fail_after = fail_after
        self.calls = []
        self.closed = threading.Event()
        self.finished = threading.Event()

    def __call__(self, key, token_ids, options):
        self.calls.append((key, np.asarray(token_ids), options))
        try:
            total = len(token_ids)
            for done in range(options.chunk_size, total + options.chunk_size, options.chunk_size):
                if self.fail_after is not None and done > self.fail_after:
                    raise RuntimeError("engine blew up")
                threading.Event().wait(self.pause)
                yield Progress(min(done, total), total)
            yield PrefillStopped()
            self.finished.set()
        except GeneratorExit:
            self.closed.set()
            raise


async def _call(client, token_ids, limit=None, key="key-1"):
    messages = []
    async for message in client.prefill(key, token_ids, OPTIONS):
        messages.append(message)
        if limit is not None and len(messages) == limit:
            break  # the server stops reading: the connection closes
    return messages


def _collect(endpoint, token_ids, limit=None):
    return asyncio.run(_call(ChannelClient(endpoint), token_ids, limit))


@pytest.fixture
def worker():
    stand_in = StandIn()
    channel = PrefillChannel(stand_in, incarnation="one", host="127.0.0.1")
    yield stand_in, channel
    channel.close()


def test_a_call_relays_every_message_in_order(worker):
    stand_in, channel = worker
    ids = np.arange(200, dtype=np.int64)
    messages = _collect(channel.endpoint, ids)
    progress = [Progress(done, 200) for done in (64, 128, 192, 200)]
    assert messages == [*progress, PrefillStopped()]
    key, received, options = stand_in.calls[0]
    assert key == "key-1" and options == OPTIONS
    np.testing.assert_array_equal(received, ids)
    assert stand_in.finished.is_set()


def test_calls_in_turn_reuse_one_connection_and_concurrent_ones_get_their_own(worker):
    _, channel = worker
    client = ChannelClient(channel.endpoint)

    async def run():
        first = await _call(client, np.arange(100))
        second = await _call(client, np.arange(130))
        short, long = await asyncio.gather(_call(client, np.arange(64)), _call(client, np.arange(300)))
        return first, second, short, long

    first, second, short, long = asyncio.run(run())
    assert first[-2:] == [Progress(100, 100), PrefillStopped()]
    assert second[-2:] == [Progress(130, 130), PrefillStopped()]
    assert short[-2:] == [Progress(64, 64), PrefillStopped()]
    assert long[-2:] == [Progress(300, 300), PrefillStopped()]
    assert channel.accepted == 2  # the calls in turn share one; the concurrent pair needs a second


def test_a_call_cut_short_does_not_leave_its_connection_for_the_next(worker):
    stand_in, channel = worker
    client = ChannelClient(channel.endpoint)

    async def run():
        cut = await _call(client, np.arange(64 * 50), limit=1)
        return cut, await _call(client, np.arange(10))

    cut, whole = asyncio.run(run())
    assert cut == [Progress(64, 64 * 50)]
    assert whole == [Progress(10, 10), PrefillStopped()]  # not the rest of the first call
    assert channel.accepted == 2


def test_a_worker_gone_while_its_connection_was_idle_is_not_reached_through_it():
    channel = PrefillChannel(StandIn(), incarnation="one", host="127.0.0.1")
    client = ChannelClient(channel.endpoint)

    async def run():
        await _call(client, np.arange(10))
        channel.close()  # the worker exits: its idle connection is hung up too
        await asyncio.sleep(0.2)
        await _call(client, np.arange(10))

    with pytest.raises(ChannelUnreachable):  # so the pool may ask where it listens now
        asyncio.run(run())


def test_a_wrong_key_is_refused_before_anything_runs(worker):
    stand_in, channel = worker
    forged = ChannelEndpoint("127.0.0.1", channel.endpoint.port, b"x" * 32, "one")
    with pytest.raises(WorkerChannelLost):
        _collect(forged, np.arange(10))
    assert stand_in.calls == []


def test_a_server_that_hangs_up_stops_the_work():
    stand_in = StandIn(pause=0.02)
    channel = PrefillChannel(stand_in, incarnation="one", host="127.0.0.1")
    try:
        messages = _collect(channel.endpoint, np.arange(64 * 200), limit=2)
        assert messages == [Progress(64, 64 * 200), Progress(128, 64 * 200)]
        assert stand_in.closed.wait(10), "the worker's generator was not closed"
        assert not stand_in.finished.is_set()
    finally:
        channel.close()


def test_a_worker_that_raises_answers_an_internal_failure():
    channel = PrefillChannel(StandIn(fail_after=64), incarnation="one", host="127.0.0.1")
    try:
        messages = _collect(channel.endpoint, np.arange(200))
    finally:
        channel.close()
    assert messages[0] == Progress(64, 200)
    assert isinstance(messages[-1], PrefillFailed) and messages[-1].error == "internal"
    assert "engine blew up" in messages[-1].message


def test_a_worker_that_vanishes_mid_call_is_reported_lost():
    listener = socket.create_server(("127.0.0.1", 0))
    endpoint = ChannelEndpoint("127.0.0.1", listener.getsockname()[1], b"k" * 32, "gone")

    def accept_then_die():  # answers the handshake's first step, then the process "dies"
        connection, _ = listener.accept()
        connection.sendall(b"n" * 32)
        connection.recv(1 << 16)
        connection.close()

    threading.Thread(target=accept_then_die, daemon=True).start()
    try:
        with pytest.raises(WorkerChannelLost) as raised:
            _collect(endpoint, np.arange(10))
        assert not isinstance(raised.value, ChannelUnreachable)  # something may have run
    finally:
        listener.close()


def test_nothing_listening_is_unreachable(worker):
    _, channel = worker
    endpoint = channel.endpoint
    channel.close()
    with pytest.raises(ChannelUnreachable):
        _collect(endpoint, np.arange(10))


def test_the_key_stays_out_of_the_endpoints_repr(worker):
    _, channel = worker
    assert channel.endpoint.key.hex() not in repr(channel.endpoint)
    assert str(channel.endpoint.port) in repr(channel.endpoint)
