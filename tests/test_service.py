"""The service end to end: a real grpc.aio server on loopback over a local Ray pool of two workers
running the embedded SmolLM2 on CPU. Prompts are kept to hundreds of tokens.

One Ray instance and one worker pool serve the whole module; servers with other settings (auth,
small limits, TLS) are started on the same pool.
"""

import subprocess
import threading
import time

import grpc
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("grpc_health")

from _support import wait_for  # noqa: E402

from proxyprefill.protos import prefill_pb2 as pb  # noqa: E402
from proxyprefill.service import config as config_mod  # noqa: E402
from proxyprefill.service.client import PrefillClient  # noqa: E402
from proxyprefill.service.local import LocalService  # noqa: E402

pytestmark = pytest.mark.slow

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his "
    "father had taught him. At the top he trimmed the wick, polished the great lens, and watched the "
    "ships pass far out beyond the reef. "
)
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789abcd"


def _config(**overrides):
    values = dict(
        listen="127.0.0.1:0",
        min_budget_tokens=256,
        min_budget_tokens_floor=128,
        num_workers=2,
        dense_below_tokens=0,
    )
    values.update(overrides)
    return config_mod.load(environ={}, **values)


@pytest.fixture(scope="module")
def pool():
    from proxyprefill.workers.ray_pool import WorkerPool

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = WorkerPool.start(_config().engine_kwargs(), num_workers=2)
    yield pool
    pool.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def service(pool):
    service = LocalService(_config(), pool=pool).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def client(service):
    with PrefillClient(service.target) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(pool):
    return pool.tokenizer()


@pytest.fixture(scope="module")
def decoder():
    from proxyprefill.service.decode import load_decoder

    return load_decoder(None)


def worker_stats(pool):
    stats = ray.get([pool.stats(i) for i in range(len(pool.actors))])
    counters = [key for key, value in stats[0].items() if type(value) is int]  # not flags or timings
    return {key: sum(s[key] for s in stats) for key in counters}


def assert_healthy_and_clean(service, client, pool, kv_bytes=0):
    """The server still serves, nothing is queued or pending, and workers hold exactly the KV
    that live leases account for."""
    assert client.health() == "SERVING"
    server = service.server
    deadline = time.time() + 10
    while time.time() < deadline and (server.admission.pending_tokens or worker_stats(pool)["running"]):
        time.sleep(0.05)
    assert server.admission.pending_tokens == 0 and server.admission.queue_depth == 0
    assert server.leases.reserved_bytes == 0
    stats = worker_stats(pool)
    assert stats["running"] == 0
    assert stats["kv_bytes"] == server.leases.held_bytes == kv_bytes


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.details(), "every error carries a message"
    return caught.value


# ---------------------------------------------------------------------------------------------
def test_health_reflection_and_model_info(service, client):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    assert client.health() == "SERVING"
    assert client.health("proxyprefill.v1.PrefillService") == "SERVING"
    services = set(ProtoReflectionDescriptorDatabase(client.channel).get_services())
    assert {"proxyprefill.v1.PrefillService", "grpc.health.v1.Health"} <= services
    info = client.model_info()
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (30, 9, 3, 64)
    assert info.num_workers == 2 and info.limits.max_prompt_tokens == 8192
    assert info.limits.max_kv_chunk_bytes <= 4 * 1024 * 1024


