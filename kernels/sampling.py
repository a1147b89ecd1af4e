"""Greedy sampling in Triton: row-wise argmax of the logits (reference: `torch.argmax`, which is also the CPU path).

The common serving step is plain greedy decoding, and torch's argmax there costs more than it
should: it wants fp32 logits (a cast over [N, vocab] first) and reduces each row in one block
(27 us for one 128k-vocab row on an H100). Here each row is cut into chunks reduced in parallel,
straight from the model-dtype logits, then a second tiny kernel picks the winner per row.
Ties go to the lowest index and NaN counts as the largest value, as `torch.argmax`. The result is
int32 (token ids feed the next step's int32 inputs without a cast).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from appliance_kernels.checks import check_same_device
from appliance_kernels.intmath import cdiv, next_power_of_2

_BLOCK = 2048  # vocab entries per program
_INT32_MAX = 2**31 - 1


@triton.jit
def _argmax_partial_kernel(
    logits_ptr,  # [N, V] (row stride free, vocab packed)
    part_val_ptr,  # fp32 [N, NUM_CHUNKS]: each chunk's max
    part_idx_ptr,  # int32 [N, NUM_CHUNKS]: the first index of it
    part_nan_ptr,  # int32 [N, NUM_CHUNKS]: the first NaN's index, or INT32_MAX
    stride_row,
    vocab_size,
    NUM_CHUNKS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + offs, mask=offs < vocab_size,
                other=float("-inf")).to(tl.float32)
    is_nan = x != x
    nan_idx = tl.min(tl.where(is_nan, offs, 2147483647), 0)  # NaN wins, as in torch.argmax
    x = tl.where(is_nan, float("-inf"), x)
    best = tl.max(x, 0)
    # Every chunk holds at least one real entry, so a padded -inf never wins over it.
    idx = tl.min(tl.where(x == best, offs, 2147483647), 0)
    tl.store(part_val_ptr + row * NUM_CHUNKS + chunk, best)
    tl.store(part_idx_ptr + row * NUM_CHUNKS + chunk, idx)
    tl.store(part_nan_ptr + row * NUM_CHUNKS + chunk, nan_idx)


@triton.jit
def _argmax_final_kernel(
    part_val_ptr,  # fp32 [N, NUM_CHUNKS]
    part_idx_ptr,  # int32 [N, NUM_CHUNKS]
    part_nan_ptr,  # int32 [N, NUM_CHUNKS]
    out_ptr,  # int32 [N]
    NUM_CHUNKS: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_PAD)
    valid = c < NUM_CHUNKS
    val = tl.load(part_val_ptr + row * NUM_CHUNKS + c, mask=valid, other=float("-inf"))
    idx = tl.load(part_idx_ptr + row * NUM_CHUNKS + c, mask=valid, other=2147483647)
    first_nan = tl.min(tl.load(part_nan_ptr + row * NUM_CHUNKS + c, mask=valid, other=2147483647), 0)
    best = tl.max(val, 0)
    # Chunks are in index order: the smallest index among the best chunks is the first maximum.
    first_best = tl.min(tl.where(valid & (val == best), idx, 2147483647), 0)
    tl.store(out_ptr + row, tl.where(first_nan < 2147483647, first_nan, first_best))


def argmax(logits: torch.Tensor) -> torch.Tensor:  # [N, V] -> int32 [N]
    """Index of each row's largest logit (first on ties, NaN largest); no host sync."""
    if logits.dim() != 2:
        raise ValueError(f"argmax: logits must be [N, V], got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"argmax: logits must be float16, bfloat16 or float32, got {logits.dtype}")
    num_rows, vocab = logits.shape
    if vocab == 0 or vocab > _INT32_MAX:
        raise ValueError(f"argmax: vocab size must be in [1, 2**31), got {vocab}")
    if logits.stride(1) != 1:
        raise ValueError(f"argmax: the vocab dim must be contiguous, got strides {logits.stride()}")
    out = torch.empty(num_rows, dtype=torch.int32, device=logits.device)
    if num_rows == 0:
        return out
    num_chunks = cdiv(vocab, _BLOCK)
    part_val = torch.empty((num_rows, num_chunks), dtype=torch.float32, device=logits.device)
    part_idx = torch.empty((2, num_rows, num_chunks), dtype=torch.int32, device=logits.device)
    check_same_device("argmax", logits, out, part_val, part_idx)
    _argmax_partial_kernel[(num_rows, num_chunks)](
        logits, part_val, part_idx[0], part_idx[1], logits.stride(0), vocab, NUM_CHUNKS=num_chunks, BLOCK=_BLOCK, num_warps=4,
    )
    _argmax_final_kernel[(num_rows,)](
        part_val, part_idx[0], part_idx[1], out, NUM_CHUNKS=num_chunks, CHUNKS_PAD=next_power_of_2(num_chunks), num_warps=1,
    )
    return out
