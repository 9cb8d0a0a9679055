"""Security on a live server with TLS and bearer tokens over a real (tiny) model: every RPC refuses
an unauthenticated caller, a handle serves only the principal that made it, and the audit log
names the principal that created, fetched, renewed and released each handle."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import grpc
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("grpc_health")
pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).parent))

from hostile_support import make_certificate, start_tiny_model_pool, tiny_model_config  # noqa: E402

from proxyprefill.service.client import PrefillClient  # noqa: E402
from proxyprefill.service.local import LocalService  # noqa: E402

ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abcd"


class AuditLines(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    directory = tmp_path_factory.mktemp("secured")
    certificate = make_certificate(directory)
    if certificate is None:
        pytest.skip("openssl could not make a certificate")
    key, cert = certificate
    pool = start_tiny_model_pool(directory / "model")
    config = tiny_model_config(
        directory / "model", tls_cert=str(cert), tls_key=str(key), auth_tokens=f"alice={ALICE},bob={BOB}"
    )
    service = LocalService(config, pool=pool).start()
    yield service, cert.read_bytes()
    service.stop()
    pool.shutdown()
    ray.shutdown()


def refused_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_tls_and_tokens_refuse_unauthenticated_callers_on_every_rpc(secured):
    service, ca = secured
    with PrefillClient(service.target, token=ALICE, root_certificates=ca) as alice:
        handle = alice.prefill(token_ids=list(range(1, 40))).handle.handle
        for token in (None, "wrong-token-0123456789"):
            with PrefillClient(service.target, token=token, root_certificates=ca) as stranger:
                calls = {
                    "Prefill": lambda s=stranger: s.prefill(token_ids=[1, 2, 3], kv="none"),
                    "FetchKV": lambda s=stranger: s.fetch_kv(handle),
                    "RenewLease": lambda s=stranger: s.renew(handle),
                    "ReleaseKV": lambda s=stranger: s.release(handle),
                    "GetModelInfo": lambda s=stranger: s.model_info(),
                }
                for name, call in calls.items():
                    assert refused_code(call) == grpc.StatusCode.UNAUTHENTICATED, (token, name)
        with PrefillClient(service.target, token=ALICE) as plaintext:  # no TLS: no connection
            assert refused_code(lambda: plaintext.model_info(timeout=5)) == grpc.StatusCode.UNAVAILABLE
        alice.release(handle)


def test_audit_log_names_the_principal_of_every_handle_event(secured):
    service, ca = secured
    audit = AuditLines()
    logging.getLogger("proxyprefill.audit").addHandler(audit)
    logging.getLogger("proxyprefill.audit").setLevel(logging.INFO)
    try:
        with (
            PrefillClient(service.target, token=ALICE, root_certificates=ca) as alice,
            PrefillClient(service.target, token=BOB, root_certificates=ca) as bob,
        ):
            handle = alice.prefill(token_ids=list(range(1, 70)), request_id="audited-1").handle.handle
            for call in (
                lambda: bob.fetch_kv(handle),
                lambda: bob.renew(handle),
                lambda: bob.release(handle),
            ):
                assert refused_code(call) == grpc.StatusCode.PERMISSION_DENIED
            assert len(alice.fetch_kv(handle).keys) == 2
            alice.renew(handle, lease_seconds=60)
            alice.release(handle)
    finally:
        logging.getLogger("proxyprefill.audit").removeHandler(audit)
    mine = [line for line in audit.lines if line.startswith(f"handle={handle[:12]} ")]
    actions = [line.split()[1] for line in mine]
    fetched = ["action=fetched"] * 2  # the client's parallel streams: one call per layer range
    assert actions == ["action=created", *fetched, "action=renewed", "action=released"], mine
    assert sorted(line.split()[3] for line in mine[1:3]) == ["layers=0-1", "layers=1-2"], mine
    assert all("principal=alice" in line for line in mine)
    assert "request_id=audited-1" in mine[0]
    assert handle not in " ".join(audit.lines), "the full handle never reaches the log"
