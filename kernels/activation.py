"""SiLU-and-multiply for gated MLPs in Triton (torch reference: kernels/reference.py `silu_and_mul_ref`).

The fused gate_up projection gives [T, 2 * I] = cat(gate, up); this kernel reads it once and
writes silu(gate) * up, instead of materialising silu(gate) in between.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from appliance_kernels.checks import check_out

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _silu_and_mul_kernel(
    out_ptr,  # [T, I] contiguous
    x_ptr,  # [T, 2 * I], last dim packed
    stride_x_t,
    INTERMEDIATE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTERMEDIATE
    gate = tl.load(x_ptr + row * stride_x_t + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x_t + INTERMEDIATE + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * INTERMEDIATE + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(
    x: torch.Tensor,  # [T, 2 * I]
    *,
    out: torch.Tensor | None = None,  # [T, I]; written in place when given
) -> torch.Tensor:  # [T, I]
    """silu(x[:, :I]) * x[:, I:] with fp32 math."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"silu_and_mul: x must be [T, 2 * I], got {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"silu_and_mul: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError(f"silu_and_mul: x needs a contiguous last dim, got strides {x.stride()}")
    num_tokens, intermediate = x.shape[0], x.shape[1] // 2
    out = check_out("silu_and_mul", "out", out, x[:, :intermediate])
    if num_tokens == 0 or intermediate == 0:
        return out
    block = min(1024, triton.next_power_of_2(intermediate))
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(intermediate, block))](
        out, x, x.stride(0), INTERMEDIATE=intermediate, BLOCK=block, num_warps=4,
    )
    return out
