"""Kernel dispatch for the layers: Triton on CUDA tensors, the pure-torch references elsewhere.

Each function has the signature and return value of its reference in kernels/reference.py. The
Triton modules are imported once, lazily, so CPU-only machines (and machines where Triton cannot
import) never pay for them and still run every layer.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
from appliance_kernels import reference


@functools.cache
def _triton_module(name: str) -> ModuleType | None:
    try:
        import importlib

        return importlib.import_module(f"appliance_kernels.{name}")
    except ImportError:
        return None


def rms_norm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.is_cuda and (module := _triton_module("norm")) is not None:
        return module.rms_norm(x, weight, eps, residual)
    return reference.rms_norm_ref(x, weight, eps, residual)


def rotary_embedding(
    positions: torch.Tensor,  # int64 [T]
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # fp32 [max_pos, D]
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.is_cuda and (module := _triton_module("rotary")) is not None:
        return module.rotary_embedding(positions, q, k, cos_sin_cache)
    return reference.rotary_ref(positions, q, k, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    if x.is_cuda and (module := _triton_module("activation")) is not None:
        return module.silu_and_mul(x)
    return reference.silu_and_mul_ref(x)
