"""Rope scaling rules: the cos/sin table of every `rope_type` we serve, computed as HF transformers
computes its frequencies (fp32, the same operations in the same order) so fp32 logits match.

The table is static (`cos_sin_table`): row p holds cos/sin of position p, times the rule's
attention factor (YaRN, LongRoPE). Two HF rules are dynamic, they change the frequencies with the
length of the forward pass (`dynamic_rope_update`); here each position gets the frequencies HF
gives it when it decodes that position one token at a time, which is how a KV cache works (a
key is rotated once, when it is written, and keeps that rotation):
- "dynamic" (NTK): position p < max_position_embeddings rotates as "default"; beyond, with the base
  stretched for a sequence of p + 1 tokens. The table extends to max_position_embeddings * factor.
- "longrope": position p < original_max_position_embeddings uses `short_factor`, from there on
  `long_factor`. (HF run on a whole prompt longer than the original length rotates its early
  tokens with the long factors too; the engine's prefix cache could not reuse blocks if a
  position's rotation depended on the prompt it came in.)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from appliance.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def table_positions(max_position_embeddings: int, params: dict[str, Any]) -> int:
    """Rows of the cos/sin table: the model's limit, or what the rule stretches it to. Dynamic NTK
    multiplies max_position_embeddings by `factor`; YaRN reaches original_max_position_embeddings x
    `factor` (Qwen2.5 keeps max_position_embeddings 32768 in config.json and enables 128k by adding
    a YaRN factor of 4)."""
    rope_type = params["rope_type"]
    if rope_type == "dynamic":
        return int(max_position_embeddings * float(params["factor"]))
    if rope_type == "yarn" and params.get("factor") is not None:
        return max(max_position_embeddings, int(params["original_max_position_embeddings"] * float(params["factor"])))
    return max_position_embeddings


def _base_inv_freq(head_dim: int, base: float | torch.Tensor) -> torch.Tensor:  # fp32 [D/2]
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    return 1.0 / (base**exponents)


def _llama3(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
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


def _yarn(head_dim: int, params: dict[str, Any], max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen2.5/Qwen3 long context): frequencies above a band kept (extrapolated), below it
    divided by `factor` (interpolated), a linear ramp between; cos/sin scaled by `attention_factor`."""
    base = float(params["rope_theta"])
    original = params["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as HF: no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: the frequency is kept as trained
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _dynamic_inv_freq(head_dim: int, base: float, factor: float, max_position_embeddings: int,
                      seq_len: int) -> torch.Tensor:
    # NOTE: HF computes the stretched base from a tensor seq_len, i.e. in fp32: so do we.
    length = torch.tensor(max(seq_len, max_position_embeddings), dtype=torch.int64)
    stretched = base * ((factor * length / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return _base_inv_freq(head_dim, stretched)


def _longrope(head_dim: int, params: dict[str, Any], max_position_embeddings: int, long: bool
              ) -> tuple[torch.Tensor, float]:
    base = float(params["rope_theta"])
    original = params["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float32)
    if ext.shape != (head_dim // 2,):
        raise ModelLoadError(f"longrope: {'long' if long else 'short'}_factor has {ext.numel()} entries, "
                             f"head_dim {head_dim} needs {head_dim // 2}")
    shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (ext * base**shape), float(attention_factor)


def check_rope(head_dim: int, params: dict[str, Any]) -> None:
    """Refuse what we would compute wrongly (at model construction, with the key's name)."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    partial = float(params.get("partial_rotary_factor", 1.0) or 1.0)
    if partial != 1.0:
        raise ModelLoadError(f"rope partial_rotary_factor={partial} is not supported (only whole-head rotary)")
    needs = {"linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "yarn": ("original_max_position_embeddings",),
             "longrope": ("long_factor", "short_factor", "original_max_position_embeddings")}
    missing = [key for key in needs.get(rope_type, ()) if params.get(key) is None]
    if missing:
        raise ModelLoadError(f"rope_type {rope_type!r} needs rope_parameters {', '.join(missing)}")


def cos_sin_table(head_dim: int, max_position_embeddings: int, params: dict[str, Any],
                  device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 [table_positions, head_dim] = cat(cos, sin) of each position's angles, times the rule's
    attention factor (the layout kernels/reference.py and the Triton kernels read)."""
    check_rope(head_dim, params)
    rope_type = params["rope_type"]
    num_positions = table_positions(max_position_embeddings, params)
    positions = torch.arange(num_positions, dtype=torch.int64).to(torch.float32)
    base = float(params["rope_theta"])
    attention_factor = 1.0
    if rope_type == "dynamic":
        factor = float(params["factor"])
        rows = [torch.outer(positions[:max_position_embeddings], _base_inv_freq(head_dim, base))]
        for p in range(max_position_embeddings, num_positions):  # one stretch per position beyond
            rows.append(positions[p] * _dynamic_inv_freq(head_dim, base, factor, max_position_embeddings, p + 1)[None])
        freqs = torch.cat(rows)
    elif rope_type == "longrope":
        original = int(params["original_max_position_embeddings"])
        short, attention_factor = _longrope(head_dim, params, max_position_embeddings, long=False)
        long, _ = _longrope(head_dim, params, max_position_embeddings, long=True)
        freqs = torch.cat((torch.outer(positions[:original], short), torch.outer(positions[original:], long)))
    else:
        if rope_type == "yarn":
            inv_freq, attention_factor = _yarn(head_dim, params, max_position_embeddings)
        else:
            inv_freq = _base_inv_freq(head_dim, base)
            if rope_type == "linear":
                inv_freq = inv_freq / float(params["factor"])
            elif rope_type == "llama3":
                inv_freq = _llama3(inv_freq, params)
        freqs = torch.outer(positions, inv_freq)
    table = torch.cat((freqs.cos() * attention_factor, freqs.sin() * attention_factor), dim=-1)
    return table.to(device).contiguous()
