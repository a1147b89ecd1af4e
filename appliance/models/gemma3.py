"""Gemma 3 (text: 270M, 1B, and the language model of the larger ones as Gemma3ForCausalLM).

The Llama decoder's parts, arranged Gemma's way:
- layers alternate sliding-window ("sliding_attention", local) and global ("full_attention")
  attention by `layer_types` (five local to one global), each kind with its own rope table
  (`rope_parameters` nested per kind: local theta 10k, global 1M, linear-scaled on 4B+);
- RMSNorms scale by (1 + weight) (`GemmaRMSNorm`), on q and k per head too, and four per layer:
  before and after attention, before and after the MLP (the "sandwich"); the post-norms apply to
  the sub-layer's output before the residual add;
- the MLP is GeGLU (`gelu_pytorch_tanh`), the softmax scale query_pre_attn_scalar**-0.5, and the
  embedding output is multiplied by sqrt(hidden_size) (rounded to the model dtype, as HF does);
- tied embeddings; an optional final logit soft-cap (tanh). Attention soft-capping (Gemma 2) is
  refused, not ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from appliance.errors import ModelLoadError
from appliance.layers.attention import AttentionMetadata
from appliance.layers.embedding import VocabEmbedding
from appliance.layers.layernorm import GemmaRMSNorm
from appliance.layers.mlp import GatedMLP
from appliance.layers.rotary import RotaryEmbedding, rope_parameters
from appliance.models.llama import (
    DecoderAttention,
    LayerOptions,
    LlamaForCausalLM,
    head_dim_of,
    sliding_windows,
)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, hf_config: Any, rotary: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        eps, hidden = hf_config.rms_norm_eps, hf_config.hidden_size
        bias = bool(getattr(hf_config, "attention_bias", False))
        self.self_attn = DecoderAttention(
            hf_config, rotary, LayerOptions(qkv_bias=bias, o_bias=bias, qk_norm=True), sliding_window,
            scale=float(hf_config.query_pre_attn_scalar) ** -0.5, norm_cls=GemmaRMSNorm)
        self.mlp = GatedMLP(hidden, hf_config.intermediate_size, act=hf_config.hidden_activation)
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # As in the Llama decoder, the residual stream is carried un-normalized and added inside
        # the next norm: here the pre-MLP norm adds the post-normed attention output to it.
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, kv_cache, meta))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma3Model(nn.Module):
    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.embed_scale = float(hf_config.hidden_size) ** 0.5
        head_dim = head_dim_of(hf_config)
        # One rope table per attention kind (local and global differ in theta and scaling).
        rotaries = nn.ModuleDict({
            kind: RotaryEmbedding(head_dim, hf_config.max_position_embeddings, rope_parameters(hf_config, kind))
            for kind in ("sliding_attention", "full_attention")
        })
        windows = sliding_windows(hf_config)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(hf_config, rotaries["sliding_attention" if window else "full_attention"], window)
            for window in windows
        )
        self.norm = GemmaRMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # NOTE: HF multiplies by the scale cast to the weights' dtype (sqrt(640) is not a bf16 value).
        hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Gemma 3 text models; HF parameter names as Gemma3ForCausalLM's."""

    def __init__(self, hf_config: Any) -> None:
        super().__init__(hf_config)
        self.final_logit_softcapping: float | None = getattr(hf_config, "final_logit_softcapping", None)

    @classmethod
    def build_decoder(cls, hf_config: Any) -> nn.Module:
        act = getattr(hf_config, "hidden_activation", None)
        if act != "gelu_pytorch_tanh":
            raise ModelLoadError(f"unsupported Gemma 3 hidden_activation {act!r} (only gelu_pytorch_tanh)")
        if getattr(hf_config, "attn_logit_softcapping", None) is not None:
            raise ModelLoadError("attn_logit_softcapping is not supported (Gemma 3 does not use it)")
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ModelLoadError("use_bidirectional_attention (an embedding model) is not supported")
        return Gemma3Model(hf_config)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, vocab], model dtype
        logits = self.lm_head(hidden)
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits
