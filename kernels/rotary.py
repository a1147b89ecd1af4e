"""Neox-style (rotate-half) rotary embedding in Triton (torch reference: kernels/reference.py `rotary_ref`).

One program per token rotates every query and key head of that token, so the token's cos/sin row
is read once for all heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from appliance_kernels.checks import check_out, check_same_device
from appliance_kernels.intmath import next_power_of_2

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rotate_heads(
    dst_ptr,  # [Hx, D] rows of this token in the output
    src_ptr,  # [Hx, D] rows of this token in the input (head stride free, dims packed)
    stride_src_h,
    stride_dst_h,
    cos,  # fp32 [HALF_PAD]
    sin,  # fp32 [HALF_PAD]
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    heads = tl.arange(0, HEADS_PAD)
    cols = tl.arange(0, HALF_PAD)
    mask = (heads[:, None] < NUM_HEADS) & (cols[None, :] < HALF)
    src = src_ptr + heads[:, None] * stride_src_h + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + heads[:, None] * stride_dst_h + cols[None, :]
    ty = dst_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos[None, :] - x2 * sin[None, :]).to(ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(ty), mask=mask)


@triton.jit
def _cos_sin_row(
    positions_ptr,  # int32/int64 [T]
    cos_sin_ptr,  # fp32 [max_pos, D] = cat(cos[:, :D/2], sin[:, :D/2]), contiguous
    token,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    """The token's (cos, sin) rows, fp32 [HALF_PAD] each (zero in the padded lanes)."""
    half: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, HALF_PAD)
    mask = cols < half
    cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + cols, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * HEAD_DIM + half + cols, mask=mask, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_out_ptr,  # [T, Hq, D] contiguous
    k_out_ptr,  # [T, Hkv, D] contiguous
    q_ptr,  # [T, Hq, D], dims packed
    k_ptr,  # [T, Hkv, D], dims packed
    positions_ptr,  # int32/int64 [T]
    cos_sin_ptr,  # fp32 [max_pos, D] = cat(cos[:, :D/2], sin[:, :D/2]), contiguous
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    cos, sin = _cos_sin_row(positions_ptr, cos_sin_ptr, token, HEAD_DIM, HALF_PAD)
    _rotate_heads(q_out_ptr + token * NUM_Q_HEADS * HEAD_DIM, q_ptr + token * stride_q_t, stride_q_h, HEAD_DIM,
                  cos, sin, NUM_Q_HEADS, Q_HEADS_PAD, half, HALF_PAD)
    _rotate_heads(k_out_ptr + token * NUM_KV_HEADS * HEAD_DIM, k_ptr + token * stride_k_t, stride_k_h, HEAD_DIM,
                  cos, sin, NUM_KV_HEADS, KV_HEADS_PAD, half, HALF_PAD)


def rotary_embedding(
    positions: torch.Tensor,  # int64 [T]
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # fp32 [max_pos, D] = cat(cos[:, :D/2], sin[:, :D/2])
    *,
    q_out: torch.Tensor | None = None,  # [T, Hq, D] contiguous; may be q itself (in place)
    k_out: torch.Tensor | None = None,  # [T, Hkv, D] contiguous; may be k itself (in place)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding; by default returns new contiguous (q, k) and leaves the inputs
    untouched. In place is safe: each program loads both halves of a head before storing either."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"rotary_embedding: q must be [T, Hq, D] and k [T, Hkv, D], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"rotary_embedding: head size must be even, got {head_dim}")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise TypeError(f"rotary_embedding: q and k must share a float16/bfloat16/float32 dtype, got {q.dtype} "
                        f"and {k.dtype}")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rotary_embedding: positions must be int32/int64 [{num_tokens}], got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or not cos_sin_cache.is_contiguous():
        raise ValueError(f"rotary_embedding: cos_sin_cache must be a contiguous [max_pos, {head_dim}], got "
                         f"{tuple(cos_sin_cache.shape)}")
    if q.stride(2) != 1 or k.stride(2) != 1 or not positions.is_contiguous():
        raise ValueError(f"rotary_embedding: q and k need a contiguous last dim (strides {q.stride()}, "
                         f"{k.stride()}) and positions must be contiguous")
    check_same_device("rotary_embedding", q, k, positions, cos_sin_cache)
    q_out = check_out("rotary_embedding", "q_out", q_out, q)
    k_out = check_out("rotary_embedding", "k_out", k_out, k)
    if num_tokens == 0:
        return q_out, k_out
    _rotary_kernel[(num_tokens,)](
        q_out, k_out, q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads,
        Q_HEADS_PAD=next_power_of_2(num_q_heads), KV_HEADS_PAD=next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HALF_PAD=next_power_of_2(head_dim // 2), num_warps=4,
    )
    return q_out, k_out
