"""Prompt tokenisation (workers/prompts.py) on a small Llama-shaped tokenizer built here: BOS only
when asked for on plain text, and chat ids exactly as the tokenizer's own apply_chat_template."""

import pytest
from _support import tiny_chat_tokenizer

from proxyprefill.workers.prompts import ChatMessage, PromptEncoder, PromptError

pytest.importorskip("transformers")

BOS = 1
CONVERSATIONS = [
    [ChatMessage("user", "w1 w2")],
    [ChatMessage("system", "w3"), ChatMessage("user", "w1 w2 w9")],
    [ChatMessage("user", "w1"), ChatMessage("assistant", "w4 w5"), ChatMessage("user", "w6")],
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


def test_plain_text_gets_special_tokens_only_when_asked(tokenizer):
    prompts = PromptEncoder(tokenizer)
    without = prompts.encode_text("w1 w2 w3", add_special_tokens=False)
    assert without == tokenizer.convert_tokens_to_ids(["w1", "w2", "w3"])
    assert prompts.encode_text("w1 w2 w3", add_special_tokens=True) == [BOS, *without]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_ids_are_the_tokenizers_own_and_hold_one_bos(tokenizer, conversation, add_generation_prompt):
    ids = PromptEncoder(tokenizer).encode_chat(conversation, add_generation_prompt)
    expected = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation],
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
        return_dict=False,
    )
    assert ids == list(expected)
    assert ids[0] == BOS and ids.count(BOS) == 1  # the template's BOS, nothing added on top
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert (ids[-1] == assistant) == add_generation_prompt


@pytest.mark.parametrize(
    "messages, field",
    [
        ([], "messages"),
        ([ChatMessage("user", "w1"), ChatMessage("robot", "w2")], "messages[1].role"),
        ([ChatMessage("user", 7)], "messages[0].content"),
        ([ChatMessage("assistant", "w1")], "messages"),  # the template itself refuses it
    ],
)
def test_chat_errors_name_the_field(tokenizer, messages, field):
    with pytest.raises(PromptError) as caught:
        PromptEncoder(tokenizer).encode_chat(messages, add_generation_prompt=True)
    assert caught.value.field == field
    assert str(caught.value).startswith(field + " ")


def test_a_tokenizer_without_a_chat_template_refuses_chat():
    prompts = PromptEncoder(tiny_chat_tokenizer(chat_template=None))
    assert not prompts.has_chat_template
    with pytest.raises(PromptError, match="no chat template"):
        prompts.encode_chat([ChatMessage("user", "w1")], add_generation_prompt=True)


@pytest.mark.slow
def test_smollm2_chat_template_and_special_tokens():
    """The embedded default: its tokenizer has a chat template (ChatML, `<|im_start|>` = its BOS
    token), and add_special_tokens changes nothing on plain text."""
    from proxyprefill.workers.model import load_tokenizer

    tokenizer = load_tokenizer(None)
    prompts = PromptEncoder(tokenizer)
    assert prompts.has_chat_template
    text = "The lighthouse keeper climbed the stairs."
    assert prompts.encode_text(text, True) == prompts.encode_text(text, False)
    conversation = [ChatMessage("user", text)]
    ids = prompts.encode_chat(conversation, add_generation_prompt=True)
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert ids == list(expected)
    assert ids[0] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
