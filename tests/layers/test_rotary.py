"""Rotary embedding against HF transformers' rope implementation (fp32)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama

from appliance.errors import ModelLoadError
from appliance.layers.rotary import RotaryEmbedding, rope_parameters

HEAD_DIM, MAX_POS = 64, 1024
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 256},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 128,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False},
}
# Rules whose frequencies HF changes with the length of the forward pass: compared position by
# position, as HF rotates a token it decodes one at a time (see appliance/layers/rope_scaling.py).
DYNAMIC_ROPES = {
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 256,
                 "short_factor": [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)],
                 "long_factor": [1.0 + 0.5 * i for i in range(HEAD_DIM // 2)]},
}


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
    with pytest.raises(ModelLoadError, match="'su'.*supported: default, linear, llama3, yarn, dynamic, longrope"):
        RotaryEmbedding(HEAD_DIM, 16, {"rope_type": "su", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ModelLoadError, match="needs rope_parameters original_max_position_embeddings"):
        RotaryEmbedding(HEAD_DIM, 16, {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ModelLoadError, match="partial_rotary_factor"):
        RotaryEmbedding(HEAD_DIM, 16, {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})


@pytest.mark.parametrize("rope", list(DYNAMIC_ROPES))
def test_length_dependent_rope_matches_hf_decoding_token_by_token(rope: str) -> None:
    config = transformers.LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=MAX_POS // 2 if rope == "dynamic" else MAX_POS,
                                      rope_parameters=DYNAMIC_ROPES[rope])
    ours = RotaryEmbedding(HEAD_DIM, config.max_position_embeddings, rope_parameters(config))
    hf = modeling_llama.LlamaRotaryEmbedding(config)
    x = torch.zeros(1, 1, HEAD_DIM)
    positions = [0, 1, 100, 255, 256, 257, 511, 512, 513, 700, 1023]
    if rope == "dynamic":
        assert ours.cos_sin_cache.shape[0] == MAX_POS  # stretched to max_position_embeddings * factor
    half = HEAD_DIM // 2
    differs = False
    for p in positions:  # ascending, as a decode walks them
        cos, sin = hf(x, torch.tensor([[p]]))
        row = ours.cos_sin_cache[p]
        torch.testing.assert_close(row[:half], cos[0, 0, :half], rtol=0, atol=2e-6)
        torch.testing.assert_close(row[half:], sin[0, 0, :half], rtol=0, atol=2e-6)
        plain = torch.outer(torch.tensor([float(p)]), 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM)))
        differs |= not torch.allclose(row[:half], plain.cos()[0], atol=1e-3)
    assert differs  # the rule changed some position's rotation
