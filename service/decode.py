"""Reference decode side: pull a prefilled KV cache by handle and continue generation.

    model, tokenizer = load_decoder(None)                   # the embedded SmolLM2, stock attention
    transfer = client.fetch_kv(handle)
    new_ids = greedy_continue(model, transfer, max_new_tokens=32)

This is the end-to-end proof that the KV is right: in dense mode the tokens equal
`model.generate(full_prompt, do_sample=False)`. The decoder holds the KV of all prompt tokens but
the last one (the transfer is cropped by one), feeds the last token (carried in the header as
`last_token_id`) at its position, and takes each next token as the argmax of the logits. So the
prompt's token ids are not needed, only its KV; when they are present their hash is checked.
"""

from __future__ import annotations

import torch

from proxyprefill.workers.kv_wire import token_sha256


class DecodeError(ValueError):
    pass


def load_decoder(path: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) with transformers' stock attention (the decode side knows nothing of
    ProxyAttn: the KV it receives is dense)."""
    from proxyprefill.workers.model import load_model

    model, tokenizer, info = load_model(path, "sdpa", torch.device(device), getattr(torch, dtype))
    model.proxyprefill_info = info
    return model, tokenizer


def check_transfer(transfer, model_info) -> None:
    """Refuses KV from another model (KVMismatchError naming the field) or KV whose token ids
    contradict their hash."""
    header = transfer.kv_header()
    header.check_compatible(model_info)
    if transfer.token_ids is not None:
        if token_sha256(transfer.token_ids) != header.token_sha256:
            raise DecodeError("token ids do not match the KV header's token_sha256")
    if len(transfer.keys) != header.num_layers:
        raise DecodeError(f"transfer has {len(transfer.keys)} layers, the header says {header.num_layers}")


def rebuild_cache(transfer, drop_last: int = 0, device: str | torch.device = "cpu"):
    """A transformers DynamicCache of the transfer's KV ([1, Hkv, N - drop_last, d] per layer)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    keep = int(transfer.header.num_tokens) - drop_last
    for layer, (keys, values) in enumerate(zip(transfer.keys, transfer.values, strict=True)):
        cache.update(
            keys[None, :, :keep].to(device).clone(), values[None, :, :keep].to(device).clone(), layer
        )
    return cache


def rebuild_paged_cache(
    transfer,
    drop_last: int = 0,
    device: str | torch.device = "cpu",
    page_size: int = 16,
    room_tokens: int = 0,
):
    """A PagedDecodeCache holding the transfer's KV in blocks of `page_size` tokens, with free
    blocks for `room_tokens` more; the blocks are placed in reverse order so that decoding
    depends on the block table, not on the order."""
    from .paged_kv import PagedDecodeCache, PagedKV, blocks_needed

    keep = int(transfer.header.num_tokens) - drop_last
    needed = blocks_needed(keep, page_size)
    spare = blocks_needed(room_tokens, page_size) + 1  # the decode steps' new blocks
    table = torch.arange(needed + spare - 1, spare - 1, -1, dtype=torch.int32)
    pages = PagedKV.from_layers(
        [k[:, :keep].to(device) for k in transfer.keys],
        [v[:, :keep].to(device) for v in transfer.values],
        block_size=page_size,
        num_blocks=needed + spare,
        block_table=table,
    )
    return PagedDecodeCache(pages)


@torch.no_grad()
def greedy_continue(
    model,
    transfer,
    max_new_tokens: int,
    eos_token_ids: list[int] | None = None,
    layout: str = "contiguous",
    page_size: int = 16,
) -> list[int]:
    """Greedy continuation of the prompt whose KV `transfer` holds; returns the new token ids.
    `layout="paged"` decodes from a paged copy of the KV (blocks of `page_size` tokens)."""
    info = getattr(model, "proxyprefill_info", None)
    if info is not None:
        check_transfer(transfer, info)
    num_tokens = int(transfer.header.num_tokens)
    device = next(model.parameters()).device
    if layout == "paged":
        cache = rebuild_paged_cache(
            transfer, drop_last=1, device=device, page_size=page_size, room_tokens=max_new_tokens
        )
    elif layout == "contiguous":
        cache = rebuild_cache(transfer, drop_last=1, device=device)
    else:
        raise DecodeError(f"layout: expected 'contiguous' or 'paged', got {layout!r}")
    if eos_token_ids is None:
        eos = model.generation_config.eos_token_id
        eos_token_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    position = num_tokens - 1
    next_input = torch.tensor([[transfer.header.last_token_id]], device=device)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        output = model(
            input_ids=next_input,
            past_key_values=cache,
            use_cache=True,
            position_ids=torch.tensor([[position]], device=device),
            cache_position=torch.tensor([position], device=device),
        )
        token = int(output.logits[0, -1].argmax())
        generated.append(token)
        if token in eos_token_ids:
            break
        next_input = torch.tensor([[token]], device=device)
        position += 1
    return generated


def decode_handle(
    client,
    handle: str,
    model,
    tokenizer=None,
    max_new_tokens: int = 32,
    layout: str = "contiguous",
    page_size: int = 16,
) -> tuple[list[int], str]:
    """Fetches the KV of `handle` from the prefill service and continues greedily."""
    transfer = client.fetch_kv(handle, include_token_ids=True)
    tokens = greedy_continue(model, transfer, max_new_tokens, layout=layout, page_size=page_size)
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else ""
    return tokens, text
