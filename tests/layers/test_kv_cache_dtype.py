"""The decoder's store-then-attend path on CPU: rotary fused with the KV write gives exactly what
rotary + Attention.forward gave, the KV-cache dtype resolves from the config, and a model over fp8
caches stays close to the same model over fp32 caches (Llama and Qwen3's q/k-norm layout)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from appliance.config import ModelConfig
from appliance.layers.attention import Attention, AttentionMetadata, kv_cache_torch_dtype
from appliance.layers.rotary import RotaryEmbedding
from appliance.models.loader import load_model
from appliance.models.qwen3 import Qwen3ForCausalLM

CPU = torch.device("cpu")


def test_kv_cache_dtype_resolves() -> None:
    assert kv_cache_torch_dtype("auto", torch.bfloat16, CPU) == torch.bfloat16
    assert kv_cache_torch_dtype("fp8", torch.float32, CPU) == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        kv_cache_torch_dtype("int8", torch.float32, CPU)


def _meta(lens: list[int], ctx: list[int], block_size: int, num_blocks: int) -> tuple[AttentionMetadata, torch.Tensor]:
    """A mixed batch over shuffled blocks: (metadata, positions)."""
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots, positions, starts = [], [], [], [0]
    width = max(-(-(c + n) // block_size) for c, n in zip(ctx, lens, strict=True))
    for n, c in zip(lens, ctx, strict=True):
        table = [order.pop() for _ in range(-(-(c + n) // block_size))]
        tables.append(table + [0] * (width - len(table)))
        for pos in range(c, c + n):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            positions.append(pos)
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor([c + n for c, n in zip(ctx, lens, strict=True)], dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32), max_query_len=max(lens),
        max_seq_len=max(c + n for c, n in zip(ctx, lens, strict=True)))
    return meta, torch.tensor(positions)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn])
def test_rotate_and_store_then_attend_equals_rotary_then_forward(cache_dtype: torch.dtype) -> None:
    hq, hkv, d, block_size, num_blocks = 4, 2, 16, 4, 12
    rotary = RotaryEmbedding(d, 64, {"rope_type": "default", "rope_theta": 10000.0})
    scales = {"k_scale": 0.5, "v_scale": 2.0} if cache_dtype != torch.float32 else {}
    attn = Attention(hq, hkv, d, d**-0.5, **scales)
    meta, positions = _meta([1, 5, 1], [6, 0, 11], block_size, num_blocks)
    meta.slot_mapping[2] = -1  # a padding token is not stored on either path
    tokens = positions.shape[0]
    q, k, v = torch.randn(tokens, hq, d), torch.randn(tokens, hkv, d), torch.randn(tokens, hkv, d)
    shape = (num_blocks, block_size, hkv, d)
    old = (torch.zeros(shape, dtype=cache_dtype), torch.zeros(shape, dtype=cache_dtype))
    new = (torch.zeros(shape, dtype=cache_dtype), torch.zeros(shape, dtype=cache_dtype))
    q_rot, k_rot = rotary(positions, q, k)
    want = attn(q_rot, k_rot, v, old, meta)
    got = attn.attend(rotary.rotate_and_store(positions, q, k, v, new, meta.slot_mapping, attn.k_scale,
                                              attn.v_scale), new, meta)
    assert torch.equal(got, want)
    for a, b in zip(old, new, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _tiny_qwen3() -> Qwen3ForCausalLM:
    config = transformers.Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model.eval()


def _logits(model: Any, cache_dtype: torch.dtype) -> torch.Tensor:
    block_size, num_blocks = 4, 24
    meta, positions = _meta([1, 9, 1], [13, 0, 20], block_size, num_blocks)
    tokens = positions.shape[0]
    g = torch.Generator().manual_seed(1)
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    # The cached context: the same random K/V for both dtypes (fp8 holds their rounded values).
    caches = [(torch.randn(shape, generator=g).to(cache_dtype), torch.randn(shape, generator=g).to(cache_dtype))
              for _ in range(model.num_layers)]
    ids = torch.randint(0, model.vocab_size, (tokens,), generator=g)
    with torch.no_grad():
        out = model.compute_logits(model(ids, positions, caches, meta))
    for k_cache, v_cache in caches:
        assert k_cache.dtype == cache_dtype and not k_cache.float().isnan().any() and not v_cache.float().isnan().any()
    return out


@pytest.mark.parametrize("family", ["tiny-llama", "qwen3"])
def test_model_over_fp8_cache_stays_close(family: str) -> None:
    if family == "qwen3":
        model = _tiny_qwen3()
    else:
        model = load_model(ModelConfig(model=family, load_format="dummy", seed=2), CPU, torch.float32)
    exact = _logits(model, torch.float32)
    fp8 = _logits(model, torch.float8_e4m3fn)
    err = float((fp8 - exact).norm() / exact.norm())
    # e4m3 keeps 3 mantissa bits (~6% per value); the cached context differs by that rounding.
    assert 0.0 < err < 0.1, err
