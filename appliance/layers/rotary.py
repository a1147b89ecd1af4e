"""Rotary position embedding (neox / rotate-half style, as Llama and Qwen use it).

The cos/sin table is precomputed once in fp32 for every position up to max_position_embeddings:
cos_sin_cache[p] = cat(cos(p * inv_freq), sin(p * inv_freq)), shape [max_pos, head_dim], the layout
kernels/reference.py and the Triton kernel read.

Scaling rules (`rope_type`: default, linear, llama3, yarn, dynamic, longrope) live in
rope_scaling.py; they compute frequencies the way HF transformers does so fp32 logits match to the
last bits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from appliance.layers import dispatch
from appliance.layers.rope_scaling import SUPPORTED_ROPE_TYPES, check_rope, cos_sin_table, table_positions

__all__ = ["SUPPORTED_ROPE_TYPES", "RotaryEmbedding", "build_cos_sin_cache", "rope_parameters"]


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The config's rope settings as one dict with `rope_type` and `rope_theta`.

    transformers 5 keeps them in `rope_parameters`; older config.json files have `rope_theta` and an
    optional `rope_scaling` dict (whose type key may be `type`). Accept both. Models with several
    attention kinds (Gemma 3) nest one dict per `layer_type` ("sliding_attention", "full_attention").
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        if "rope_theta" not in params:
            params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if rope_type in ("llama3", "yarn", "longrope") and params.get("original_max_position_embeddings") is None:
        # As HF: Phi-3 keeps it at the top level; else the model's own limit is the original one.
        params["original_max_position_embeddings"] = (getattr(hf_config, "original_max_position_embeddings", None)
                                                      or hf_config.max_position_embeddings)
    return params


def build_cos_sin_cache(head_dim: int, max_positions: int, params: dict[str, Any],
                        device: torch.device | str | None = None) -> torch.Tensor:  # fp32 [rows, D]
    """The table for a model whose max_position_embeddings is `max_positions` (dynamic NTK: more rows)."""
    return cos_sin_table(head_dim, max_positions, params, device)


class RotaryEmbedding(nn.Module):
    """forward(positions [T], q [T, Hq, D], k [T, Hkv, D]) -> rotated (q, k).

    `rotate_and_store` also writes rotated k and v into the paged KV cache (one fused kernel on
    CUDA) and returns only rotated q: what an attention layer needs before it attends."""

    def __init__(self, head_dim: int, max_positions: int, params: dict[str, Any]) -> None:
        """max_positions: the model's max_position_embeddings (the table may be longer: dynamic NTK)."""
        super().__init__()
        self.head_dim = head_dim
        self.params = dict(params)
        check_rope(head_dim, self.params)  # fail at construction for an unsupported rope_type
        self.max_positions = table_positions(max_positions, self.params)
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
