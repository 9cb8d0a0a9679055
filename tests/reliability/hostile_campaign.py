"""The hostile-input campaign: generated request messages against the request decoding and
validation in-process, against a coverage-guided fuzzer (atheris, when installed), and against a
live loopback server. Each message must end in a refusal (hostile_support.REFUSALS) or, when it is
a valid request, in OK; nothing may crash, hang, or log a traceback or a WARNING.

    python tests/reliability/hostile_campaign.py                  # the full run (RELIABILITY.md)
    python tests/reliability/hostile_campaign.py --server null --live-cases 300 --decode-cases 1000 \
        --atheris-runs 0                                          # the size the CI test runs

`--server tiny` (default) serves a tiny random Llama through Ray, so valid prefills really run;
`--server null` serves a pool that computes nothing (no Ray). Prints one summary and exits 1 on
any failure.
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from hostile_support import (  # noqa: E402
    METHODS,
    REFUSALS,
    LogWatch,
    NullPool,
    call_raw,
    start_tiny_model_pool,
    tiny_model_config,
)

from proxyprefill.protos import prefill_pb2 as pb  # noqa: E402
from proxyprefill.service.leases import LeaseError, LeaseTable  # noqa: E402
from proxyprefill.service.validation import Limits, RequestError, validate_prefill  # noqa: E402

REQUEST_TYPES = {
    "Prefill": pb.PrefillRequest,
    "FetchKV": pb.FetchKVRequest,
    "RenewLease": pb.RenewLeaseRequest,
    "ReleaseKV": pb.ReleaseKVRequest,
    "GetModelInfo": pb.GetModelInfoRequest,
    "MapKV": pb.MapKVRequest,
    "PushKV": pb.PushKVRequest,
}
CALL_TIMEOUT = 30.0  # a call not answered within this is a hang


# generated messages --------------------------------------------------------------------------
def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field_bytes(number: int, wire_type: int, payload: bytes) -> bytes:
    return varint(number << 3 | wire_type) + payload


wild_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "id\n", "0" * 32 + "\n", "a" * 129, "0" * 32, "F" * 32, "é" * 16, "\x00"]),
)
wild_uint32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 127, 128, 255, 256, 4096]))


@st.composite
def prefill_requests(draw) -> pb.PrefillRequest:
    """Mostly wild, sometimes tame (valid on the tiny model), so that real prefills run too."""
    tame = draw(st.integers(0, 9)) == 0
    request = pb.PrefillRequest(request_id=draw(st.sampled_from(["", "ok-1"]) if tame else wild_text))
    if tame:
        request.tokens.ids.extend(draw(st.lists(st.integers(0, 255), min_size=1, max_size=64)))
        request.returns.kv = draw(st.sampled_from([pb.KV_RETURN_NONE, pb.KV_RETURN_INLINE]))
        request.returns.logits = draw(st.sampled_from([pb.LOGITS_RETURN_NONE, pb.LOGITS_RETURN_LAST]))
        return request
    which = draw(st.sampled_from(["tokens", "text", "none", "huge"]))
    if which == "tokens":
        request.tokens.ids.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40)))
    elif which == "huge":
        request.tokens.ids.extend([7] * draw(st.sampled_from([4097, 20_000])))  # 1M: oversized_and_empty
    elif which == "text":
        request.text = draw(st.text(max_size=80))
    request.chunk_size = draw(wild_uint32)
    request.pipeline_stages = draw(wild_uint32)
    returns = request.returns
    returns.kv = draw(st.integers(-5, 10))
    returns.logits = draw(st.integers(-5, 10))
    returns.logit_positions.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5)))
    returns.lease_seconds = draw(wild_uint32)
    returns.include_token_ids = draw(st.booleans())
    attention = request.attention
    attention.mode = draw(st.integers(-3, 5))
    for name in ("gamma", "alpha", "exponent"):
        if draw(st.booleans()):
            setattr(attention, name, draw(st.floats(allow_nan=True, allow_infinity=True)))
    for name in ("min_budget_tokens", "stride", "dense_below_tokens"):
        if draw(st.booleans()):
            setattr(attention, name, draw(wild_uint32))
    if draw(st.booleans()):
        attention.budget = draw(st.one_of(wild_text, st.sampled_from(["gamma", "power", "gamma+power"])))
    return request


@st.composite
def handle_requests(draw, request_type) -> bytes:
    request = request_type(handle=draw(wild_text))
    for name, value in (("lease_seconds", wild_uint32), ("max_chunk_bytes", wild_uint32)):
        if name in request_type.DESCRIPTOR.fields_by_name and draw(st.booleans()):
            setattr(request, name, draw(value))
    for name in ("layer_start", "layer_end", "timeout_seconds"):
        if name in request_type.DESCRIPTOR.fields_by_name and draw(st.booleans()):
            setattr(request, name, draw(wild_uint32))
    for name in ("rendezvous", "backend", "transfer_id"):  # PushKV
        if name in request_type.DESCRIPTOR.fields_by_name and draw(st.booleans()):
            setattr(request, name, draw(wild_text))
    if "transport" in request_type.DESCRIPTOR.fields_by_name and draw(st.booleans()):  # MapKV
        request.transport = draw(st.integers(-3, 8))
    return request.SerializeToString()


def structured(method: str) -> st.SearchStrategy[bytes]:
    if method == "Prefill":
        return prefill_requests().map(lambda r: r.SerializeToString())
    if method == "GetModelInfo":
        return st.just(b"")
    return handle_requests(REQUEST_TYPES[method])


@st.composite
def wire_level(draw) -> bytes:
    """Hand-made wire format: wrong wire types, overlong and overflowing varints, invalid UTF-8 in
    strings, truncated lengths, unknown fields."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        number = draw(st.integers(1, 12) | st.integers(13, 2**29 - 1))
        kind = draw(st.sampled_from(["varint", "overflow", "bad_utf8", "length", "fixed", "group", "bogus"]))
        if kind == "varint":
            parts.append(field_bytes(number, 0, varint(draw(st.integers(0, 2**64 - 1)))))
        elif kind == "overflow":  # 11 continuation bytes: longer than any varint may be
            parts.append(field_bytes(number, 0, b"\xff" * 10 + b"\x01"))
        elif kind == "bad_utf8":
            payload = draw(st.sampled_from([b"\xc3\x28", b"\xff", b"\xed\xa0\x80", b"ok\x80"]))
            parts.append(field_bytes(number, 2, varint(len(payload)) + payload))
        elif kind == "length":  # the length says more than follows, or is absurd
            parts.append(field_bytes(number, 2, varint(draw(st.integers(0, 2**64 - 1))) + b"abc"))
        elif kind == "fixed":
            parts.append(
                field_bytes(number, draw(st.sampled_from([1, 5])), b"\x00" * draw(st.integers(0, 8)))
            )
        elif kind == "group":
            parts.append(field_bytes(number, 3, b""))
        else:
            parts.append(field_bytes(number, draw(st.sampled_from([6, 7])), b"\x00"))
    return b"".join(parts)


