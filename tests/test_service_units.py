"""The service's parts without a server: configuration, auth, leases, admission, validation."""

import asyncio
import json

import grpc
import numpy as np
import pytest

from proxyprefill.protos import prefill_pb2 as pb
from proxyprefill.service import config as config_mod
from proxyprefill.service.admission import Admission, AdmissionError
from proxyprefill.service.auth import Authenticator, AuthError, parse_tokens, peer_principal
from proxyprefill.service.client import packed_int32
from proxyprefill.service.leases import HANDLE_PATTERN, LeaseError, LeaseTable, new_handle
from proxyprefill.service.validation import Limits, RequestError, validate_prefill

TOKEN_A = "alice-token-0123456789"
TOKEN_B = "bob-token-0123456789ab"


# configuration -------------------------------------------------------------------------------
def test_config_layers_flags_over_environment_over_file(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text(
        '[server]\nmax_pending_tokens = 1000\ndefault_lease_seconds = 20\nlisten = "0.0.0.0:7000"\n'
    )
    parser = config_mod.argparse.ArgumentParser()
    config_mod.add_flags(parser)
    args = parser.parse_args(["--config", str(path), "--default-lease-seconds", "30"])
    environ = {"PROXYPREFILL_MAX_PENDING_TOKENS": "2000", "PROXYPREFILL_DEFAULT_LEASE_SECONDS": "25"}
    config = config_mod.load(args, environ=environ)
    assert config.listen == "0.0.0.0:7000"  # file
    assert config.max_pending_tokens == 2000  # environment over file
    assert config.default_lease_seconds == 30  # flag over both


def test_config_json_file_and_errors_name_the_field(tmp_path):
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"gamma": 0.9}))
    assert config_mod.load(environ={"PROXYPREFILL_CONFIG": str(path)}).gamma == 0.9
    path.write_text(json.dumps({"no_such_field": 1}))
    with pytest.raises(config_mod.ConfigError, match="no_such_field"):
        config_mod.load(environ={"PROXYPREFILL_CONFIG": str(path)})
    with pytest.raises(config_mod.ConfigError, match="max_pending_tokens"):
        config_mod.load(environ={"PROXYPREFILL_MAX_PENDING_TOKENS": "lots"})
    with pytest.raises(config_mod.ConfigError, match="gamma"):
        config_mod.load(environ={}, gamma=0.2)
    with pytest.raises(config_mod.ConfigError, match="tls_key"):
        config_mod.load(environ={}, tls_cert=str(path))


# auth ----------------------------------------------------------------------------------------
def test_parse_tokens_file_and_environment_forms():
    assert parse_tokens(f"# comment\nalice {TOKEN_A}\n\nbob {TOKEN_B}\n") == {
        TOKEN_A: "alice",
        TOKEN_B: "bob",
    }
    assert parse_tokens(f"alice={TOKEN_A},bob={TOKEN_B}", separator=",") == {TOKEN_A: "alice", TOKEN_B: "bob"}
    with pytest.raises(ValueError, match="shorter"):
        parse_tokens("alice short")
    with pytest.raises(ValueError, match="also the token"):
        parse_tokens(f"alice {TOKEN_A}\nbob {TOKEN_A}")


def test_authenticator_codes():
    auth = Authenticator({TOKEN_A: "alice"})
    assert auth.identify([("authorization", f"Bearer {TOKEN_A}")], "ipv4:1.2.3.4:5").name == "alice"
    for metadata, message in [
        ([], "missing"),
        ([("authorization", f"Basic {TOKEN_A}")], "Bearer"),
        ([("authorization", "Bearer not-a-known-token-at-all")], "unknown"),
    ]:
        with pytest.raises(AuthError, match=message) as caught:
            auth.identify(metadata, "ipv4:1.2.3.4:5")
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    anonymous = Authenticator().identify([], "ipv4:10.0.0.7:4242")
    assert anonymous.name == "ipv4:10.0.0.7" and not anonymous.authenticated


def test_peer_principal_drops_the_port():
    assert peer_principal("ipv4:127.0.0.1:5123") == "ipv4:127.0.0.1"
    assert peer_principal("ipv6:%5B::1%5D:5123") == "ipv6:%5B::1%5D"
    assert peer_principal("unix:/tmp/sock") == "unix:/tmp/sock"


