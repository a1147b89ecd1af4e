"""Qwen3 (dense): the Llama decoder with an RMSNorm over each head of q and k before rotary."""

from __future__ import annotations

from typing import Any

from appliance.models.llama import LayerOptions, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def layer_options(cls, hf_config: Any) -> LayerOptions:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return LayerOptions(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)
