"""Small shared pieces of the tests (imported as `_support`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import time


def save_tiny_llama(path, num_layers: int, max_position_embeddings: int = 4096, seed: int = 0):
    """A random fp32 Llama (hidden 64, 4 query / 2 KV heads, vocab 256) saved to `path`, so that
    every worker or stage loads the same weights. Returns the model."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        num_hidden_layers=num_layers,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=max_position_embeddings,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


@contextlib.contextmanager
def one_worker_service(path, ray_resources: dict, **config_fields):
    """A loopback server over one Ray worker loading the model at `path`, with Ray started here
    with `ray_resources` (num_cpus, num_gpus) and stopped after."""
    import ray

    from proxyprefill.service import config as config_mod
    from proxyprefill.service.local import LocalService
    from proxyprefill.workers.ray_pool import WorkerPool

    config = config_mod.load(
        environ={}, listen="127.0.0.1:0", model=str(path), num_workers=1, **config_fields
    )
    ray.init(include_dashboard=False, log_to_driver=False, **ray_resources)
    pool = WorkerPool.start(config.engine_kwargs(), num_workers=1)
    service = LocalService(config, pool=pool).start()
    try:
        yield service
    finally:
        service.stop()
        pool.shutdown()
        ray.shutdown()


def wait_for(predicate, seconds: float = 20.0) -> bool:
    """Polls `predicate` until it holds (True) or `seconds` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


TINY_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('the conversation must not start with the assistant') }}{% endif %}"
    "{{ bos_token }} {% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_chat_tokenizer(path=None, chat_template: str | None = TINY_CHAT_TEMPLATE):
    """A word-level tokenizer of 256 ids shaped like Llama's: `tokenizer(text)` puts BOS (<s>, id
    1) in front, and the chat template writes BOS itself. Words are "w0" ... "w248" (ids 7...);
    anything else is <unk> (0). Saved to `path` when given; returns the tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = [f"w{i}" for i in range(256 - len(specials))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    if path is not None:
        tokenizer.save_pretrained(path)
    return tokenizer
