"""FP8 (e4m3) KV-cache elements, shared by the kernels that write and read the paged cache.

An fp8 cache holds `x / scale` saturated to ±448 (the largest finite e4m3fn value: e4m3fn has no
infinity, and an unclamped overflow would become NaN); a read gives `fp8 * scale`. Scales are
per-tensor floats, 1.0 until calibration exists (as vLLM without calibration data). Caches of
any other dtype hold the model's values as they are and take no scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8_DTYPE


def check_kv_scales(op: str, k_cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """Scales must be positive finite floats, and other than 1.0 only for an fp8 cache."""
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(scale, int | float) or not 0.0 < float(scale) < float("inf"):
            raise ValueError(f"{op}: {name} must be a positive finite float, got {scale!r}")
        if scale != 1.0 and not is_fp8(k_cache):
            raise ValueError(f"{op}: {name}={scale} applies to an fp8 cache only, the cache is {k_cache.dtype}")


@triton.jit
def to_cache(x, scale, IS_FP8: tl.constexpr):
    """Values on their way into the cache (the caller casts to the cache's dtype): as they are, or
    for fp8 divided by the scale and saturated to ±448 in fp32."""
    if IS_FP8:
        x = x.to(tl.float32) / scale
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    return x