def test_round_trip_text_logits_and_kv_bit_exact(service, client, pool, tokenizer, decoder):
    events = []
    outcome = client.prefill(
        text=TEXT * 4, kv="handle", logits="last", chunk_size=128, attention="dense", on_event=events.append
    )
    ids = tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"]
    n = len(ids)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "summary" and "kv_handle" in kinds
    done = [e.progress.tokens_done for e in events if e.WhichOneof("event") == "progress"]
    assert done == sorted(done) and done[-1] == n and len(done) == -(-n // 128)
    assert outcome.summary.num_tokens == n and outcome.summary.attention_mode == "dense"

    # logits: the decoder's own forward over the whole prompt
    model, _ = decoder
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1]
    assert outcome.logit_positions == [n - 1]
    torch.testing.assert_close(outcome.logits[0], expected, atol=2e-3, rtol=1e-3)

    # KV: bit for bit what the worker holds, in many small pieces
    handle = outcome.handle.handle
    transfer = client.fetch_kv(handle, max_chunk_bytes=64 * 1024, include_token_ids=True)
    worker = pool.names.index(outcome.handle.worker)
    held = ray.get(pool.kv_tensors(worker, handle))
    assert len(transfer.keys) == 30
    for mine, theirs in zip(transfer.keys + transfer.values, held["keys"] + held["values"], strict=True):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
    assert transfer.token_ids.tolist() == ids
    header = transfer.header
    assert header.num_tokens == n and header.last_token_id == ids[-1] and header.layout == "[Hkv, N, d]"
    assert transfer.bytes_received == outcome.handle.kv_bytes == outcome.summary.kv_bytes

    # a layer range
    part = client.fetch_kv(handle, layer_start=3, layer_end=5)
    assert len(part.keys) == 2 and torch.equal(part.values[1], held["values"][4])

    lease = client.renew(handle, lease_seconds=600)
    assert lease.expires_at_unix_ms > outcome.handle.expires_at_unix_ms
    assert client.release(handle).released_bytes == outcome.handle.kv_bytes
    assert_healthy_and_clean(service, client, pool)


def test_chat_input_prefills_the_chat_templates_tokens(service, client, pool, tokenizer):
    from proxyprefill.workers.prompts import ChatMessage

    assert client.model_info().has_chat_template  # SmolLM2's tokenizer carries one
    messages = [ChatMessage("system", "Answer briefly."), ChatMessage("user", TEXT)]
    outcome = client.prefill(
        messages=messages, kv="inline", include_token_ids=True, chunk_size=128, attention="dense"
    )
    expected = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    assert outcome.kv.token_ids.tolist() == list(expected)
    assert outcome.summary.num_tokens == len(expected)
    refused = status_of(lambda: client.prefill(messages=[ChatMessage("robot", "hi")], kv="none"))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details().startswith("chat.messages[0].role")
    assert_healthy_and_clean(service, client, pool)


def test_inline_kv_matches_fetched_kv_and_keeps_nothing(service, client, pool):
    ids = list(range(100, 400))
    inline = client.prefill(token_ids=ids, kv="inline", include_token_ids=True, chunk_size=128)
    assert inline.handle is None and inline.kv is not None
    assert inline.kv.token_ids.tolist() == ids
    assert_healthy_and_clean(service, client, pool)
    kept = client.prefill(token_ids=ids, kv="handle", chunk_size=128)
    fetched = client.fetch_kv(kept.handle.handle)
    for a, b in zip(inline.kv.keys + inline.kv.values, fetched.keys + fetched.values, strict=True):
        assert torch.equal(a, b)
    assert inline.summary.sparsity == pytest.approx(kept.summary.sparsity)
    assert inline.summary.sparsity > 0  # 300 tokens, 256-token minimum budget: some blocks skipped
    client.release(kept.handle.handle)
    assert_healthy_and_clean(service, client, pool)


def test_decode_from_handle_equals_generate_on_the_full_prompt(service, client, pool, tokenizer, decoder):
    from proxyprefill.service.decode import decode_handle

    model, _ = decoder
    ids = tokenizer(TEXT * 2 + "Once upon a time, there was a little", add_special_tokens=False)["input_ids"]
    outcome = client.prefill(token_ids=ids, kv="handle", attention="dense", chunk_size=128)
    tokens, text = decode_handle(client, outcome.handle.handle, model, tokenizer, max_new_tokens=12)
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[
            0, len(ids) :
        ].tolist()
    assert len(expected) == 12 and tokens == expected  # no early end of sequence: a real continuation
    assert text.strip()
    client.release(outcome.handle.handle)
    assert_healthy_and_clean(service, client, pool)


