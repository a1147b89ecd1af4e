"""Input checks shared by the kernel launchers: clear errors before a bad launch corrupts memory."""

from __future__ import annotations

import torch


def check_same_device(op: str, *tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{op}: every tensor must be on {device}, found one on {t.device}")


def check_out(op: str, name: str, out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A caller-given output buffer (checked), or a fresh contiguous one shaped like `like`."""
    if out is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"{op}: {name} must be a contiguous {like.dtype} {tuple(like.shape)} on {like.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})")
    return out
