"""Attention over the paged KV cache, and the metadata that describes one batch.

The model runner builds one `AttentionMetadata` per step and passes it explicitly down the
model (no module globals). Every layer first writes this step's K/V into its cache slots, then
attends over the whole context of each sequence (prefix-cache hits and earlier chunks included).
On CUDA tensors the Triton kernels run; on CPU the pure-torch references from kernels/ do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from appliance_kernels import reference


@dataclass
class AttentionMetadata:
    """One batch of T new tokens from B sequences (see kernels/reference.py for the layout)."""

    slot_mapping: torch.Tensor  # int64 [T]; -1 = padding token (CUDA graph replay), not stored
    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B], context length including this step's tokens
    block_tables: torch.Tensor  # int32 [B, max_blocks_per_seq]
    max_query_len: int
    max_seq_len: int
    # True when every sequence contributes exactly one token (lets GPU kernels pick a decode path).
    is_decode_only: bool = False


class Attention(nn.Module):
    """softmax(q k^T * scale) v with GQA over the paged cache; q/k/v already projected and rotated."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [N, BS, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, Hq, D]
        k_cache, v_cache = kv_cache
        if q.is_cuda:
            from appliance_kernels import attention as triton_attention

            triton_attention.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            return triton_attention.paged_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                self.scale, max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
                is_decode_only=meta.is_decode_only,
            )
        reference.store_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping)
        return reference.paged_attention_ref(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, self.scale
        )