# leases --------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _lease(table, owner="alice", nbytes=100, seconds=10):
    reservation = table.reserve(nbytes)
    return table.commit(
        reservation, new_handle(), owner, "worker-0", nbytes, 7, seconds, header={"num_layers": 1}
    )


def test_handles_are_128_bit_hex_and_distinct():
    handles = {new_handle() for _ in range(1000)}
    assert len(handles) == 1000 and all(HANDLE_PATTERN.fullmatch(h) for h in handles)


def test_lease_lifecycle_codes():
    clock = Clock()
    table = LeaseTable(cap_bytes=1000, default_seconds=10, max_seconds=60, clock=clock)
    lease = _lease(table)
    assert table.get(lease.handle, "alice") is lease
    with pytest.raises(LeaseError) as caught:
        table.get(lease.handle, "bob")
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(LeaseError) as caught:
        table.get("zz" * 16, "alice")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(LeaseError) as caught:
        table.get(new_handle(), "alice")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND

    clock.now += 5
    assert table.renew(lease.handle, "alice", 30).expires_at == clock.now + 30
    with pytest.raises(LeaseError) as caught:
        table.renew(lease.handle, "alice", 61)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT

    clock.now += 31
    with pytest.raises(LeaseError) as caught:
        table.get(lease.handle, "alice")
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert [x.handle for x in table.pop_expired()] == [lease.handle]  # the sweeper still frees it
    assert table.held_bytes == 0

    other = _lease(table)
    table.release(other.handle, "alice")
    with pytest.raises(LeaseError) as caught:
        table.get(other.handle, "alice")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and "released" in caught.value.message

    lost = _lease(table)
    assert table.lose(lost.handle) is lost and table.held_bytes == 0
    with pytest.raises(LeaseError) as caught:
        table.get(lost.handle, "alice")
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION and "lost" in caught.value.message


def test_memory_cap_counts_held_and_reserved_bytes():
    table = LeaseTable(cap_bytes=1000, default_seconds=10, max_seconds=60)
    held = _lease(table, nbytes=600)
    pending = table.reserve(300)
    with pytest.raises(LeaseError) as caught:
        table.reserve(200)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    table.cancel(pending)
    table.cancel(pending)  # idempotent
    assert table.reserved_bytes == 0
    table.reserve(400)
    table.release(held.handle, "alice")
    assert table.held_bytes == 0


# admission -----------------------------------------------------------------------------------
def test_admission_routes_by_pending_tokens_and_refuses_beyond_the_limit():
    async def scenario():
        admission = Admission(num_workers=2, max_pending_tokens=1000, slots_per_worker=1)
        big = admission.admit(600)
        small = admission.admit(100)
        assert (big.worker, small.worker) == (0, 1)
        third = admission.admit(200)
        assert third.worker == 1 and third.queue_position == 1  # behind `small` on worker 1
        with pytest.raises(AdmissionError) as caught:
            admission.admit(101)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert admission.queue_depth == 3

        order = []

        async def run(ticket, name):
            async with admission.turn(ticket):
                order.append(name)
                await asyncio.sleep(0.01)

        await asyncio.gather(run(small, "small"), run(third, "third"), run(big, "big"))
        assert order.index("small") < order.index("third")
        assert admission.pending_tokens == 0 and admission.queue_depth == 0 and admission.running == 0

        # a ticket cancelled while it waits returns its tokens
        holder, waiter = admission.admit(10), admission.admit(10)
        waiter_2 = admission.admit(10)
        assert waiter_2.worker == holder.worker

        async def hold():
            async with admission.turn(holder):
                await asyncio.sleep(0.2)

        task_hold = asyncio.create_task(hold())
        await asyncio.sleep(0.01)
        task_wait = asyncio.create_task(run(waiter_2, "never"))
        await asyncio.sleep(0.01)
        task_wait.cancel()
        await asyncio.gather(task_wait, return_exceptions=True)
        admission.finish(waiter)  # never ran at all
        await task_hold
        assert admission.pending_tokens == 0 and admission.queue_depth == 0
        admission.close()
        with pytest.raises(AdmissionError) as caught:
            admission.admit(1)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


