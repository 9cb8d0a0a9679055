"""PrefillClient's parallel FetchKV streams each get a TCP connection of their own (grpc would
otherwise multiplex them over one), reused from one fetch to the next."""

from concurrent import futures

import grpc
import pytest

from proxyprefill.protos import prefill_pb2 as pb
from proxyprefill.service.client import _FETCH_KV, PrefillClient


@pytest.fixture
def peers():
    """A bare server whose FetchKV records the caller's address (host and port) and answers nothing."""
    seen: list[str] = []

    def fetch(request, context):
        seen.append(context.peer())
        yield b""

    service, method = _FETCH_KV.strip("/").split("/")
    handler = grpc.unary_stream_rpc_method_handler(fetch, request_deserializer=None, response_serializer=None)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", seen
    server.stop(0)


def _call_each(calls):
    for call in calls:
        list(call(pb.FetchKVRequest(handle="h")))


def test_parallel_fetch_streams_use_a_connection_each_and_keep_them(peers):
    target, seen = peers
    with PrefillClient(target) as client:
        _call_each(client._fetch_calls(4))
        first = list(seen)
        _call_each(client._fetch_calls(4))
    assert len(set(first)) == 4
    assert seen[4:] == first  # the same four connections the second time


def test_a_channel_given_to_the_client_is_shared_by_every_stream(peers):
    target, seen = peers
    channel = grpc.insecure_channel(target)
    with PrefillClient(target, channel=channel) as client:
        _call_each(client._fetch_calls(3))
    assert len(seen) == 3 and len(set(seen)) == 1
