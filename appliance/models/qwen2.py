"""Qwen2 / Qwen2.5: the Llama decoder with biases on the q, k and v projections (not on o)."""

from __future__ import annotations

from typing import Any

from appliance.models.llama import LayerOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def layer_options(cls, hf_config: Any) -> LayerOptions:
        return LayerOptions(qkv_bias=True, o_bias=False, mlp_bias=False)
