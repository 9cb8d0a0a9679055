"""Exact dense causal attention for a chunk at a query offset, fast on CUDA.

Dense causal attention with an offset: PyTorch SDPA's `is_causal` aligns the causal triangle to
the top-left, which is wrong when Nq < Nk. On CUDA we split the chunk's keys into the prefix
[0, q_offset) (seen in full by every query: no mask) and the chunk's own keys [q_offset, Nk)
(a square, causal top-left = correct), run each with cuDNN attention returning the log-sum-exp,
and merge the two softmaxes exactly:
    out = (o1 * exp(l1 - m) + o2 * exp(l2 - m)) / (exp(l1 - m) + exp(l2 - m)),  m = max(l1, l2).
For the prefix part the query heads of a KV head are stacked along the sequence axis
(their rows are independent when nothing is masked), so GQA needs no copy of K/V. On the CPU
the explicit boolean mask is small at the lengths the CPU can handle.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Which implementation the last dense CUDA call used ("cudnn", "flash", "masked-sdpa"), so that
# benchmarks can report what actually ran.
dense_path_used: dict[str, str] = {}


def _lse_attention_cuda(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse float32 [B, H, Nq]) for equal head counts; cuDNN first, then flash."""
    try:
        result = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        dense_path_used["kernel"] = "cudnn"
    except (RuntimeError, AttributeError, NotImplementedError):
        result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        dense_path_used["kernel"] = "flash"
    out, lse = result[0], result[1]
    return out, lse.reshape(q.shape[:3]).float()


def _dense_cuda(q, k, v, q_offset: int, scale: float) -> torch.Tensor:
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    # the chunk's own keys: a square, where top-left causal alignment is right
    k_own = k[:, :, q_offset:].repeat_interleave(rep, dim=1) if rep > 1 else k[:, :, q_offset:]
    v_own = v[:, :, q_offset:].repeat_interleave(rep, dim=1) if rep > 1 else v[:, :, q_offset:]
    out_own, lse_own = _lse_attention_cuda(q, k_own, v_own, True, scale)
    if q_offset == 0:
        return out_own
    # the prefix: every query sees all of it; stack each KV head's query heads along the rows
    q_stacked = q.reshape(b, hkv, rep * nq, d)
    out_pre, lse_pre = _lse_attention_cuda(
        q_stacked, k[:, :, :q_offset].contiguous(), v[:, :, :q_offset].contiguous(), False, scale
    )
    out_pre = out_pre.reshape(b, hq, nq, d)
    # share of the prefix in the merged softmax: e^l1 / (e^l1 + e^l2) = sigmoid(l1 - l2)
    prefix_share = torch.sigmoid(lse_pre.reshape(b, hq, nq) - lse_own).unsqueeze(-1)
    # merge in float32 a few heads at a time, so the float32 temporaries stay small at 32k chunks
    heads_per_step = max(1, hq // 4)
    for h0 in range(0, hq, heads_per_step):
        heads = slice(h0, h0 + heads_per_step)
        merged = torch.lerp(out_own[:, heads].float(), out_pre[:, heads].float(), prefix_share[:, heads])
        out_own[:, heads] = merged.to(q.dtype)
    return out_own


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float | None = None
) -> torch.Tensor:
    """Exact causal attention of a chunk: query i (absolute q_offset + i) sees keys 0..q_offset+i.

    q [B, Hq, Nq, d], k/v [B, Hkv, q_offset + Nq, d] -> out [B, Hq, Nq, d] in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    rep = q.shape[1] // k.shape[1]
    if q.is_cuda:
        try:
            return _dense_cuda(q, k, v, q_offset, scale)
        except (RuntimeError, AttributeError, NotImplementedError):
            dense_path_used["kernel"] = "masked-sdpa"
    if q_offset == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=rep > 1)
    nq, nk = q.shape[2], k.shape[2]
    visible = (
        torch.arange(nk, device=q.device)[None, :] <= (q_offset + torch.arange(nq, device=q.device))[:, None]
    )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=rep > 1)
