"""OpenTelemetry spans per RPC (service/tracing.py): a live loopback server whose pool answers
prefills at once (no Ray), its spans caught by the SDK's in-memory exporter; and the start-up
checks of the `tracing` setting."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("grpc_health")
pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import StatusCode  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "reliability"))
from _support import wait_for  # noqa: E402
from hostile_support import NullPool, prefill_stream  # noqa: E402

from proxyprefill.service import config as config_mod  # noqa: E402
from proxyprefill.service import tracing  # noqa: E402
from proxyprefill.service.client import PrefillClient  # noqa: E402
from proxyprefill.service.local import LocalService  # noqa: E402
from proxyprefill.service.server import PrefillServer  # noqa: E402
from proxyprefill.workers.protocol import PrefillDone, Progress  # noqa: E402

NUM_LAYERS, NUM_HEADS = 2, 4
SPARSITY = np.array([[0.25, 0.5, 0.5, 0.75], [0.0, 0.25, 0.25, 0.5]])


class QuickPool(NullPool):
    """NullPool whose worker finishes every prefill at once: one progress item, then a result
    holding (pretend) KV under the handle it was given."""

    def __init__(self):
        super().__init__()
        self.kept: dict[str, int] = {}
        self.hang = False  # True: report progress, then never finish (until the call is cancelled)

    def prefill(self, worker, key, token_ids, options):
        self.calls.append("prefill")
        n = len(token_ids)
        if self.hang:
            return _progress_then_wait(n)
        kv_bytes = 2 * NUM_LAYERS * 2 * 16 * 4 * n
        if options.keep_handle is not None:
            self.kept[options.keep_handle] = kv_bytes
        header = dict(
            model_id="null",
            num_layers=NUM_LAYERS,
            num_kv_heads=2,
            head_dim=16,
            dtype="float32",
            rope_theta=10000.0,
            rope_scaling=None,
            num_tokens=n,
            token_sha256="0" * 64,
        )
        result = PrefillDone(
            num_tokens=n,
            logits=None,
            logit_positions=[],
            sparsity=SPARSITY,
            estimate_seconds=0.001,
            attention_seconds=0.002,
            total_seconds=0.01,
            peak_memory_bytes=0,
            kv_bytes=kv_bytes,
            header=header,
            attention="proxy",
            profile="",
        )
        return prefill_stream(Progress(n, n), result)

    async def release(self, worker, handle):
        self.calls.append("release")
        return self.kept.pop(handle, 0)


async def _progress_then_wait(n):
    yield Progress(1, n)
    await asyncio.get_running_loop().create_future()  # never done: the worker is still busy


class TracedService(LocalService):
    """LocalService whose server makes its spans with `tracer`."""

    def __init__(self, config, pool, tracer):
        super().__init__(config, pool=pool)
        self.tracer = tracer

    async def _make_server(self) -> PrefillServer:
        return PrefillServer(self.config, self.pool, tracer=self.tracer)


@pytest.fixture
def exporter():
    return InMemorySpanExporter()


@pytest.fixture
def service(exporter):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = tracing.RequestTracer(provider.get_tracer("test"))
    config = config_mod.load(environ={}, listen="127.0.0.1:0")
    service = TracedService(config, QuickPool(), tracer).start()
    yield service
    service.stop()


@pytest.fixture
def client(service):
    with PrefillClient(service.target) as client:
        yield client


def attributes(span) -> dict:
    return {k.removeprefix("proxyprefill."): v for k, v in span.attributes.items()}


def test_a_prefill_is_one_span_with_a_child_per_stage(client, exporter):
    outcome = client.prefill(token_ids=[1, 2, 3, 4, 5], request_id="req-1", kv="handle")
    assert outcome.summary.num_tokens == 5
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"Prefill", "queue_wait", "worker_prefill", "kv_return"}

    rpc = spans["Prefill"]
    assert rpc.parent is None and rpc.status.status_code != StatusCode.ERROR
    found = attributes(rpc)
    assert found["request_id"] == "req-1" and found["num_tokens"] == 5
    assert found["worker"] == "worker-0" and found["pipeline_stages"] == 1
    assert found["sparsity"] == pytest.approx(SPARSITY.mean())
    assert found["status"] == "OK" and found["rpc.method"] == "Prefill"

    stages = [spans[name] for name in ("queue_wait", "worker_prefill", "kv_return")]
    for stage in stages:
        assert stage.parent.span_id == rpc.context.span_id
        assert stage.context.trace_id == rpc.context.trace_id
        assert rpc.start_time <= stage.start_time <= stage.end_time <= rpc.end_time
    for earlier, later in zip(stages, stages[1:]):
        assert earlier.end_time <= later.start_time  # one after another
    assert attributes(spans["worker_prefill"])["worker"] == "worker-0"

    exporter.clear()
    client.release(outcome.handle.handle)
    (release,) = exporter.get_finished_spans()
    assert release.name == "ReleaseKV" and attributes(release)["status"] == "OK"


def test_refused_calls_end_their_span_with_the_status(client, exporter):
    with pytest.raises(grpc.RpcError) as refused:
        client.prefill(token_ids=[1, 2, 3], chunk_size=100)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unknown:
        client.release("0" * 32)
    # an aborted call's status reaches the client while its handler is still ending
    assert wait_for(lambda: len(exporter.get_finished_spans()) == 2, seconds=10)
    (prefill,), (release,) = (
        [s for s in exporter.get_finished_spans() if s.name == name] for name in ("Prefill", "ReleaseKV")
    )
    assert attributes(prefill)["status"] == "INVALID_ARGUMENT"
    assert prefill.status.status_code == StatusCode.ERROR
    assert "request_id" not in attributes(prefill)  # refused before it had one
    assert attributes(release)["status"] == unknown.value.code().name != "OK"
    assert release.status.status_code == StatusCode.ERROR
    assert len(exporter.get_finished_spans()) == 2  # no stages: nothing ran


def test_a_cancelled_prefill_ends_its_span_and_its_open_stage(service, client, exporter):
    service.pool.hang = True
    call = client.prefill_events(client.request(token_ids=[1, 2, 3], kv="none"))
    kinds = [next(call).WhichOneof("event") for _ in range(2)]
    assert kinds == ["accepted", "progress"]  # the worker is prefilling now
    call.cancel()
    assert wait_for(lambda: any(s.name == "Prefill" for s in exporter.get_finished_spans()), seconds=10)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"Prefill", "queue_wait", "worker_prefill"}  # it never reached kv_return
    assert attributes(spans["Prefill"])["status"] == "CANCELLED"
    assert spans["worker_prefill"].end_time <= spans["Prefill"].end_time


def test_tracing_off_makes_no_spans_and_needs_no_package():
    rpc = tracing.NO_TRACING.rpc("Prefill", "svc")
    assert rpc is tracing.NO_SPAN and tracing.current_rpc() is tracing.NO_SPAN
    rpc.set(request_id="x")
    rpc.child("queue_wait").end()
    rpc.end("OK")
    behaviour = object()
    assert tracing.NO_TRACING.traced("Prefill", "svc", behaviour, True) is behaviour


# start-up checks -----------------------------------------------------------------------------
def test_tracing_is_a_flag_an_environment_variable_and_a_file_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert config_mod.load(environ={"PROXYPREFILL_TRACING": "true"}).tracing
    (tmp_path / "server.toml").write_text("tracing = true\n")
    assert config_mod.load(environ={"PROXYPREFILL_CONFIG": str(tmp_path / "server.toml")}).tracing
    assert not config_mod.load(environ={}).tracing


def test_tracing_without_the_sdk_is_a_start_up_error_naming_the_field(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with pytest.raises(config_mod.ConfigError) as error:
        config_mod.load(environ={}, tracing=True)
    assert str(error.value).startswith("tracing") and "opentelemetry-sdk" in str(error.value)


@pytest.mark.parametrize(
    "exporter_name, missing, needs",
    [("zipkin", None, "OTEL_TRACES_EXPORTER"), ("otlp", "opentelemetry.exporter.otlp.proto.http", "otlp")],
)
def test_an_exporter_that_cannot_run_is_a_start_up_error(monkeypatch, exporter_name, missing, needs):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", exporter_name)
    if missing:
        monkeypatch.setitem(sys.modules, missing, None)
        monkeypatch.setitem(sys.modules, missing + ".trace_exporter", None)
    with pytest.raises(config_mod.ConfigError) as error:
        config_mod.load(environ={}, tracing=True)
    assert str(error.value).startswith("tracing") and needs in str(error.value)


def test_the_otlp_exporter_sends_the_spans_to_the_configured_endpoint(monkeypatch):
    """OTEL_TRACES_EXPORTER unset means otlp: the spans go over HTTP to a receiver on loopback."""
    import http.server
    import threading

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[tuple[str, bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "prefill-test")
        tracer = tracing.RequestTracer.from_environment()
        rpc = tracer.rpc("Prefill", "svc")
        rpc.set(request_id="req-7")
        rpc.child("queue_wait").end()
        rpc.end("OK")
        tracer.shutdown()  # exports what is buffered
    finally:
        server.shutdown()
        thread.join(timeout=10)
    assert [path for path, _ in received] == ["/v1/traces"]
    export = ExportTraceServiceRequest.FromString(received[0][1])
    (resource_spans,) = export.resource_spans
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
    assert service == "prefill-test"
    spans = [span for scope in resource_spans.scope_spans for span in scope.spans]
    assert sorted(span.name for span in spans) == ["Prefill", "queue_wait"]


def test_the_console_exporter_prints_the_spans(tmp_path):
    """OTEL_TRACES_EXPORTER=console: one JSON object per span on stdout (in a process of its own,
    whose stdout the exporter writes to)."""
    import os
    import subprocess

    script = (
        "from proxyprefill.service import tracing\n"
        "tracer = tracing.RequestTracer.from_environment()\n"
        "tracer.rpc('GetModelInfo', 'svc').end('OK')\n"
        "tracer.shutdown()\n"
    )
    env = dict(os.environ, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="prefill-test")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert '"name": "GetModelInfo"' in done.stdout and '"service.name": "prefill-test"' in done.stdout


def test_serve_help_lists_the_tracing_flag(capsys):
    from proxyprefill.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--tracing" in capsys.readouterr().out


class _HandlerContext:
    """What Prefill reads of a grpc.aio context, to drive the handler without gRPC."""

    def invocation_metadata(self):
        return ()

    def peer(self):
        return "ipv4:127.0.0.1:1"

    async def abort(self, code, details):
        raise AssertionError(f"the call was refused: {code} {details}")


def test_a_call_that_ends_before_its_summary_frees_its_handle(service, client):
    """A caller that goes away after the KV handle event but before the summary may never have
    read the handle, so nobody would release it until it expired: the server frees it."""
    server, pool = service.server, service.pool

    async def until_the_handle():
        events = server.Prefill(client.request(token_ids=[1, 2, 3], kv="handle"), _HandlerContext())
        kinds = []
        async for event in events:
            kinds.append(event.WhichOneof("event"))
            if kinds[-1] == "kv_handle":
                break
        await events.aclose()  # what grpc does to the handler of a call its caller cancelled
        return kinds

    assert service.call(until_the_handle())[-1] == "kv_handle"
    assert len(server.leases) == 0 and pool.kept == {}  # released on the worker too
    outcome = client.prefill(token_ids=[1, 2, 3], kv="handle")  # read to its summary: kept
    assert len(server.leases) == 1 and list(pool.kept) == [outcome.handle.handle]
    client.release(outcome.handle.handle)
