"""RMSNorm (fused residual), packed linears, the gated MLP and the lm head on CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama

from appliance.layers.embedding import LMHead, VocabEmbedding
from appliance.layers.layernorm import RMSNorm
from appliance.layers.linear import PackedLinear
from appliance.layers.mlp import GatedMLP


def test_rms_norm_matches_hf_and_fuses_the_residual_add() -> None:
    hidden = 48
    ours = RMSNorm(hidden, eps=1e-5)
    hf = modeling_llama.LlamaRMSNorm(hidden, eps=1e-5)
    weight = 1.0 + 0.3 * torch.randn(hidden)
    with torch.no_grad():
        ours.weight.copy_(weight)
        hf.weight.copy_(weight)
    x, residual = torch.randn(5, hidden), torch.randn(5, hidden)
    torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=1e-6)
    normed, summed = ours(x, residual)
    torch.testing.assert_close(summed, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, hf(x + residual), rtol=0, atol=1e-6)
    # [T, heads, D] inputs (Qwen3's q/k norms) normalize each head on its own.
    per_head = RMSNorm(8, eps=1e-6)
    q = torch.randn(3, 6, 8)
    torch.testing.assert_close(per_head(q), modeling_llama.LlamaRMSNorm(8, eps=1e-6)(q), rtol=0, atol=1e-6)


def test_packed_linear_loads_and_unpacks_shards() -> None:
    layer = PackedLinear(16, (("q", 12), ("k", 4), ("v", 4)), bias=True)
    parts = {name: (torch.randn(rows, 16), torch.randn(rows)) for name, rows in (("q", 12), ("k", 4), ("v", 4))}
    for name in ("v", "q", "k"):  # load order must not matter
        layer.load_shard("weight", name, parts[name][0])
        layer.load_shard("bias", name, parts[name][1])
    x = torch.randn(3, 16)
    want = torch.cat([F.linear(x, w, b) for w, b in parts.values()], dim=-1)
    torch.testing.assert_close(layer(x), want)
    for name, (weight, bias) in parts.items():
        assert torch.equal(layer.unpack("weight")[name], weight) and torch.equal(layer.unpack("bias")[name], bias)


def test_gated_mlp_and_tied_head() -> None:
    mlp = GatedMLP(8, 20)
    gate, up, down = torch.randn(20, 8), torch.randn(20, 8), torch.randn(8, 20)
    mlp.gate_up_proj.load_shard("weight", "gate", gate)
    mlp.gate_up_proj.load_shard("weight", "up", up)
    with torch.no_grad():
        mlp.down_proj.weight.copy_(down)
    x = torch.randn(4, 8)
    torch.testing.assert_close(mlp(x), F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down))

    embedding = VocabEmbedding(30, 8)
    with torch.no_grad():
        embedding.weight.normal_()
    head = LMHead(30, 8, tied_to=embedding)
    assert head.weight is embedding.weight
    logits = head(x.to(torch.bfloat16).float())
    assert logits.dtype == torch.float32 and logits.shape == (4, 30)
    torch.testing.assert_close(embedding(torch.tensor([3, 29])), embedding.weight[[3, 29]])