# validation ----------------------------------------------------------------------------------
LIMITS = Limits.from_config(
    config_mod.ServerConfig(max_prompt_tokens=1000, max_logit_positions=8, min_budget_tokens=256),
    type("Info", (), {"vocab_size": 100, "max_position_embeddings": 4096})(),
)


def _request(**fields):
    request = pb.PrefillRequest(**fields)
    if "text" not in fields and "tokens" not in fields:
        request.tokens.ids.extend([1, 2, 3, 4, 5])
    return request


class WordPrompts:
    """Stands in for a PromptEncoder without a chat template: text tokenises to `ids_for(text)`."""

    has_chat_template = False

    def __init__(self, ids_for):
        self.ids_for = ids_for

    def encode_text(self, text, add_special_tokens):
        return self.ids_for(text)


def _error(request, prompts=None):
    with pytest.raises(RequestError) as caught:
        validate_prefill(request, LIMITS, prompts)
    return caught.value


def test_validation_defaults():
    plan = validate_prefill(_request(), LIMITS, None)
    assert plan.kv_return == "handle" and plan.logits == "none" and plan.chunk_size == 8192
    assert plan.attention == "proxy" and plan.proxy_config.min_budget_tokens == 256
    assert plan.token_ids.dtype == np.int64 and plan.num_tokens == 5 and len(plan.request_id) == 32


def test_packed_token_ids_read_as_the_repeated_ones():
    ids = [0, 1, 7, 99, 42]
    packed = validate_prefill(
        pb.PrefillRequest(tokens=pb.TokenIds(packed_int32=packed_int32(ids))), LIMITS, None
    )
    repeated = validate_prefill(pb.PrefillRequest(tokens=pb.TokenIds(ids=ids)), LIMITS, None)
    assert (
        packed.token_ids.dtype == np.int64 and packed.token_ids.tolist() == repeated.token_ids.tolist() == ids
    )


@pytest.mark.parametrize(
    "token_ids", [[3, 1, 2], (3, 1, 2), np.array([3, 1, 2], np.int64), np.array([[3, 1, 2]])]
)
def test_the_client_packs_lists_arrays_and_tensors_alike(token_ids):
    import torch

    assert np.frombuffer(packed_int32(token_ids), "<i4").tolist() == [3, 1, 2]
    assert packed_int32(torch.tensor([3, 1, 2])) == packed_int32(token_ids)


@pytest.mark.parametrize("token_ids", [[1, 2.5], [1, "2"], [2**31], np.array([1.0, 2.0]), np.array([2**40])])
def test_the_client_refuses_ids_it_cannot_pack(token_ids):
    with pytest.raises(ValueError, match="token_ids"):
        packed_int32(token_ids)


def test_validation_text_uses_the_tokenizer():
    plan = validate_prefill(
        pb.PrefillRequest(text="a b c"), LIMITS, WordPrompts(lambda text: [7] * len(text.split()))
    )
    assert plan.token_ids.tolist() == [7, 7, 7] and plan.from_text


