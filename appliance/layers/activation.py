"""Activation-and-multiply, the gate of gated MLPs: SiLU (SwiGLU) and tanh-GELU (GeGLU)."""

from __future__ import annotations

import torch
from torch import nn

from appliance.layers import dispatch


class SiluAndMul(nn.Module):
    """x: [T, 2 * I] = cat(gate, up) -> silu(gate) * up: [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    """x: [T, 2 * I] = cat(gate, up) -> gelu(gate, approximate="tanh") * up: [T, I] (Gemma's
    `gelu_pytorch_tanh`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.gelu_tanh_and_mul(x)


# HF `hidden_act` / `hidden_activation` names -> the gate module.
GATE_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": SiluAndMul, "swish": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul,
}