@st.composite
def mutated(draw, method: str) -> bytes:
    raw = bytearray(draw(structured(method)))
    for _ in range(draw(st.integers(1, 6))):
        if raw and draw(st.booleans()):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        else:
            raw.insert(draw(st.integers(0, len(raw))), draw(st.integers(0, 255)))
    return bytes(raw)


def messages(method: str) -> st.SearchStrategy[bytes]:
    return st.one_of(structured(method), wire_level(), mutated(method), st.binary(max_size=300))


@st.composite
def cases(draw) -> tuple[str, list[bytes]]:
    """(method, the request messages of one call): usually one, sometimes none or several."""
    method = draw(st.sampled_from(METHODS))
    count = draw(st.sampled_from([1] * 12 + [0, 2, 3]))
    return method, [draw(messages(method)) for _ in range(count)]


# judging one message without a server ---------------------------------------------------------
def decode_and_validate(method: str, raw: bytes, limits: Limits, leases: LeaseTable) -> grpc.StatusCode:
    """What the server's decoding and validation make of one message: OK or the refusal code.
    Anything but DecodeError, RequestError or LeaseError escapes: a crash."""
    try:
        request = REQUEST_TYPES[method].FromString(raw)
    except DecodeError:
        return grpc.StatusCode.INVALID_ARGUMENT
    try:
        if method == "Prefill":
            validate_prefill(request, limits, None)
        elif method != "GetModelInfo":
            leases.get(request.handle, "campaign")
    except (RequestError, LeaseError) as error:
        return error.code
    return grpc.StatusCode.OK


