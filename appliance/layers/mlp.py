"""The gated MLP: down(act(gate(x)) * up(x)), gate and up in one GEMM. act: SiLU (Llama, Qwen) or
tanh-GELU (Gemma)."""

from __future__ import annotations

import torch
from torch import nn

from appliance.layers.activation import GATE_ACTIVATIONS
from appliance.layers.linear import Linear, PackedLinear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, act: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj = PackedLinear(hidden_size, (("gate", intermediate_size), ("up", intermediate_size)), bias)
        self.act = GATE_ACTIVATIONS[act]()
        self.down_proj = Linear(intermediate_size, hidden_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.down_proj(self.act(self.gate_up_proj(x)))
