"""Phi-3 (and Phi-3.5 mini): the Llama decoder, with q/k/v and gate/up already packed in the
checkpoint (`qkv_proj`, `gate_up_proj`) and LongRoPE for its 128k variants (rope_scaling.py).
A `sliding_window` in the config slides every layer, as HF's Phi3 attention does. Partial rotary
(Phi-4-mini's partial_rotary_factor 0.75) is refused by the rope check.

NOTE: `hf_state_dict()` names the projections Llama's way (q_proj/k_proj/v_proj, gate_proj/up_proj);
`load_weights` takes those as well as Phi-3's packed ones."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from appliance.errors import ModelLoadError
from appliance.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Split the checkpoint's packed projections into the HF-Llama names our loader takes."""
        super().load_weights(self._unpacked(weights))

    def _unpacked(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        for name, tensor in weights:
            prefix, _, param = name.rpartition(".")
            if prefix.endswith("self_attn.qkv_proj"):
                parts = (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size))
            elif prefix.endswith("mlp.gate_up_proj"):
                half = tensor.shape[0] // 2
                parts = (("gate_proj", half), ("up_proj", half))
            else:
                yield name, tensor
                continue
            if tensor.shape[0] != sum(size for _, size in parts):
                raise ModelLoadError(f"checkpoint tensor {name!r}: {tensor.shape[0]} rows, expected "
                                     f"{sum(size for _, size in parts)}")
            parent = prefix.rpartition(".")[0]
            for (shard, _), piece in zip(parts, tensor.split([size for _, size in parts]), strict=True):
                yield f"{parent}.{shard}.{param}", piece
