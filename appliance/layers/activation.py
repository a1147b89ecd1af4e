"""SiLU-and-multiply, the gate of SwiGLU MLPs."""

from __future__ import annotations

import torch
from torch import nn

from appliance.layers import dispatch


class SiluAndMul(nn.Module):
    """x: [T, 2 * I] = cat(gate, up) -> silu(gate) * up: [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.silu_and_mul(x)
