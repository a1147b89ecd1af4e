"""The Llama family (Llama 2/3, SmolLM2, Mistral): a pre-norm decoder with GQA, rotary and SwiGLU.

This file also holds the decoder the other families (Qwen2, Qwen3) reuse: they differ only in
`LayerOptions` (biases, per-head q/k norms). Parameter names mirror HF's, except that q/k/v live
packed in `qkv_proj` and gate/up in `gate_up_proj`; `load_weights` packs HF weights and
`hf_state_dict` unpacks them.

Model contract (the model runner relies on it):
    forward(input_ids [T], positions [T], kv_caches, meta) -> final-normed hidden states [T, H]
    compute_logits(hidden [N, H]) -> logits [N, vocab] in the model dtype (the sampler upcasts)
kv_caches[i] = (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim].
    sliding_windows: list[int | None], one per layer (None: full attention); the block manager
        frees blocks that fall out of every layer's window.
    max_positions: positions the rope tables cover (the longest sequence the model can take).

Sliding windows (Mistral v0.1, Qwen2/3 with use_sliding_window) come from `sliding_windows`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from appliance.errors import ModelLoadError
from appliance.layers.attention import Attention, AttentionMetadata
from appliance.layers.embedding import LMHead, VocabEmbedding
from appliance.layers.layernorm import RMSNorm
from appliance.layers.linear import Linear, PackedLinear
from appliance.layers.mlp import GatedMLP
from appliance.layers.rotary import RotaryEmbedding, rope_parameters

# HF projection name -> (our packed module name, shard id)
_PACKED_NAMES = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}
_UNPACKED_NAMES = {(packed, shard): hf for hf, (packed, shard) in _PACKED_NAMES.items()}


@dataclass(frozen=True)
class LayerOptions:
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rotary


def head_dim_of(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def sliding_windows(hf_config: Any) -> list[int | None]:
    """Each layer's window, as HF decides it: with `layer_types` (Qwen2/3, Gemma 3) only the
    "sliding_attention" layers slide; without (Mistral) every layer does when sliding_window is set."""
    window = getattr(hf_config, "sliding_window", None)
    num_layers = hf_config.num_hidden_layers
    if window is None:
        return [None] * num_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if not layer_types:
        return [int(window)] * num_layers
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ModelLoadError(f"unsupported layer_types {unknown} (known: sliding_attention, full_attention)")
    return [int(window) if kind == "sliding_attention" else None for kind in layer_types]


class DecoderAttention(nn.Module):
    def __init__(self, hf_config: Any, rotary: RotaryEmbedding, options: LayerOptions,
                 sliding_window: int | None = None, scale: float | None = None,
                 norm_cls: type[RMSNorm] = RMSNorm) -> None:
        """scale: the softmax scale (default head_dim**-0.5); norm_cls: the q/k norms' kind."""
        super().__init__()
        self.num_heads = hf_config.num_attention_heads
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(hf_config)
        hidden, q_size, kv_size = hf_config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = PackedLinear(hidden, (("q", q_size), ("k", kv_size), ("v", kv_size)), options.qkv_bias)
        self.o_proj = Linear(q_size, hidden, options.o_bias)
        self.q_norm = norm_cls(self.head_dim, hf_config.rms_norm_eps) if options.qk_norm else None
        self.k_norm = norm_cls(self.head_dim, hf_config.rms_norm_eps) if options.qk_norm else None
        self.rotary_emb = rotary  # shared by every layer of a kind (one cos/sin table)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                              self.head_dim**-0.5 if scale is None else scale, sliding_window=sliding_window)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.split_sizes, dim=-1)
        # Views into the packed output: [T, heads, D] with a contiguous last dim, no copy.
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3: per-head norms before rotary
            q = self.q_norm(q)
            k = self.k_norm(k)
        # Rotated k and v go straight into the cache (one fused kernel on CUDA); attend reads them back.
        q = self.rotary_emb.rotate_and_store(positions, q, k, v, kv_cache, meta.slot_mapping,
                                             self.attn.k_scale, self.attn.v_scale)
        out = self.attn.attend(q, kv_cache, meta)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, hf_config: Any, rotary: RotaryEmbedding, options: LayerOptions,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(hf_config, rotary, options, sliding_window)
        self.mlp = GatedMLP(hf_config.hidden_size, hf_config.intermediate_size, options.mlp_bias)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried un-normalized and added inside the next norm (fused).
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, hf_config: Any, options: LayerOptions) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        rotary = RotaryEmbedding(head_dim_of(hf_config), hf_config.max_position_embeddings, rope_parameters(hf_config))
        self.layers = nn.ModuleList(
            DecoderLayer(hf_config, rotary, options, window) for window in sliding_windows(hf_config)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama 2/3, SmolLM2, Mistral. Subclasses override `layer_options`."""

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.model = self.build_decoder(hf_config)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = LMHead(hf_config.vocab_size, hf_config.hidden_size,
                              tied_to=self.model.embed_tokens if self.tie_word_embeddings else None)
        attn = self.model.layers[0].self_attn
        self.num_layers: int = hf_config.num_hidden_layers
        self.num_heads: int = attn.num_heads
        self.num_kv_heads: int = attn.num_kv_heads
        self.head_dim: int = attn.head_dim
        self.vocab_size: int = hf_config.vocab_size
        self.sliding_windows: list[int | None] = [layer.self_attn.attn.sliding_window for layer in self.model.layers]
        # The most positions the rope tables cover: max_model_len may not exceed it.
        self.max_positions: int = min(m.max_positions for m in self.modules() if isinstance(m, RotaryEmbedding))

    @classmethod
    def build_decoder(cls, hf_config: Any) -> nn.Module:
        """The `model` submodule (embeddings, layers, final norm); families override it."""
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelLoadError(f"unsupported hidden_act {act!r} (only silu/SwiGLU MLPs are implemented)")
        return DecoderModel(hf_config, cls.layer_options(hf_config))

    @classmethod
    def layer_options(cls, hf_config: Any) -> LayerOptions:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return LayerOptions(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden], after the final norm
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, vocab], model dtype
        return self.lm_head(hidden)

    # ------------------------------------------------------------------ weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors in (casting to our dtype and device).

        Raises ModelLoadError on a name we do not know, a shape mismatch, or a missing parameter.
        """
        params = dict(self.named_parameters())  # a tied lm_head appears once, as the embedding
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # the embedding is the head
            module_path, _, param_name = name.rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            if leaf in _PACKED_NAMES:
                packed, shard = _PACKED_NAMES[leaf]
                target = f"{parent}.{packed}"
                try:
                    module = self.get_submodule(target)
                except AttributeError:
                    module = None
                if not isinstance(module, PackedLinear) or getattr(module, param_name, None) is None:
                    raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                try:
                    module.load_shard(param_name, shard, tensor)
                except ValueError as exc:
                    raise ModelLoadError(f"checkpoint tensor {name!r}: {exc}") from exc
                loaded.add(f"{target}.{param_name}:{shard}")
                continue
            param = params.get(name)
            if param is None:
                raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if param.shape != tensor.shape:
                raise ModelLoadError(f"checkpoint tensor {name!r}: expected shape {tuple(param.shape)}, "
                                     f"got {tuple(tensor.shape)}")
            param.data.copy_(tensor)
            loaded.add(name)
        missing = [name for name in self.hf_parameter_names() if self._loaded_key(name) not in loaded]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ModelLoadError(f"checkpoint lacks {len(missing)} parameter(s) of {type(self).__name__}: {shown}")

    @staticmethod
    def _loaded_key(hf_name: str) -> str:
        module_path, _, param_name = hf_name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        if leaf in _PACKED_NAMES:
            packed, shard = _PACKED_NAMES[leaf]
            return f"{parent}.{packed}.{param_name}:{shard}"
        return hf_name

    def hf_parameter_names(self) -> list[str]:
        """Every parameter a checkpoint must provide, by HF name (a tied lm_head excluded)."""
        return [name for name in self.hf_state_dict() if not (name == "lm_head.weight" and self.tie_word_embeddings)]

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under HF names, packed layers split back (views, no copies)."""
        out: dict[str, torch.Tensor] = {}
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if module is self.lm_head and self.tie_word_embeddings:
                    continue
                if isinstance(module, PackedLinear):
                    parent, _, packed = module_name.rpartition(".")
                    for shard, tensor in module.unpack(param_name).items():
                        out[f"{parent}.{_UNPACKED_NAMES[(packed, shard)]}.{param_name}"] = tensor.detach()
                else:
                    out[f"{module_name}.{param_name}"] = param.detach()
        if self.tie_word_embeddings:
            out["lm_head.weight"] = self.model.embed_tokens.weight.detach()
        return out


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is the Llama decoder (GQA, rope, SwiGLU), v0.1 with a sliding window on every layer."""