@dataclass
class Tally:
    messages: int = 0
    calls: int = 0
    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, text: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(text)


def run_decoding(cases_count: int, limits: Limits, seed_value: int) -> Tally:
    tally = Tally()
    leases = LeaseTable(1 << 30, 60, 3600)
    started = time.perf_counter()

    @seed(seed_value)
    @settings(max_examples=cases_count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(METHODS).flatmap(lambda m: st.tuples(st.just(m), messages(m))))
    def one(case):
        method, raw = case
        tally.messages += 1
        try:
            code = decode_and_validate(method, raw, limits, leases)
        except Exception as error:  # collected: the campaign reports every crash
            tally.fail(f"{method} {raw[:60]!r}: {type(error).__name__}: {error}")
            return
        tally.outcomes[code.name] += 1
        if code != grpc.StatusCode.OK and code not in REFUSALS:
            tally.fail(f"{method} {raw[:60]!r}: {code.name}")

    one()
    tally.seconds = time.perf_counter() - started
    return tally


# coverage-guided: atheris, in a child process (libFuzzer ends the process when done) -----------
def atheris_child(runs: int) -> None:
    import atheris

    from proxyprefill.service import validation

    # coverage of our own decoding and validation code guides the search (protobuf parses in C)
    for function in [decode_and_validate, LeaseTable.get] + [
        value
        for value in vars(validation).values()
        if inspect.isfunction(value) and value.__module__ == validation.__name__
    ]:
        atheris.instrument_func(function)
    limits = _null_limits()
    table = LeaseTable(1 << 30, 60, 3600)

    def one(data: bytes) -> None:
        if not data:
            return
        method = METHODS[data[0] % len(METHODS)]
        code = decode_and_validate(method, data[1:], limits, table)
        assert code == grpc.StatusCode.OK or code in REFUSALS, code

    corpus = Path(tempfile.mkdtemp(prefix="hostile-corpus-"))
    for index, seed_message in enumerate(_seed_messages()):
        (corpus / f"seed-{index}").write_bytes(seed_message)
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-max_len=2048", "-seed=1", str(corpus)], one)
    atheris.Fuzz()


def _seed_messages() -> list[bytes]:
    """Valid requests of every method (first byte: the method), for the fuzzer to mutate from:
    parsing succeeds and validation goes deep, which random bytes rarely reach."""
    prefill = pb.PrefillRequest(request_id="seed-1", tokens=pb.TokenIds(ids=list(range(1, 40))))
    prefill.returns.logits = pb.LOGITS_RETURN_POSITIONS
    prefill.returns.logit_positions.extend([0, 5])
    prefill.attention.gamma, prefill.attention.stride, prefill.attention.budget = 0.9, 4, "gamma"
    text = pb.PrefillRequest(text="some text", chunk_size=256)
    text.attention.alpha, text.attention.exponent = 1.0, 0.5
    handle = "0123456789abcdef" * 2
    messages = {
        "Prefill": [prefill, text],
        "FetchKV": [pb.FetchKVRequest(handle=handle, max_chunk_bytes=4096, layer_start=0, layer_end=1)],
        "RenewLease": [pb.RenewLeaseRequest(handle=handle, lease_seconds=30)],
        "ReleaseKV": [pb.ReleaseKVRequest(handle=handle)],
        "GetModelInfo": [pb.GetModelInfoRequest()],
        "MapKV": [pb.MapKVRequest(handle=handle, transport=1)],
        "PushKV": [pb.PushKVRequest(handle=handle, rendezvous="127.0.0.1:29500", backend="gloo")],
    }
    return [
        bytes([METHODS.index(method)]) + message.SerializeToString()
        for method, examples in messages.items()
        for message in examples
    ]


