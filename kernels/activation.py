"""Activation-and-multiply for gated MLPs in Triton (torch references: kernels/reference.py
`silu_and_mul_ref`, `gelu_tanh_and_mul_ref`).

The fused gate_up projection gives [T, 2 * I] = cat(gate, up); this kernel reads it once and
writes act(gate) * up, instead of materialising act(gate) in between. act: SiLU (SwiGLU: Llama,
Qwen) or the tanh approximation of GELU (GeGLU: Gemma's `gelu_pytorch_tanh`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from appliance_kernels.checks import check_out
from appliance_kernels.intmath import cdiv, next_power_of_2

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _silu_and_mul_kernel(
    out_ptr,  # [T, I] contiguous
    x_ptr,  # [T, 2 * I], last dim packed
    stride_x_t,
    INTERMEDIATE: tl.constexpr,
    BLOCK: tl.constexpr,
    GELU_TANH: tl.constexpr,  # False: silu(gate); True: gelu_tanh(gate)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTERMEDIATE
    gate = tl.load(x_ptr + row * stride_x_t + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x_t + INTERMEDIATE + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU_TANH:
        # 0.5 x (1 + tanh(y)) = x * sigmoid(2y), y = sqrt(2/pi) (x + 0.044715 x^3): no tanh needed.
        y = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        out = gate / (1.0 + tl.exp(-2.0 * y)) * up
    else:
        out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * INTERMEDIATE + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(
    x: torch.Tensor,  # [T, 2 * I]
    *,
    out: torch.Tensor | None = None,  # [T, I]; written in place when given
) -> torch.Tensor:  # [T, I]
    """silu(x[:, :I]) * x[:, I:] with fp32 math."""
    return _act_and_mul("silu_and_mul", x, out, gelu_tanh=False)


def gelu_tanh_and_mul(
    x: torch.Tensor,  # [T, 2 * I]
    *,
    out: torch.Tensor | None = None,  # [T, I]; written in place when given
) -> torch.Tensor:  # [T, I]
    """gelu(x[:, :I], approximate="tanh") * x[:, I:] with fp32 math."""
    return _act_and_mul("gelu_tanh_and_mul", x, out, gelu_tanh=True)


def _act_and_mul(op: str, x: torch.Tensor, out: torch.Tensor | None, *, gelu_tanh: bool) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"{op}: x must be [T, 2 * I], got {tuple(x.shape)}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError(f"{op}: x needs a contiguous last dim, got strides {x.stride()}")
    num_tokens, intermediate = x.shape[0], x.shape[1] // 2
    out = check_out(op, "out", out, x[:, :intermediate])
    if num_tokens == 0 or intermediate == 0:
        return out
    block = min(1024, next_power_of_2(intermediate))
    _silu_and_mul_kernel[(num_tokens, cdiv(intermediate, block))](
        out, x, x.stride(0), INTERMEDIATE=intermediate, BLOCK=block, GELU_TANH=gelu_tanh, num_warps=4,
    )
    return out
