"""Rotary embedding against HF transformers' rope implementation (fp32)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama

from appliance.errors import ModelLoadError
from appliance.layers.rotary import RotaryEmbedding, rope_parameters

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
}
HEAD_DIM, MAX_POS = 64, 1024


@pytest.mark.parametrize("rope", list(ROPES))
def test_rotary_matches_hf(rope: str) -> None:
    config = transformers.LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=MAX_POS, rope_parameters=ROPES[rope])
    ours = RotaryEmbedding(HEAD_DIM, MAX_POS, rope_parameters(config))
    hf = modeling_llama.LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 7, 63, 255, 256, 700, MAX_POS - 1])
    q = torch.randn(len(positions), 4, HEAD_DIM)
    k = torch.randn(len(positions), 2, HEAD_DIM)
    cos, sin = hf(q, positions.unsqueeze(0))  # [1, T, D]
    half = HEAD_DIM // 2
    table = ours.cos_sin_cache[positions]
    assert ours.cos_sin_cache.dtype == torch.float32 and ours.cos_sin_cache.shape == (MAX_POS, HEAD_DIM)
    torch.testing.assert_close(table[:, :half], cos[0, :, :half], rtol=0, atol=1e-6)
    torch.testing.assert_close(table[:, half:], sin[0, :, :half], rtol=0, atol=1e-6)

    want_q, want_k = modeling_llama.apply_rotary_pos_emb(q.transpose(0, 1), k.transpose(0, 1), cos, sin)
    got_q, got_k = ours(positions, q, k)
    torch.testing.assert_close(got_q, want_q[0].transpose(0, 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_k, want_k[0].transpose(0, 1), rtol=0, atol=1e-5)


def test_legacy_rope_scaling_keys_and_unsupported_types() -> None:
    class Legacy:  # a pre-transformers-5 config: rope_theta + rope_scaling with "type"
        rope_theta = 1e6
        rope_scaling = {"type": "linear", "factor": 2.0}

    assert rope_parameters(Legacy()) == {"type": "linear", "factor": 2.0, "rope_theta": 1e6, "rope_type": "linear"}
    with pytest.raises(ModelLoadError, match="yarn.*supported: default, linear, llama3"):
        RotaryEmbedding(HEAD_DIM, 16, {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
