"""How a call's request reaches a servicer method: identified first, then read and parsed here.

grpc's own registration of a unary-request method parses the request before any of our code runs:
a malformed message then ends as UNKNOWN with grpc's traceback in the log, bytes from a caller
without a valid token are parsed before that caller is refused, and a call that ends its request
stream without a message is never answered. So every method is registered as taking a *stream*
of raw bytes, and `one_request` does, in order:

1. identify the caller (UNAUTHENTICATED before a single byte is parsed);
2. read exactly one message and the end of the stream: none, or more than one, is
   INVALID_ARGUMENT, and so is a stream left open past `READ_SECONDS`;
3. parse it: malformed bytes (corrupt wire format, a wrong wire type, invalid UTF-8 in a string)
   are INVALID_ARGUMENT naming the message type, logged as one short line;

and only then calls the servicer method with the parsed message. Clients see no difference: a
unary call is one message followed by the end of the stream on the wire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError, Message

from .auth import AuthError
from .validation import RequestError, invalid

log = logging.getLogger("proxyprefill.service")

# a client sends its one message and ends the stream at once; this bounds one that does not
READ_SECONDS = 30.0

# identify(context) raises AuthError; refuse(context, method, code, message) aborts the call
Identify = Callable[[grpc.aio.ServicerContext], object]
Refuse = Callable[[grpc.aio.ServicerContext, str, grpc.StatusCode, str], Awaitable[None]]


@dataclass(frozen=True)
class Method:
    """One RPC: its name, its request type, the servicer method that takes the parsed request, how
    its responses are serialised, and whether it answers with a stream."""

    name: str
    request_type: type[Message]
    behaviour: Callable
    serialize: Callable[[object], bytes]
    streams_responses: bool = False


async def read_one_message(context: grpc.aio.ServicerContext, request_type: type[Message]) -> Message:
    """The call's only request message, parsed; RequestError (INVALID_ARGUMENT) otherwise."""
    name = request_type.DESCRIPTOR.name
    try:
        async with asyncio.timeout(READ_SECONDS):
            raw = await context.read()
            if raw is grpc.aio.EOF:
                raise invalid(f"request: the call carried no {name} message")
            after = await context.read()
    except TimeoutError:
        raise invalid(
            f"request: the stream must end after its one {name} within {READ_SECONDS:.0f} s"
        ) from None
    if after is not grpc.aio.EOF:
        raise invalid(f"request: the call carried more than one {name} message")
    try:
        return request_type.FromString(raw)
    except DecodeError:
        raise invalid(
            f"request: {len(raw)} bytes are not a valid {name} (corrupt wire format, a field of "
            "the wrong wire type, or a string that is not UTF-8)"
        ) from None


async def finish_despite_cancellation(cleanup: Awaitable):
    """Awaits `cleanup` to its end even when the calling task is cancelled again meanwhile, and
    returns its result. grpc can cancel a call's task more than once; cleanup that frees KV or
    stops a worker's prefill must not be cut short by the second cancellation, which would leave
    what it frees owned by nobody. Used on paths already ending by cancellation or error."""
    task = asyncio.ensure_future(cleanup)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise  # the cleanup itself was cancelled
            # cancelled again while the cleanup runs: keep waiting for it


def generic_handler(
    service_name: str, methods: list[Method], identify: Identify, refuse: Refuse
) -> grpc.GenericRpcHandler:
    """The service's handlers: each identifies the caller and reads its one request before
    calling the method."""

    async def one_request(method: Method, context) -> Message | None:
        try:
            identify(context)
            return await read_one_message(context, method.request_type)
        except (AuthError, RequestError) as error:
            log.info("%s refused: %s: %s", method.name, error.code.name, error.message[:160])
            await refuse(context, method.name, error.code, error.message)
            return None  # refuse aborts the call; not reached

    def unary(method: Method):
        async def handle(_requests, context):
            request = await one_request(method, context)
            return await method.behaviour(request, context)

        return grpc.stream_unary_rpc_method_handler(handle, response_serializer=method.serialize)

    def streaming(method: Method):
        # A coroutine that writes, not an async generator that grpc drains: grpc never closes a
        # generator it stops draining, so a call cancelled while a response was being sent left
        # the method suspended at its `yield`, its cleanup put off to garbage collection (never,
        # once a stopping server's loop ends). Here the cancellation lands in this task, which
        # closes the method and waits for its cleanup before the call counts as ended.
        async def handle(_requests, context):
            request = await one_request(method, context)
            responses = method.behaviour(request, context)
            try:
                async for response in responses:
                    await context.write(response)
            finally:
                await finish_despite_cancellation(responses.aclose())

        return grpc.stream_stream_rpc_method_handler(handle, response_serializer=method.serialize)

    handlers = {m.name: (streaming(m) if m.streams_responses else unary(m)) for m in methods}
    return grpc.method_handlers_generic_handler(service_name, handlers)
