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


def rotary_store_kv(
    positions: torch.Tensor,  # int64 [T]
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, BS, Hkv, D]
    v_cache: torch.Tensor,  # [N, BS, Hkv, D]
    slot_mapping: torch.Tensor,  # int64 [T]; -1 = padding token, not stored
    cos_sin_cache: torch.Tensor,  # fp32 [max_pos, D]
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:  # rotated q [T, Hq, D]
    if q.is_cuda and (module := _triton_module("rotary_kv")) is not None:
        return module.rotary_store_kv(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache,
                                      k_scale=k_scale, v_scale=v_scale)
    return reference.rotary_store_kv_ref(positions, q, k, v, k_cache, v_cache, slot_mapping, cos_sin_cache,
                                         k_scale, v_scale)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    if x.is_cuda and (module := _triton_module("activation")) is not None:
        return module.silu_and_mul(x)
    return reference.silu_and_mul_ref(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    if x.is_cuda and (module := _triton_module("activation")) is not None:
        return module.gelu_tanh_and_mul(x)
    return reference.gelu_tanh_and_mul_ref(x)
