"""Rotary position embedding (neox / rotate-half style, as Llama and Qwen use it).

The cos/sin table is precomputed once in fp32 for every position up to max_position_embeddings:
cos_sin_cache[p] = cat(cos(p * inv_freq), sin(p * inv_freq)), shape [max_pos, head_dim], the layout
kernels/reference.py and the Triton kernel read.

Supported `rope_type`s: "default", "linear" (positions divided by `factor`) and "llama3" (Llama 3.x
frequency-dependent scaling). inv_freq is computed the way HF transformers does it so fp32 logits
match to the last bits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from appliance.errors import ModelLoadError
from appliance.layers import dispatch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The config's rope settings as one dict with `rope_type` and `rope_theta`.

    transformers 5 keeps them in `rope_parameters`; older config.json files have `rope_theta` and an
    optional `rope_scaling` dict (whose type key may be `type`). Accept both.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        if "rope_theta" not in params:
            params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return params


def _inv_freq(head_dim: int, params: dict[str, Any]) -> torch.Tensor:  # fp32 [head_dim / 2]
    base = float(params["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params["low_freq_factor"])
        high_freq_factor = float(params["high_freq_factor"])
        old_context_len = float(params["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and the band
        # between them interpolated smoothly.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ModelLoadError(
        f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def build_cos_sin_cache(head_dim: int, max_positions: int, params: dict[str, Any],
                        device: torch.device | str | None = None) -> torch.Tensor:  # fp32 [max_pos, D]
    inv_freq = _inv_freq(head_dim, params).to(device)
    positions = torch.arange(max_positions, dtype=torch.int64, device=device).to(torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [max_pos, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()


class RotaryEmbedding(nn.Module):
    """forward(positions [T], q [T, Hq, D], k [T, Hkv, D]) -> rotated (q, k).

    `rotate_and_store` also writes rotated k and v into the paged KV cache (one fused kernel on
    CUDA) and returns only rotated q: what an attention layer needs before it attends."""

    def __init__(self, head_dim: int, max_positions: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.params = dict(params)
        _inv_freq(head_dim, self.params)  # fail at construction for an unsupported rope_type
        # NOTE: not persistent (never in a state dict) and fp32 whatever the model dtype: build the
        # model in its target dtype (the loader does) rather than calling `model.to(dtype)` after.
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(head_dim, max_positions, self.params),
                             persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return dispatch.rotary_embedding(positions, q, k, self.cos_sin_cache)

    def rotate_and_store(
        self,
        positions: torch.Tensor,  # int64 [T]
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [N, BS, Hkv, D]
        slot_mapping: torch.Tensor,  # int64 [T]; -1 = padding token, not stored
        k_scale: float = 1.0,  # fp8 caches only
        v_scale: float = 1.0,
    ) -> torch.Tensor:  # rotated q [T, Hq, D]
        k_cache, v_cache = kv_cache
        return dispatch.rotary_store_kv(positions, q, k, v, k_cache, v_cache, slot_mapping, self.cos_sin_cache,
                                        k_scale, v_scale)
