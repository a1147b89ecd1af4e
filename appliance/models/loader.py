"""Finding a model (`resolve_model`) and building it with its weights (`load_model`).

Formats:
- "safetensors": a Hugging Face directory (config.json + *.safetensors, sharded with
  model.safetensors.index.json or not). Tensors are read straight onto the target device.
- "gguf": a .gguf file (or a directory holding one). transformers parses and de-quantizes it into
  an HF-named state dict; our `load_weights` takes it from there.
- "dummy": random weights for a named architecture (dummy_configs.py) or a directory with a
  config.json, seeded by ModelConfig.seed, created directly on the device in the target dtype.
"auto" picks gguf for a .gguf path and safetensors for a directory. "default" is the embedded
SmolLM2-135M-Instruct (fetched on first use, see fetch.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from appliance.config import DEFAULT_MODEL, ModelConfig
from appliance.errors import ModelLoadError, ModelNotFoundError
from appliance.models.dummy_configs import DUMMY_CONFIGS
from appliance.models.registry import architecture_of, model_class

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model lives and what it is, before any weight is read."""

    name: str  # a served-name default: the directory/file stem or the dummy config name
    path: Path | None  # directory or .gguf file; None for a named dummy config
    hf_config: Any  # transformers PretrainedConfig
    load_format: str  # "safetensors" | "gguf" | "dummy"
    architecture: str  # a key of MODEL_REGISTRY
    tokenizer_path: str | None  # a directory or .gguf file for `load_tokenizer`; None: no tokenizer
    generation_config: Any | None = None  # transformers GenerationConfig when the model ships one


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """ModelConfig.dtype -> torch dtype ("auto": bf16 on GPU, fp32 on CPU)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; expected auto, float32, bfloat16 or float16")
    return _DTYPES[name]


def resolve_model(model_config: ModelConfig) -> ResolvedModel:
    """Locate the model, read its config and check we support its architecture. Reads no weights."""
    fmt = model_config.load_format
    if fmt not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load_format {fmt!r}; expected one of {', '.join(LOAD_FORMATS)}")
    target = model_config.model
    if fmt == "dummy" and target in DUMMY_CONFIGS:
        resolved = ResolvedModel(name=target, path=None, hf_config=_config_from_dict(DUMMY_CONFIGS[target]),
                                 load_format="dummy", architecture="", tokenizer_path=None)
    else:
        if target == DEFAULT_MODEL:
            from appliance.models.fetch import ensure_default_model

            path = ensure_default_model()
        else:
            path = Path(target).expanduser()
            if not path.exists():
                hint = f" (dummy configs: {', '.join(DUMMY_CONFIGS)})" if fmt == "dummy" else ""
                raise ModelNotFoundError(f"model path {str(path)!r} does not exist{hint}", param="model")
        resolved = _resolve_path(path, fmt)
    resolved = _with(resolved, architecture=architecture_of(resolved.hf_config))
    if model_config.tokenizer:
        resolved = _with(resolved, tokenizer_path=model_config.tokenizer)
    return resolved


def _with(resolved: ResolvedModel, **changes: Any) -> ResolvedModel:
    return dataclasses.replace(resolved, **changes)


def _resolve_path(path: Path, fmt: str) -> ResolvedModel:
    if path.is_dir() and fmt == "gguf":
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelLoadError(f"load_format gguf needs exactly one .gguf file in {path}, found {len(ggufs)}")
        path = ggufs[0]
    if path.is_file():
        if fmt == "safetensors" or (fmt == "auto" and path.suffix != ".gguf"):
            raise ModelLoadError(f"{path} is a file: pass a model directory, or a .gguf file")
        return ResolvedModel(name=path.stem, path=path, hf_config=_gguf_config(path),
                             load_format="dummy" if fmt == "dummy" else "gguf", architecture="",
                             tokenizer_path=str(path))
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
    try:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # a bad config.json raises many types
        raise ModelLoadError(f"cannot read {config_file}: {type(exc).__name__}: {exc}") from exc
    if fmt != "dummy" and not _safetensors_files(path):
        raise ModelLoadError(f"{path} holds no *.safetensors weights (only safetensors or GGUF are supported)")
    has_tokenizer = any((path / name).is_file() for name in _TOKENIZER_FILES)
    return ResolvedModel(name=path.name, path=path, hf_config=hf_config,
                         load_format="dummy" if fmt == "dummy" else "safetensors", architecture="",
                         tokenizer_path=str(path) if has_tokenizer else None,
                         generation_config=_generation_config(path))


def _config_from_dict(config: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    fields = dict(config)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _gguf_config(path: Path) -> Any:
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # gguf's reader raises ValueError/IndexError/... on garbage
        raise ModelLoadError(f"cannot read GGUF file {path}: {type(exc).__name__}: {exc}") from exc


def _generation_config(path: Path) -> Any | None:
    if not (path / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path / 'generation_config.json'}: {exc}") from exc


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names missing shard(s): {', '.join(missing)}")
        return files
    return sorted(path.glob("*.safetensors"))


# ---------------------------------------------------------------------------- loading


def load_model(model_config: ModelConfig, device: torch.device, dtype: torch.dtype,
               resolved: ResolvedModel | None = None) -> nn.Module:
    """Build the model on `device` in `dtype` and fill its weights. Returns it in eval mode."""
    resolved = resolved or resolve_model(model_config)
    device = torch.device(device)
    cls = model_class(resolved.hf_config)
    # Parameters are allocated uninitialized, directly on the device and in the dtype.
    with torch.device(device), _default_dtype(dtype):
        model = cls(resolved.hf_config)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        if resolved.load_format == "dummy":
            init_dummy_weights(model, model_config.seed)
        elif resolved.load_format == "gguf":
            assert resolved.path is not None
            model.load_weights(_gguf_tensors(resolved.path, resolved.hf_config).items())
        else:
            assert resolved.path is not None
            model.load_weights(_safetensors_tensors(resolved.path, device))
    return model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights, reproducible for a seed on a given device type.

    N(0, 0.02) for matrices and biases, ones for norm weights: the residual stream then stays
    finite through 30+ layers in bf16, so benchmarks run the same numerics as a real model.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():  # registration order: deterministic
        if param.dim() == 1 and "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)


def _safetensors_tensors(path: Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    # safetensors takes "cuda:0" or "cpu"; reading straight to the GPU skips a host copy.
    target = f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"
    for file in _safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt", device=target) as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot read safetensors file {file}: {type(exc).__name__}: {exc}") from exc


def _gguf_tensors(path: Path, hf_config: Any) -> dict[str, torch.Tensor]:
    """De-quantized float32 tensors under HF names (transformers maps GGUF names via a meta model)."""
    try:
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config)
        parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton,
                                      torch_dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises ValueError/IndexError/KeyError/... on garbage
        raise ModelLoadError(f"cannot read GGUF file {path}: {type(exc).__name__}: {exc}") from exc
    tensors = parsed.get("tensors") or {}
    if not tensors:
        raise ModelLoadError(f"GGUF file {path} holds no tensors transformers can map")
    return tensors