def run_atheris(runs: int) -> Tally:
    tally = Tally()
    if runs <= 0:
        return tally
    try:
        import atheris  # noqa: F401
    except ImportError:
        tally.fail("atheris is not installed (pip install atheris): coverage-guided part skipped")
        return tally
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, __file__, "--atheris-child", str(runs)], capture_output=True, text=True
    )
    tally.seconds = time.perf_counter() - started
    done = [line for line in child.stderr.splitlines() if line.startswith("Done ")]
    tally.messages = int(done[-1].split()[1]) if done else 0
    coverage = [line for line in child.stderr.splitlines() if " cov: " in line]
    if coverage:
        tally.outcomes["libFuzzer: " + " ".join(coverage[-1].split()[2:8])] = 1
    if child.returncode != 0 or not done:
        tally.fail(f"atheris exited {child.returncode}: {child.stderr[-1500:]}")
    return tally


def _null_limits() -> Limits:

    from proxyprefill.service import config as config_mod

    return Limits.from_config(config_mod.load(environ={}), NullPool.description.model)


# a live server -------------------------------------------------------------------------------
def run_live(service, cases_count: int, seed_value: int) -> Tally:
    """Sends `cases_count` generated calls to `service`; checks each outcome against what the
    decoding and validation say it must be."""
    tally = Tally()
    limits = service.server.limits
    leases = LeaseTable(1 << 30, 60, 3600)
    started = time.perf_counter()
    with grpc.insecure_channel(
        service.target, options=[("grpc.max_receive_message_length", 256 << 20)]
    ) as channel:

        @seed(seed_value)
        @settings(
            max_examples=cases_count, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(cases())
        def one(case):
            method, raw_messages = case
            tally.calls += 1
            tally.messages += len(raw_messages)
            begun = time.monotonic()
            outcome = call_raw(channel, method, raw_messages, timeout=CALL_TIMEOUT)
            tally.outcomes[outcome.code.name] += 1
            what = f"{method} x{len(raw_messages)} {raw_messages[0][:60]!r}" if raw_messages else method
            if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED or time.monotonic() - begun > CALL_TIMEOUT:
                tally.fail(f"hang: {what}")
                return
            if len(raw_messages) != 1:
                expected = grpc.StatusCode.INVALID_ARGUMENT
            else:
                expected = decode_and_validate(method, raw_messages[0], limits, leases)
            if outcome.code == grpc.StatusCode.OK and expected != grpc.StatusCode.OK:
                tally.fail(f"accepted an invalid request ({expected.name} expected): {what}")
            elif outcome.code != grpc.StatusCode.OK and outcome.code not in REFUSALS:
                tally.fail(f"{outcome.code.name} {outcome.details[:120]!r}: {what}")
            elif expected != grpc.StatusCode.OK and outcome.code != expected:
                tally.fail(f"{outcome.code.name} where validation says {expected.name}: {what}")

        one()
    tally.seconds = time.perf_counter() - started
    return tally


def oversized_and_empty(service) -> Tally:
    """Fixed cases too large to generate often: a request over max_message_bytes, a million token
    ids, and streams of zero and of many messages to every method."""
    tally = Tally()
    started = time.perf_counter()
    too_big = pb.PrefillRequest(text="x" * (service.config.max_message_bytes + 1024)).SerializeToString()
    million = pb.PrefillRequest(tokens=pb.TokenIds(ids=[7] * 1_000_000)).SerializeToString()
    with grpc.insecure_channel(service.target) as channel:
        for method, raw_messages in [("Prefill", [too_big]), ("Prefill", [million])] + [
            (method, batch) for method in METHODS for batch in ([], [b""] * 50)
        ]:
            tally.calls += 1
            tally.messages += len(raw_messages)
            outcome = call_raw(channel, method, raw_messages, timeout=CALL_TIMEOUT)
            tally.outcomes[outcome.code.name] += 1
            if outcome.code not in REFUSALS:
                tally.fail(f"{method} x{len(raw_messages)}: {outcome.code.name} {outcome.details[:120]!r}")
    tally.seconds = time.perf_counter() - started
    return tally


def server_is_clean(service) -> list[str]:
    server = service.server
    problems = []
    if server.admission.pending_tokens or server.admission.queue_depth or server.admission.running:
        problems.append(f"admission not empty: {server.admission.pending_tokens} pending tokens")
    if len(server.leases) or server.leases.reserved_bytes:
        problems.append(f"{len(server.leases)} leases, {server.leases.reserved_bytes} bytes reserved")
    return problems


# the command ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--server", choices=["tiny", "null"], default="tiny", help="the live server's pool (default tiny)"
    )
    parser.add_argument(
        "--live-cases", type=int, default=10_000, help="generated calls to the live server (default 10000)"
    )
    parser.add_argument(
        "--decode-cases",
        type=int,
        default=10_000,
        help="generated messages decoded and validated in-process (default 10000)",
    )
    parser.add_argument(
        "--atheris-runs", type=int, default=200_000, help="coverage-guided inputs (default 200000; 0 = skip)"
    )
    parser.add_argument("--seed", type=int, default=16, help="hypothesis seed (default 16)")
    parser.add_argument("--atheris-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)  # fmt: skip
    if args.atheris_child is not None:
        atheris_child(args.atheris_child)
        return 0

    from proxyprefill.service.local import LocalService

    parts: dict[str, Tally] = {"decoding": run_decoding(args.decode_cases, _null_limits(), args.seed)}
    parts["atheris"] = run_atheris(args.atheris_runs)
    with tempfile.TemporaryDirectory() as directory:
        if args.server == "tiny":
            pool = start_tiny_model_pool(Path(directory) / "model")
            config = tiny_model_config(Path(directory) / "model")
        else:
            from proxyprefill.service import config as config_mod

            pool, config = NullPool(), config_mod.load(environ={}, listen="127.0.0.1:0")
        service = LocalService(config, pool=pool).start()
        try:
            with LogWatch() as watch:
                parts["live"] = run_live(service, args.live_cases, args.seed)
                parts["fixed"] = oversized_and_empty(service)
                time.sleep(1.0)  # in-flight cancellations settle
                clean = server_is_clean(service)
        finally:
            service.stop()
            if args.server == "tiny":
                import ray

                pool.shutdown()
                ray.shutdown()
    failures = [f"{name}: {text}" for name, tally in parts.items() for text in tally.failures]
    failures += [f"log: {line}" for line in watch.lines()[:20]] + [f"server: {p}" for p in clean]
    print(f"hostile-input campaign (server {args.server}, seed {args.seed})")
    for name, tally in parts.items():
        outcomes = ", ".join(f"{k} {v}" for k, v in tally.outcomes.most_common())
        print(f"  {name}: {tally.messages} messages, {tally.calls} calls, {tally.seconds:.1f} s; {outcomes}")
    print(f"  log records at WARNING+ or with a traceback: {len(watch.records)}")
    print(f"  failures: {len(failures)}")
    for line in failures[:40]:
        print("    " + line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
