"""RMSNorm (Llama/Qwen, and Gemma's 1 + weight form), optionally fused with the residual add that
precedes it."""

from __future__ import annotations

import torch
from torch import nn

from appliance.layers import dispatch


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight (fp32 math).

    forward(x) -> y. forward(x, residual) -> (norm(x + residual), x + residual): the decoder layers
    carry the un-normalized residual stream this way so the add fuses into the norm kernel.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])  # the kernels take [T, H]; q/k norms pass [T, heads, D]
        scale = self.kernel_weight()
        if residual is None:
            normed, _ = dispatch.rms_norm(x2d, scale, self.eps)
            return normed.view(shape)
        normed, summed = dispatch.rms_norm(x2d, scale, self.eps, residual.reshape(-1, shape[-1]))
        assert summed is not None
        return normed.view(shape), summed.view(shape)

    def kernel_weight(self) -> torch.Tensor:  # [H]: what the normalized rows are multiplied by
        return self.weight


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: y = x / rms(x) * (1 + weight), with `weight` as checkpoints store it (zero
    means identity) and the product taken in fp32 before the cast, as HF does.

    NOTE: 1 + weight is formed in fp32 on every call (one tiny op): a bf16 copy of it would round
    the scale that HF keeps in fp32.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        with torch.no_grad():
            self.weight.zero_()

    def kernel_weight(self) -> torch.Tensor:
        return 1.0 + self.weight.float()
