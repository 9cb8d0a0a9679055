"""Hostile input: malformed, empty and repeated request messages, and generated messages, against
the request decoding and validation and against a live loopback server whose pool computes
nothing. Every one must be answered promptly with a refusal (hostile_support.REFUSALS), with no
traceback and nothing at WARNING or above in the log.

This is the CI subset; the full campaign (10,000+ messages, a live server on a real model, and a
coverage-guided fuzzer when atheris is installed) is `python tests/reliability/hostile_campaign.py`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import grpc
import pytest

pytest.importorskip("grpc_health")

sys.path.insert(0, str(Path(__file__).parent))

from hostile_support import METHODS, LogWatch, NullPool, call_raw  # noqa: E402

from proxyprefill.protos import prefill_pb2 as pb  # noqa: E402
from proxyprefill.service import config as config_mod  # noqa: E402
from proxyprefill.service.local import LocalService  # noqa: E402

REQUEST_TYPES = {
    "Prefill": pb.PrefillRequest,
    "FetchKV": pb.FetchKVRequest,
    "RenewLease": pb.RenewLeaseRequest,
    "ReleaseKV": pb.ReleaseKVRequest,
    "GetModelInfo": pb.GetModelInfoRequest,
    "MapKV": pb.MapKVRequest,
    "PushKV": pb.PushKVRequest,
}
CORRUPT = b"\xff\xff\xff"  # a field tag whose varint never ends
NOT_UTF8 = b"\x0a\x02\xc3\x28"  # field 1 (a string in every request that has one) = invalid UTF-8


def null_server_config(**overrides):
    return config_mod.load(environ={}, listen="127.0.0.1:0", **overrides)


@pytest.fixture(scope="module")
def null_service():
    service = LocalService(null_server_config(), pool=NullPool()).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def channel(null_service):
    with grpc.insecure_channel(null_service.target) as channel:
        yield channel


@pytest.mark.parametrize("method", METHODS)
def test_malformed_bytes_are_invalid_argument_without_a_traceback(channel, method):
    """Defect 7: was UNKNOWN "Unexpected <class DecodeError>" and an ERROR traceback per message."""
    cases = [CORRUPT] + ([NOT_UTF8] if method != "GetModelInfo" else [])
    with LogWatch() as watch:
        for raw in cases:
            outcome = call_raw(channel, method, [raw])
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (raw, outcome)
            assert REQUEST_TYPES[method].DESCRIPTOR.name in outcome.details
            assert "DecodeError" not in outcome.details and "class" not in outcome.details
    assert watch.lines() == []


@pytest.mark.parametrize("method", METHODS)
def test_a_call_without_a_request_message_is_answered_at_once(channel, method):
    """Defect 12: a unary method given zero request messages never answered (the deadline ran out)."""
    started = time.monotonic()
    outcome = call_raw(channel, method, [], timeout=10)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "no " + REQUEST_TYPES[method].DESCRIPTOR.name in outcome.details
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("method", METHODS)
def test_more_than_one_request_message_is_refused(channel, null_service, method):
    valid = REQUEST_TYPES[method]().SerializeToString()
    outcome = call_raw(channel, method, [valid, valid, valid])
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
    assert "more than one" in outcome.details
    assert null_service.pool.calls == []


def test_request_ids_and_handles_with_a_trailing_newline_are_refused(null_service):
    """Defect 10: the patterns ended in `$` and were used with .match, which accepts "id\\n"."""
    from proxyprefill.service.leases import LeaseError, new_handle
    from proxyprefill.service.validation import RequestError, validate_prefill

    server = null_service.server
    request = pb.PrefillRequest(request_id="request-1\n", tokens=pb.TokenIds(ids=[1, 2, 3]))
    with pytest.raises(RequestError) as caught:
        validate_prefill(request, server.limits, None)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in caught.value.message
    with pytest.raises(LeaseError) as caught:
        server.leases.get(new_handle() + "\n", "anyone")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "handle" in caught.value.message


def test_generated_messages_decoding_and_live_server(null_service):
    """The campaign at CI size: generated messages through the decoding and validation, and
    generated calls plus the fixed oversized and empty-stream cases against the live server."""
    import hostile_campaign as campaign

    with LogWatch() as watch:
        decoding = campaign.run_decoding(300, null_service.server.limits, seed_value=16)
        live = campaign.run_live(null_service, 150, seed_value=16)
        fixed = campaign.oversized_and_empty(null_service)
    assert decoding.messages == 300 and live.calls == 150
    for tally in (decoding, live, fixed):
        assert tally.failures == []
    assert live.outcomes["INVALID_ARGUMENT"] > 60  # the generator does reach the refusals
    assert watch.lines() == []
    assert campaign.server_is_clean(null_service) == []