@pytest.mark.parametrize(
    "request_fields, code, field",
    [
        ({"request_id": "bad id!"}, "INVALID_ARGUMENT", "request_id"),
        ({"tokens": pb.TokenIds(ids=[])}, "INVALID_ARGUMENT", "tokens.ids"),
        ({"tokens": pb.TokenIds(ids=[1, 100])}, "INVALID_ARGUMENT", "tokens.ids[1]"),
        ({"tokens": pb.TokenIds(ids=[-1])}, "INVALID_ARGUMENT", "tokens.ids[0]"),
        ({"tokens": pb.TokenIds(ids=[1] * 1001)}, "OUT_OF_RANGE", "tokens.ids"),
        ({"tokens": pb.TokenIds(packed_int32=b"\x01\x00\x00")}, "INVALID_ARGUMENT", "tokens.packed_int32"),
        (
            {"tokens": pb.TokenIds(packed_int32=np.int32([1, 100]).tobytes())},
            "INVALID_ARGUMENT",
            "tokens.packed_int32[1]",
        ),
        (
            {"tokens": pb.TokenIds(packed_int32=np.int32([3, -1]).tobytes())},
            "INVALID_ARGUMENT",
            "tokens.packed_int32[1]",
        ),
        (
            {"tokens": pb.TokenIds(ids=[1], packed_int32=np.int32([1]).tobytes())},
            "INVALID_ARGUMENT",
            "tokens.ids and",
        ),
        (
            {"tokens": pb.TokenIds(packed_int32=np.int32([1] * 1001).tobytes())},
            "OUT_OF_RANGE",
            "tokens.packed_int32",
        ),
        ({"text": ""}, "INVALID_ARGUMENT", "input"),
        ({"chunk_size": 100}, "INVALID_ARGUMENT", "chunk_size"),
        ({"chunk_size": 200}, "INVALID_ARGUMENT", "chunk_size"),
        ({"returns": pb.ReturnOptions(kv=17)}, "INVALID_ARGUMENT", "returns.kv"),
        (
            {"returns": pb.ReturnOptions(logits=pb.LOGITS_RETURN_POSITIONS)},
            "INVALID_ARGUMENT",
            "returns.logit",
        ),
        (
            {"returns": pb.ReturnOptions(logits=pb.LOGITS_RETURN_POSITIONS, logit_positions=[5])},
            "INVALID_ARGUMENT",
            "returns.logit_positions[0]",
        ),
        ({"returns": pb.ReturnOptions(logit_positions=[1])}, "INVALID_ARGUMENT", "returns.logit_positions"),
        ({"returns": pb.ReturnOptions(lease_seconds=10**6)}, "INVALID_ARGUMENT", "returns.lease_seconds"),
        (
            {"returns": pb.ReturnOptions(include_token_ids=True)},
            "INVALID_ARGUMENT",
            "returns.include_token_ids",
        ),
        ({"attention": pb.ProxyAttnSettings(mode=9)}, "INVALID_ARGUMENT", "attention.mode"),
        ({"attention": pb.ProxyAttnSettings(gamma=0.1)}, "INVALID_ARGUMENT", "attention.gamma"),
        ({"attention": pb.ProxyAttnSettings(gamma=float("nan"))}, "INVALID_ARGUMENT", "attention.gamma"),
        (
            {"attention": pb.ProxyAttnSettings(min_budget_tokens=1)},
            "INVALID_ARGUMENT",
            "attention.min_budget",
        ),
        ({"attention": pb.ProxyAttnSettings(stride=3)}, "INVALID_ARGUMENT", "attention.stride"),
        ({"attention": pb.ProxyAttnSettings(budget="lots")}, "INVALID_ARGUMENT", "attention.budget"),
        ({"attention": pb.ProxyAttnSettings(alpha=1e9)}, "INVALID_ARGUMENT", "attention.alpha"),
        ({"attention": pb.ProxyAttnSettings(exponent=2.0)}, "INVALID_ARGUMENT", "attention.exponent"),
    ],
)
def test_validation_errors_name_the_field(request_fields, code, field):
    request = pb.PrefillRequest(**request_fields)
    if "tokens" not in request_fields and "text" not in request_fields:
        request.tokens.ids.extend([1, 2, 3])
    if request_fields == {"text": ""}:
        request = pb.PrefillRequest()
    error = _error(request, prompts=WordPrompts(lambda text: [1]))
    assert error.code.name == code
    assert error.message.startswith(field), error.message


def test_validation_logits_limits():
    all_logits = pb.ReturnOptions(logits=pb.LOGITS_RETURN_ALL)
    assert validate_prefill(_request(returns=all_logits), LIMITS, None).logits == "all"
    long = pb.PrefillRequest(tokens=pb.TokenIds(ids=[1] * 9), returns=all_logits)
    assert _error(long).code == grpc.StatusCode.OUT_OF_RANGE
    empty_text = pb.PrefillRequest(text="x")
    assert _error(empty_text, prompts=WordPrompts(lambda text: [])).message.startswith("text")
    too_long_text = pb.PrefillRequest(text="x")
    assert (
        _error(too_long_text, prompts=WordPrompts(lambda text: [1] * 1001)).code
        == grpc.StatusCode.OUT_OF_RANGE
    )


