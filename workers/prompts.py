"""How a prompt given as text becomes token ids: the one place the service and the batch job do it.

The KV is only useful to a decode side that would have produced the same token ids, so text is
tokenised the way that side tokenises it:

- plain text: `tokenizer(text, add_special_tokens=...)`. `add_special_tokens` adds what the
  tokenizer's post-processor puts around a sequence: for Llama and Mistral tokenizers the BOS
  token, for Qwen2/3 and SmolLM2 nothing (SmolLM2's ids are the same either way). A decode side
  that tokenises the prompt with its tokenizer's default (`tokenizer(text)`) adds them.
- a conversation: the tokenizer's own `apply_chat_template(messages, tokenize=True,
  add_generation_prompt=...)`, as chat decode sides do. The template writes every special token
  (BOS included, where the model has one), so nothing is added on top: adding special tokens
  to templated text would put a second BOS in front of Llama prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation, as chat templates take it."""

    role: str  # one of CHAT_ROLES
    content: str


class PromptError(ValueError):
    """A prompt that cannot be tokenised; `field` names the input at fault ("messages",
    "messages[2].role"), relative to the conversation or text it was given as."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field} {detail}")
        self.field = field
        self.detail = detail


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """Raises PromptError naming the first bad message: none at all, a role chat templates do not
    know, content that is not a string."""
    if not messages:
        raise PromptError("messages", "is empty: a conversation needs at least one message")
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise PromptError(
                f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {message.role[:40]!r}"
            )
        if not isinstance(message.content, str):
            raise PromptError(
                f"messages[{i}].content", f"must be a string, got {type(message.content).__name__}"
            )


class PromptEncoder:
    """A model's Hugging Face tokenizer, used the way a decode side uses it (see the module
    docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_text(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_chat(self, messages: Sequence[ChatMessage], add_generation_prompt: bool) -> list[int]:
        """The conversation formatted by the model's chat template and tokenised, exactly as the
        tokenizer's apply_chat_template gives it."""
        from jinja2 import TemplateError

        check_messages(messages)
        if not self.has_chat_template:
            raise PromptError("messages", "cannot be formatted: the model's tokenizer has no chat template")
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        try:
            ids = self.tokenizer.apply_chat_template(
                conversation,
                tokenize=True,
                add_generation_prompt=add_generation_prompt,
                return_dict=False,
            )
        except TemplateError as error:  # templates raise on what they refuse (role order, ...)
            raise PromptError("messages", f"were refused by the model's chat template: {error}") from None
        return [int(i) for i in ids]
