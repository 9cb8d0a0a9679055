"""A streaming call's cleanup runs in the call itself (service/wire.py).

grpc drains a handler written as an async generator but never closes it: a call cancelled while
one of its responses was being sent leaves the generator suspended at `yield`, and its `finally`
(which frees KV in the real server) is put off to garbage collection, after the call has ended
and after a stopping server stopped waiting for it. grpc may also cancel the call's task again
while that cleanup awaits (freeing KV awaits the worker): the cleanup must still finish."""

import asyncio
import threading

import grpc
import pytest

from proxyprefill.service import wire

pytest.importorskip("grpc_health")

SERVICE = "test.Stream"
PIECE = b"x" * (1 << 20)  # large enough that the unread client stops the server's writes


class Recorder:
    def __init__(self):
        self.handler_task = None
        self.cleaned_up = threading.Event()
        self.task_done_at_cleanup = None

    async def behaviour(self, request, context):
        self.handler_task = asyncio.current_task()
        try:
            while True:
                yield PIECE
        finally:
            await asyncio.sleep(0.05)  # cleanup that awaits, like abandoning a worker's prefill
            self.task_done_at_cleanup = self.handler_task.done()
            self.cleaned_up.set()


async def _refuse(context, method, code, message):
    await context.abort(code, message)


def test_a_cancelled_stream_cleans_up_inside_its_call():
    from google.protobuf import empty_pb2

    recorder = Recorder()
    method = wire.Method("Pieces", empty_pb2.Empty, recorder.behaviour, lambda b: b, streams_responses=True)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([wire.generic_handler(SERVICE, [method], lambda c: None, _refuse)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(f"/{SERVICE}/Pieces")(iter([b""]))
            assert next(call) == PIECE
            call.cancel()  # the server is blocked writing the pieces nobody reads
            assert recorder.cleaned_up.wait(10), "the stream's cleanup never ran"
        assert recorder.task_done_at_cleanup is False, "cleanup ran after the call had ended"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_cleanup_outlives_repeated_cancellation():
    finished = []

    async def cleanup():
        await asyncio.sleep(0.2)
        finished.append(True)
        return "done"

    async def call():
        try:
            await asyncio.sleep(10)
        finally:
            await wire.finish_despite_cancellation(cleanup())

    async def main():
        task = asyncio.ensure_future(call())
        await asyncio.sleep(0.01)
        for _ in range(3):  # cancelled, then cancelled again while the cleanup runs
            task.cancel()
            await asyncio.sleep(0.03)
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert finished == [True]
