"""Security with tokens (and TLS) on: every RPC refuses unauthenticated callers, malformed bytes
from an unauthenticated caller are refused before they are parsed, /metrics binds where told and
can require the token. Servers run over a pool that computes nothing (hostile_support.NullPool);
the audit log of handles, which needs real KV, is checked in test_security_live.py."""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

pytest.importorskip("grpc_health")

sys.path.insert(0, str(Path(__file__).parent))

from hostile_support import METHODS, LogWatch, NullPool, call_raw  # noqa: E402

from proxyprefill.protos import prefill_pb2 as pb  # noqa: E402
from proxyprefill.service import config as config_mod  # noqa: E402
from proxyprefill.service.local import LocalService  # noqa: E402

ALICE = "alice-token-0123456789"
VALID_REQUESTS = {
    "Prefill": pb.PrefillRequest(tokens=pb.TokenIds(ids=[1, 2, 3])),
    "FetchKV": pb.FetchKVRequest(handle="0" * 32),
    "RenewLease": pb.RenewLeaseRequest(handle="0" * 32),
    "ReleaseKV": pb.ReleaseKVRequest(handle="0" * 32),
    "GetModelInfo": pb.GetModelInfoRequest(),
    "MapKV": pb.MapKVRequest(handle="0" * 32),
    "PushKV": pb.PushKVRequest(handle="0" * 32, rendezvous="127.0.0.1:29500", backend="gloo"),
}
BAD_CREDENTIALS = {
    "none": (),
    "unknown token": (("authorization", "Bearer wrong-token-0123456789"),),
    "not bearer": (("authorization", f"Basic {ALICE}"),),
    "empty bearer": (("authorization", "Bearer "),),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The local IPv4 addresses (dotted) of the sockets listening on `port`, from /proc/net/tcp."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        pytest.skip("needs Linux /proc/net/tcp")
    found = set()
    for line in table.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def token_config(**overrides):
    return config_mod.load(environ={}, listen="127.0.0.1:0", auth_tokens=f"alice={ALICE}", **overrides)


@pytest.fixture(scope="module")
def token_service():
    pool = NullPool()
    service = LocalService(token_config(), pool=pool).start()
    yield service
    service.stop()


@pytest.mark.parametrize("method", METHODS)
def test_every_rpc_refuses_unauthenticated_callers(token_service, method):
    with grpc.insecure_channel(token_service.target) as channel:
        for name, metadata in BAD_CREDENTIALS.items():
            raw = VALID_REQUESTS[method].SerializeToString()
            outcome = call_raw(channel, method, [raw], metadata=metadata)
            assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, (name, outcome)
        alice = (("authorization", f"Bearer {ALICE}"),)
        outcome = call_raw(channel, method, [VALID_REQUESTS[method].SerializeToString()], metadata=alice)
        assert outcome.code != grpc.StatusCode.UNAUTHENTICATED, outcome
    assert token_service.pool.calls.count("prefill") <= 1  # alice's one valid prefill at most


@pytest.mark.parametrize("method", METHODS)
def test_malformed_bytes_from_an_unauthenticated_caller_are_refused_unparsed(token_service, method):
    """UNAUTHENTICATED, not INVALID_ARGUMENT: the bytes are not even parsed (defect 7)."""
    with grpc.insecure_channel(token_service.target) as channel, LogWatch() as watch:
        for raw in (b"\xff\xff\xff", b"\x0a\x02\xc3\x28", b"\x00" * 1000):
            assert call_raw(channel, method, [raw]).code == grpc.StatusCode.UNAUTHENTICATED
        assert call_raw(channel, method, []).code == grpc.StatusCode.UNAUTHENTICATED
    assert watch.lines() == []


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_metrics_bind_loopback_by_default_whatever_listen_says():
    """Defect 9: /metrics listened on 0.0.0.0 whatever --listen said."""
    port = free_port()
    config = config_mod.load(environ={}, listen="0.0.0.0:0", metrics_port=port)
    with LocalService(config, pool=NullPool()):
        assert listening_addresses(port) == {"127.0.0.1"}
        status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and "proxyprefill_kv_handles" in text


def test_metrics_bind_where_told():
    port = free_port()
    config = config_mod.load(environ={}, listen="127.0.0.1:0", metrics_port=port, metrics_host="127.0.0.2")
    with LocalService(config, pool=NullPool()):
        assert listening_addresses(port) == {"127.0.0.2"}
        assert get(f"http://127.0.0.2:{port}/metrics")[0] == 200


def test_metrics_can_require_the_bearer_token():
    port = free_port()
    with LocalService(token_config(metrics_port=port, metrics_require_token=True), pool=NullPool()):
        url = f"http://127.0.0.1:{port}/metrics"
        for token in (None, "wrong-token-0123456789"):
            status, text = get(url, token)
            assert status == 401 and "proxyprefill_" not in text
        status, text = get(url, ALICE)
        assert status == 200 and "proxyprefill_kv_handles" in text
        assert get(f"http://127.0.0.1:{port}/other", ALICE)[0] == 404


def test_metrics_token_needs_tokens_configured():
    with pytest.raises(config_mod.ConfigError, match="metrics_require_token"):
        config_mod.load(environ={}, metrics_port=9400, metrics_require_token=True)
    environ = {"PROXYPREFILL_METRICS_REQUIRE_TOKEN": "yes", "PROXYPREFILL_AUTH_TOKENS": f"alice={ALICE}"}
    assert config_mod.load(environ=environ).metrics_require_token is True
    with pytest.raises(config_mod.ConfigError, match="metrics_require_token"):
        config_mod.load(environ={"PROXYPREFILL_METRICS_REQUIRE_TOKEN": "maybe"})