# errors --------------------------------------------------------------------------------------
def test_request_errors_return_their_status_and_the_server_stays_healthy(service, client, pool):
    cases = [
        # the client packs token ids (TokenIds.packed_int32); errors name that field
        (dict(token_ids=[1, 2, 10**6]), grpc.StatusCode.INVALID_ARGUMENT, "tokens.packed_int32[2]"),
        (dict(token_ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "tokens.ids"),
        (dict(text=""), grpc.StatusCode.INVALID_ARGUMENT, "text"),
        (dict(token_ids=[5] * 9000), grpc.StatusCode.OUT_OF_RANGE, "tokens.packed_int32"),
        (dict(token_ids=[5] * 10, chunk_size=100), grpc.StatusCode.INVALID_ARGUMENT, "chunk_size"),
        (dict(token_ids=[5] * 10, gamma=0.01), grpc.StatusCode.INVALID_ARGUMENT, "attention.gamma"),
    ]
    for options, code, field in cases:
        error = status_of(lambda options=options: client.prefill(**options))
        assert error.code() == code and error.details().startswith(field), (options, error.details())
        assert_healthy_and_clean(service, client, pool)

    unknown = "0" * 32
    for call, code in [
        (lambda: client.fetch_kv(unknown), grpc.StatusCode.NOT_FOUND),
        (lambda: client.renew(unknown), grpc.StatusCode.NOT_FOUND),
        (lambda: client.release(unknown), grpc.StatusCode.NOT_FOUND),
        (lambda: client.fetch_kv("not-a-handle"), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        assert status_of(call).code() == code

    released = client.prefill(token_ids=[7] * 40, chunk_size=128).handle.handle
    client.release(released)
    error = status_of(lambda: client.fetch_kv(released))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "released" in error.details()

    expiring = client.prefill(token_ids=[8] * 40, chunk_size=128, lease_seconds=1).handle.handle
    time.sleep(2.5)  # past the lease, and past a sweep of the expiry task
    error = status_of(lambda: client.fetch_kv(expiring))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in error.details()
    assert status_of(lambda: client.renew(expiring)).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert_healthy_and_clean(service, client, pool)


def _long_call(client, timeout=None, chunk_size=128, kv="handle"):
    request = client.request(
        token_ids=[(i * 37) % 40000 + 10 for i in range(1536)], chunk_size=chunk_size, kv=kv
    )
    return client.prefill_events(request, timeout=timeout)


def test_client_cancel_mid_prefill_stops_the_worker(service, client, pool):
    before = worker_stats(pool)
    call = _long_call(client)
    for event in call:
        if event.WhichOneof("event") == "progress":
            call.cancel()
            break
    assert call.code() == grpc.StatusCode.CANCELLED
    assert wait_for(lambda: worker_stats(pool)["prefills_cancelled"] == before["prefills_cancelled"] + 1)
    assert worker_stats(pool)["prefills_result"] == before["prefills_result"]
    assert_healthy_and_clean(service, client, pool)


def test_deadline_exceeded_stops_the_worker(service, client, pool):
    before = worker_stats(pool)
    error = status_of(lambda: list(_long_call(client, timeout=1.5)))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: worker_stats(pool)["prefills_cancelled"] == before["prefills_cancelled"] + 1)
    assert_healthy_and_clean(service, client, pool)


def test_admission_and_memory_cap_refuse_with_resource_exhausted(pool):
    config = _config(max_pending_tokens=2000, max_prompt_tokens=2000, kv_memory_cap_bytes=20 * 1024 * 1024)
    with LocalService(config, pool=pool) as small, PrefillClient(small.target) as client:
        kv_per_token = 2 * 30 * 3 * 64 * 4
        error = status_of(lambda: client.prefill(token_ids=[5] * (20 * 1024 * 1024 // kv_per_token + 1)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV memory cap" in error.details()
        assert client.prefill(token_ids=[5] * 300, kv="none").summary.num_tokens == 300  # no KV, no cap

        call = _long_call(client, kv="none")
        next(iter(call))  # accepted: 1536 tokens pending
        error = status_of(lambda: client.prefill(token_ids=[5] * 500, kv="none"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pending" in error.details()
        call.cancel()
        assert wait_for(lambda: small.server.admission.pending_tokens == 0)
        assert client.prefill(token_ids=[5] * 500, kv="none").summary.num_tokens == 500


def test_bearer_tokens_and_handles_bound_to_their_caller(pool):
    config = _config(auth_tokens=f"alice={ALICE},bob={BOB}")
    with LocalService(config, pool=pool) as secured:
        with (
            PrefillClient(secured.target) as anonymous,
            PrefillClient(secured.target, token="wrong-token-0123456789") as stranger,
            PrefillClient(secured.target, token=ALICE) as alice,
            PrefillClient(secured.target, token=BOB) as bob,
        ):
            for who in (anonymous, stranger):
                assert status_of(lambda who=who: who.prefill(token_ids=[1, 2, 3])).code() == (
                    grpc.StatusCode.UNAUTHENTICATED
                )
                assert status_of(lambda who=who: who.model_info()).code() == grpc.StatusCode.UNAUTHENTICATED
            handle = alice.prefill(token_ids=list(range(1, 50)), chunk_size=128).handle.handle
            for call in (
                lambda: bob.fetch_kv(handle),
                lambda: bob.renew(handle),
                lambda: bob.release(handle),
            ):
                assert status_of(call).code() == grpc.StatusCode.PERMISSION_DENIED
            assert len(alice.fetch_kv(handle).keys) == 30
            alice.release(handle)
            assert anonymous.health() == "SERVING"  # probes need no token


def test_tls(pool, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        capture_output=True,
    )  # fmt: skip
    if made.returncode:
        pytest.skip("openssl could not make a certificate")
    config = _config(tls_cert=str(cert), tls_key=str(key))
    with LocalService(config, pool=pool) as secure:
        with PrefillClient(secure.target, root_certificates=cert.read_bytes()) as client:
            assert client.prefill(token_ids=[1, 2, 3], kv="none").summary.num_tokens == 3
        with PrefillClient(secure.target) as plaintext:
            assert status_of(lambda: plaintext.model_info(timeout=5)).code() == grpc.StatusCode.UNAVAILABLE


def test_32_concurrent_clients(service, client, pool):
    results, errors = {}, []

    def one(index):
        try:
            with PrefillClient(service.target) as own:
                ids = [(index * 131 + j) % 49000 + 1 for j in range(24 + index)]
                outcome = own.prefill(token_ids=ids, kv="handle", logits="last", chunk_size=128)
                transfer = own.fetch_kv(outcome.handle.handle)
                own.release(outcome.handle.handle)
                results[index] = (outcome.summary.num_tokens, transfer.keys[0].shape[1], outcome.logits.shape)
        except Exception as error:  # collected and asserted on below
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not errors, errors[:3]
    assert sorted(results) == list(range(32))
    assert all(results[i][:2] == (24 + i, 24 + i) and results[i][2] == (1, 49152) for i in range(32))
    assert_healthy_and_clean(service, client, pool)


def test_metrics_exposition(service, client):
    text = service.server.metrics.exposition().decode()
    for name in (
        "proxyprefill_prefill_latency_seconds_count",
        "proxyprefill_tokens_per_second_bucket",
        "proxyprefill_queue_depth",
        "proxyprefill_pending_tokens",
        "proxyprefill_sparsity_bucket",
        "proxyprefill_kv_bytes_held",
        'proxyprefill_requests_total{code="OK",method="Prefill",model_name=',
        "proxyprefill_time_to_first_token_seconds_count",
        "proxyprefill_request_prompt_tokens_bucket",
    ):
        assert name in text, name
    model = service.server.model_info.model_id
    samples = [line for line in text.splitlines() if line.startswith("proxyprefill_")]
    assert samples and all(f'model_name="{model}"' in line for line in samples)
    prompt_tokens = [
        line for line in text.splitlines() if line.startswith("proxyprefill_prompt_tokens_total")
    ]
    assert float(prompt_tokens[0].split()[-1]) > 0


def test_metrics_over_http(pool):
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (
        LocalService(_config(metrics_port=port), pool=pool) as exposed,
        PrefillClient(exposed.target) as client,
    ):
        client.prefill(token_ids=[4, 5, 6], kv="none")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'proxyprefill_prompt_tokens_total{model_name="' in text
    assert any(
        line.startswith("proxyprefill_prompt_tokens_total{") and line.endswith(" 3.0")
        for line in text.splitlines()
    )


def test_graceful_drain_finishes_in_flight_work(pool):
    with LocalService(_config(), pool=pool) as draining, PrefillClient(draining.target) as client:
        call = _long_call(client, chunk_size=512)
        first = next(iter(call))
        assert first.WhichOneof("event") == "accepted"
        drained = threading.Thread(target=lambda: draining.call(draining.server.drain(grace=60)))
        drained.start()
        assert wait_for(lambda: draining.server._draining)
        events = list(call)
        assert events[-1].WhichOneof("event") == "summary" and events[-1].summary.num_tokens == 1536
        drained.join(timeout=60)
        assert not drained.is_alive()
    assert worker_stats(pool)["running"] == 0


def test_fuzzed_requests_never_crash_hang_or_leak(service, client, pool):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    codes_allowed = {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
    optional_double = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
    optional_uint = st.one_of(st.none(), st.integers(0, 2**32 - 1))

    @st.composite
    def requests(draw):
        # half the examples stay within the valid ranges, so real prefills run too
        tame = draw(st.booleans())

        def pick(wild, valid):
            return draw(valid if tame else wild)

        request = pb.PrefillRequest(
            request_id=pick(st.text(max_size=20), st.sampled_from(["", "req-1", "a.b:c"])),
            chunk_size=pick(
                st.sampled_from([0, 1, 127, 128, 256, 2**32 - 1]), st.sampled_from([0, 128, 256])
            ),
            add_special_tokens=draw(st.booleans()),
        )
        which = pick(st.sampled_from(["tokens", "text", "none"]), st.sampled_from(["tokens", "text"]))
        if which == "tokens":
            wild_ids = st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 60000), max_size=48)
            request.tokens.ids.extend(
                pick(wild_ids, st.lists(st.integers(0, 49151), min_size=1, max_size=48))
            )
        elif which == "text":
            request.text = pick(st.text(max_size=200), st.text(min_size=1, max_size=120))
        returns = request.returns
        returns.kv = pick(st.integers(0, 5), st.integers(0, 3))
        returns.logits = pick(st.integers(0, 6), st.integers(0, 3))
        if not tame:
            returns.logit_positions.extend(draw(st.lists(st.integers(-5, 60), max_size=4)))
        returns.lease_seconds = pick(st.sampled_from([0, 1, 30, 4000]), st.sampled_from([0, 1, 30]))
        returns.include_token_ids = (
            returns.kv == pb.KV_RETURN_INLINE and draw(st.booleans()) if tame else (draw(st.booleans()))
        )
        settings_ = request.attention
        settings_.mode = pick(st.integers(0, 4), st.integers(0, 2))
        proxy_values = (
            ("gamma", optional_double, st.floats(0.5, 1.0)),
            ("alpha", optional_double, st.floats(0.1, 64.0)),
            ("exponent", optional_double, st.floats(0.1, 1.0)),
            ("min_budget_tokens", optional_uint, st.integers(128, 4096)),
            ("stride", optional_uint, st.sampled_from([1, 2, 4, 8, 16])),
            ("dense_below_tokens", optional_uint, st.integers(0, 4096)),
            (
                "budget",
                st.one_of(st.none(), st.sampled_from(["gamma", "power", "x"])),
                st.sampled_from(["gamma"]),
            ),
        )
        for name, wild, valid in proxy_values:
            value = pick(wild, st.one_of(st.none(), valid))
            if value is not None:
                setattr(settings_, name, value)
        return request

    handles, completed = [], []

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
    )
    @given(requests())
    def check(request):
        try:
            events = list(client.stub.Prefill(request, timeout=60))
        except grpc.RpcError as error:
            assert error.code() in codes_allowed, (error.code(), error.details())
            assert error.details()
            return
        assert events[0].WhichOneof("event") == "accepted"
        assert events[-1].WhichOneof("event") == "summary"
        handles.extend(e.kv_handle.handle for e in events if e.WhichOneof("event") == "kv_handle")
        completed.append(events[-1].summary.num_tokens)

    check()
    assert len(completed) >= 5, "the fuzzing should run real prefills too"
    for handle in handles:
        try:
            client.release(handle)
        except grpc.RpcError as error:  # one-second leases may have expired: the sweeper frees those
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    time.sleep(2.5)
    assert_healthy_and_clean(service, client, pool)


def test_cli_prefill_to_safetensors_info_and_decode(service, client, pool, tokenizer, tmp_path, capsys):
    from proxyprefill.cli import main
    from proxyprefill.workers.kv_files import load_kv

    document, out = tmp_path / "doc.txt", tmp_path / "kv.safetensors"
    document.write_text(TEXT * 2)
    assert main(["prefill", "--server", service.target, "--file", str(document), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "summary:" in printed and "handle released" in printed
    ids = tokenizer(TEXT * 2, add_special_tokens=False)["input_ids"]
    data = load_kv(out)
    assert data.token_ids.tolist() == ids and len(data.keys) == 30 and data.keys[0].shape == (3, len(ids), 64)

    assert main(["info", "--server", service.target]) == 0
    assert '"numLayers": 30' in capsys.readouterr().out

    handle = client.prefill(token_ids=ids, chunk_size=128).handle.handle
    assert main(["decode", "--server", service.target, "--handle", handle, "--max-new-tokens", "4"]) == 0
    assert "new tokens" in capsys.readouterr().out
    client.release(handle)
    assert_healthy_and_clean(service, client, pool)


def test_serve_command_drains_and_exits_on_sigterm(tmp_path):
    import signal
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "proxyprefill.cli", "serve", "--listen", f"127.0.0.1:{port}",
         "--num-workers", "1", "--ray-num-cpus", "1", "--drain-seconds", "5"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        with PrefillClient(f"127.0.0.1:{port}") as remote:

            def serving():
                try:
                    return remote.health(timeout=1) == "SERVING"
                except grpc.RpcError:
                    return process.poll() is None and False

            assert wait_for(serving, seconds=120), (tmp_path / "serve.log").read_text()[-2000:]
            assert remote.prefill(token_ids=[1, 2, 3], kv="none").summary.num_tokens == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_worker_lost_mid_prefill_answers_unavailable_and_recovers(service, client, pool):
    """Runs last in this module: it kills a worker, which Ray restarts (reloading the model)."""
    handle = client.prefill(token_ids=list(range(10, 60)), chunk_size=128).handle
    victim = pool.names.index(handle.worker)
    call = _long_call(client, kv="none")
    accepted = next(iter(call)).accepted
    target = pool.names.index(accepted.worker)
    ray.kill(pool.actors[target], no_restart=False)
    error = status_of(lambda: list(call))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    if target == victim:  # its KV died with it: the handle says so, and no longer counts as held
        codes = []

        def settled():  # UNAVAILABLE (retryable) while the worker restarts, then the verdict
            codes.append(status_of(lambda: client.fetch_kv(handle.handle, timeout=60)).code())
            return codes[-1] != grpc.StatusCode.UNAVAILABLE

        assert wait_for(settled, seconds=120)
        assert codes[-1] == grpc.StatusCode.FAILED_PRECONDITION
        assert status_of(lambda: client.renew(handle.handle)).code() == grpc.StatusCode.FAILED_PRECONDITION
    else:
        client.release(handle.handle)
    assert wait_for(lambda: ray.get(pool.stats(target), timeout=120) is not None, seconds=120)
    outcome = client.prefill(token_ids=[3] * 200, kv="none", timeout=120)
    assert outcome.summary.num_tokens == 200
    assert_healthy_and_clean(service, client, pool)