# text and chat input -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_prompts():
    from _support import tiny_chat_tokenizer

    from proxyprefill.workers.prompts import PromptEncoder

    return PromptEncoder(tiny_chat_tokenizer())


def _chat_request(*turns, add_generation_prompt=True, **fields):
    chat = pb.Chat(
        messages=[pb.ChatMessage(role=role, content=content) for role, content in turns],
        add_generation_prompt=add_generation_prompt,
    )
    return pb.PrefillRequest(chat=chat, **fields)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_input_is_tokenised_by_the_models_chat_template(chat_prompts, add_generation_prompt):
    turns = [("system", "w3"), ("user", "w1 w2")]
    request = _chat_request(*turns, add_generation_prompt=add_generation_prompt)
    plan = validate_prefill(request, LIMITS, chat_prompts)
    expected = chat_prompts.tokenizer.apply_chat_template(
        [{"role": role, "content": content} for role, content in turns],
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
        return_dict=False,
    )
    assert plan.token_ids.tolist() == list(expected) and plan.from_text


def test_text_input_adds_special_tokens_as_asked(chat_prompts):
    plain = validate_prefill(pb.PrefillRequest(text="w1 w2"), LIMITS, chat_prompts).token_ids.tolist()
    special = pb.PrefillRequest(text="w1 w2", add_special_tokens=True)
    assert validate_prefill(special, LIMITS, chat_prompts).token_ids.tolist() == [1, *plain]


@pytest.mark.parametrize(
    "request_, code, field",
    [
        (_chat_request(), "INVALID_ARGUMENT", "chat.messages is empty"),
        (_chat_request(("user", "w1"), ("robot", "w2")), "INVALID_ARGUMENT", "chat.messages[1].role"),
        (_chat_request(("assistant", "w1")), "INVALID_ARGUMENT", "chat.messages were refused"),
        (_chat_request(("user", "w1"), add_special_tokens=True), "INVALID_ARGUMENT", "add_special_tokens"),
        (_chat_request(("user", "x" * (LIMITS.max_text_bytes + 1))), "OUT_OF_RANGE", "chat.messages"),
    ],
)
def test_chat_errors_name_the_field(chat_prompts, request_, code, field):
    error = _error(request_, prompts=chat_prompts)
    assert error.code.name == code
    assert error.message.startswith(field), error.message


def test_chat_without_a_tokenizer_or_a_template_is_a_failed_precondition():
    request = _chat_request(("user", "w1"))
    no_tokenizer = _error(request, prompts=None)
    no_template = _error(request, prompts=WordPrompts(lambda text: [1]))
    for error in (no_tokenizer, no_template):
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.message.startswith("chat")
    assert "chat template" in no_template.message


def test_client_builds_chat_requests():
    from proxyprefill.service.client import PrefillClient
    from proxyprefill.workers.prompts import ChatMessage

    messages = [ChatMessage("system", "be brief"), ChatMessage("user", "hello")]
    request = PrefillClient.request(messages=messages, add_generation_prompt=False)
    assert request.WhichOneof("input") == "chat" and not request.chat.add_generation_prompt
    assert [(m.role, m.content) for m in request.chat.messages] == [("system", "be brief"), ("user", "hello")]
    assert PrefillClient.request(messages=[]).WhichOneof("input") == "chat"  # the server names the error
    with pytest.raises(ValueError, match="exactly one"):
        PrefillClient.request(text="hello", messages=messages)


def _prompt_args(**flags):
    import argparse

    values = dict(file=None, text=None, messages=None, chat=False)
    values.update(add_special_tokens=False, no_generation_prompt=False)
    values.update(flags)
    return argparse.Namespace(**values)


