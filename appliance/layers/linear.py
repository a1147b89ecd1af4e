"""Linear layers, including packed ones that hold several HF projections in one matmul.

`PackedLinear` concatenates the outputs of several checkpoint projections along the output dim
(q/k/v into qkv_proj, gate/up into gate_up_proj): one GEMM instead of three or two. It knows where
each named shard lives so checkpoint weights load into the right rows and `unpack` gives them
back under their HF names.

Weights are allocated uninitialized (`torch.empty`): they are always overwritten by a checkpoint
or by the dummy initializer, and skipping init keeps an 8B model's construction instant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b). W: [out_features, in_features]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedLinear(Linear):
    """Several projections of the same input stacked along the output dim.

    shards: (name, out_features) in output order, e.g. (("q", 576), ("k", 192), ("v", 192)).
    """

    def __init__(self, in_features: int, shards: tuple[tuple[str, int], ...], bias: bool = False) -> None:
        super().__init__(in_features, sum(size for _, size in shards), bias)
        self.shard_slices: dict[str, slice] = {}
        start = 0
        for name, size in shards:
            self.shard_slices[name] = slice(start, start + size)
            start += size

    def load_shard(self, param_name: str, shard: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint projection (`param_name` "weight" or "bias") into its rows."""
        param = getattr(self, param_name)
        if param is None:
            raise ValueError(f"this layer has no {param_name}")
        rows = param.data[self.shard_slices[shard]]
        if rows.shape != tensor.shape:
            raise ValueError(f"shard {shard!r} {param_name}: expected {tuple(rows.shape)}, got {tuple(tensor.shape)}")
        rows.copy_(tensor)

    def unpack(self, param_name: str) -> dict[str, torch.Tensor]:
        param = getattr(self, param_name)
        return {shard: param.data[rows] for shard, rows in self.shard_slices.items()}
