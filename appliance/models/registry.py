"""Model classes by HF `architectures` name."""

from __future__ import annotations

from typing import Any

from torch import nn

from appliance.errors import ModelLoadError
from appliance.models.gemma3 import Gemma3ForCausalLM
from appliance.models.llama import LlamaForCausalLM, MistralForCausalLM
from appliance.models.phi3 import Phi3ForCausalLM
from appliance.models.qwen2 import Qwen2ForCausalLM
from appliance.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
# config.json files without `architectures` still name their model_type.
_MODEL_TYPES = {"gemma3_text": "Gemma3ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def architecture_of(hf_config: Any) -> str:
    """The first supported name in config.architectures (or from model_type); else ModelLoadError."""
    names = list(getattr(hf_config, "architectures", None) or [])
    for name in names:
        if name in MODEL_REGISTRY:
            return name
    model_type = getattr(hf_config, "model_type", None)
    if not names and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    shown = names or [f"model_type={model_type!r}"]
    raise ModelLoadError(
        f"unsupported model architecture {', '.join(map(str, shown))}; supported: {', '.join(supported_architectures())}"
    )


def model_class(hf_config: Any) -> type[nn.Module]:
    return MODEL_REGISTRY[architecture_of(hf_config)]