def test_cli_prompt_flags(tmp_path):
    from proxyprefill.cli import PromptArgumentError, prompt_from_args
    from proxyprefill.workers.prompts import ChatMessage

    assert prompt_from_args(_prompt_args(text="hi", add_special_tokens=True)) == {
        "text": "hi",
        "add_special_tokens": True,
    }
    assert prompt_from_args(_prompt_args(text="hi", chat=True, no_generation_prompt=True)) == {
        "messages": [ChatMessage("user", "hi")],
        "add_generation_prompt": False,
    }
    conversation = tmp_path / "chat.json"
    conversation.write_text(
        json.dumps([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    )
    assert prompt_from_args(_prompt_args(messages=str(conversation)))["messages"] == [
        ChatMessage("system", "s"),
        ChatMessage("user", "u"),
    ]
    conversation.write_text(json.dumps([{"role": "user"}]))
    for flags, flag in [
        ({"messages": str(conversation)}, "--messages"),
        ({"text": "hi", "chat": True, "add_special_tokens": True}, "--add-special-tokens"),
        ({"text": "hi", "no_generation_prompt": True}, "--no-generation-prompt"),
        ({"text": "hi", "messages": str(conversation)}, "--messages"),
    ]:
        with pytest.raises(PromptArgumentError) as caught:
            prompt_from_args(_prompt_args(**flags))
        assert str(caught.value).startswith(flag), caught.value


# logits on the wire ----------------------------------------------------------------------------
def _finished_result(logits, dtype: str):
    """What PrefillDone.from_result reads of an engine's PrefillResult."""
    from types import SimpleNamespace

    import torch

    header = SimpleNamespace(dtype=dtype)  # only the dtype matters to the logits
    return SimpleNamespace(logits=logits, header=header, token_ids=torch.arange(4))


@pytest.mark.parametrize(
    "model_dtype, exact, sent_as",
    [("bfloat16", True, "bfloat16"), ("bfloat16", False, "float32"), ("float32", True, "float32")],
)
def test_logits_travel_in_the_models_dtype_only_when_that_is_exact(model_dtype, exact, sent_as):
    import torch

    from proxyprefill.service.client import logits_from_message
    from proxyprefill.service.replies import logit_pieces
    from proxyprefill.workers.protocol import narrowest_logits

    torch.manual_seed(0)
    logits = torch.randn(3, 1000).to(torch.bfloat16).float()  # what a bf16 LM head widened makes
    if not exact:
        logits[1, 7] += 1e-4  # not a bfloat16 value: narrowing would change it
    raw, dtype = narrowest_logits(_finished_result(logits, model_dtype))
    assert dtype == sent_as and raw.nbytes == logits.numel() * (2 if sent_as == "bfloat16" else 4)

    done = _worker_answer(raw, dtype, positions=[0, 1, 2])
    pieces = list(logit_pieces(done, max_bytes=2 * raw.itemsize * 1000))  # two rows a piece
    assert [list(p.positions) for p in pieces] == [[0, 1], [2]] and {p.dtype for p in pieces} == {sent_as}
    received = torch.from_numpy(np.concatenate([logits_from_message(p) for p in pieces]))
    assert torch.equal(received, logits)  # exact, whichever dtype it came in


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_exact_narrowing_agrees_with_torch(dtype):
    import torch

    from proxyprefill.workers.kv_wire import NUMPY_DTYPES, exact_narrowing, widened

    torch.manual_seed(0)
    narrow = getattr(torch, dtype)
    values = torch.randn(5000).to(narrow)
    values[:3] = torch.tensor([0.0, -0.0, float("inf")], dtype=narrow)
    raw = exact_narrowing(values.float().numpy(), dtype)
    as_torch = values.view(torch.int16) if dtype == "bfloat16" else values
    assert raw.dtype == np.dtype(NUMPY_DTYPES[dtype]) and np.array_equal(raw, as_torch.numpy())
    assert torch.equal(torch.from_numpy(widened(raw, dtype)), values.float())
    off_grid = values.float()
    off_grid[100] += 1e-3 * abs(float(off_grid[100])) + 1e-6
    assert exact_narrowing(off_grid.numpy(), dtype) is None


def _worker_answer(logits, logits_dtype, positions):
    """What replies.logit_pieces reads of a PrefillDone."""
    from types import SimpleNamespace

    return SimpleNamespace(logits=logits, logits_dtype=logits_dtype, logit_positions=positions)


def test_malloc_thresholds_are_set_unless_the_environment_sets_them(monkeypatch):
    import platform

    from proxyprefill.workers.heap import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert keep_freed_memory() is False  # the operator's choice stands
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
