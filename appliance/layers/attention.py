"""Attention over the paged KV cache, and the metadata that describes one batch.

The model runner builds one `AttentionMetadata` per step and passes it explicitly down the
model (no module globals). Every layer first writes this step's K/V into its cache slots, then
attends over the whole context of each sequence (prefix-cache hits and earlier chunks included).
The decoder layers write K/V together with rotary (`RotaryEmbedding.rotate_and_store`, one fused
kernel on CUDA) and then call `Attention.attend`; `Attention.forward` stores and attends.
On CUDA tensors the Triton kernels run; on CPU the pure-torch references from kernels/ do.

KV-cache dtype: the model's dtype, or fp8 e4m3 (`engine.kv_cache_dtype = "fp8"`): caches hold
clamp(x / scale, ±448) and read back as fp8 * scale. The per-tensor scales are floats on each
`Attention` module (1.0 until calibration exists) and are passed to every kernel explicitly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from appliance_kernels import reference
from torch import nn

from appliance.errors import ConfigError

KV_CACHE_DTYPES = ("auto", "fp8")
FP8_KV_CACHE_DTYPE = torch.float8_e4m3fn


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the cache tensors: "auto" -> the model's, "fp8" -> float8_e4m3fn.

    fp8 runs on CPU through the torch references, and on CUDA on GPUs with fp8 conversions
    (compute capability 8.9+: Ada, Hopper and later); elsewhere it is refused here, at start.
    """
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype != "fp8":
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(f"engine.kv_cache_dtype = \"fp8\" needs a GPU of compute capability 8.9 or later, "
                          f"{torch.cuda.get_device_name(device)} is {torch.cuda.get_device_capability(device)}")
    return FP8_KV_CACHE_DTYPE


def short_decode_bound(num_seqs: int, num_kv_heads: int, max_model_len: int, device: torch.device) -> int | None:
    """For a decode CUDA graph of `num_seqs` rows, captured with max_seq_len = max_model_len: the
    max_seq_len a second graph of the size should be captured with for batches of short rows, or
    None when one graph serves every length alike.

    The GPU kernel caps a decode row's split-KV partitions by the batch's longest row (16 under
    `LONG_ROW_KEYS` keys, 64 from there: kernels/attention.py). A graph's grid cannot follow live
    lengths, so a small batch on a long-configured server gets two graphs: the short one (bound
    LONG_ROW_KEYS - 1) for batches whose rows are all shorter, the long one for the others. Only
    sizes whose partition count differs between the two bounds need it (1-2 rows of 8 KV heads on
    132 SMs). The CPU path does not split; it answers as the GPU would so CPU tests cover the choice."""
    from appliance_kernels import attention as triton_attention

    short = triton_attention.LONG_ROW_KEYS - 1
    if max_model_len <= short:
        return None
    pick = functools.partial(triton_attention.choose_num_splits, num_seqs, num_kv_heads, device=device)
    return short if pick(short) != pick(max_model_len) else None


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
    # The first num_decodes sequences have exactly one new token (decode rows first): in a mixed
    # batch the GPU kernel gives them decode tiles in a launch of their own.
    num_decodes: int = 0
    # Cascade decode (kernels/cascade_attention.py): every table starts with the blocks
    # cascade_prefix_blocks, whose first cascade_prefix_len tokens (a device int32 [1], so a CUDA
    # graph replays any length) are attended once for all queries. A decode-only batch; layers
    # with a sliding window ignore it (plain decode). use_cascade False: the fields are unused.
    use_cascade: bool = False
    cascade_prefix_blocks: torch.Tensor | None = None  # int32 [P], P * block_size >= the prefix
    cascade_prefix_len: torch.Tensor | None = None  # int32 [1]
    # int32 [B]: row b's share of the prefix (0: a row holding its own blocks); None: all of it.
    cascade_row_prefix_lens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.use_cascade and (self.cascade_prefix_blocks is None or self.cascade_prefix_len is None
                                 or not self.is_decode_only):
            raise ValueError("AttentionMetadata: use_cascade needs a decode-only batch, cascade_prefix_blocks and "
                             "cascade_prefix_len")


class Attention(nn.Module):
    """softmax(q k^T * scale) v with GQA over the paged cache; q/k/v already projected and rotated.

    k_scale / v_scale: the fp8 cache's per-tensor scales (stored = x / scale); unused (1.0) for a
    cache in the model's dtype. sliding_window: this layer sees only the last `sliding_window` keys
    of each query (itself included), as HF's sliding-window layers; None: the whole context.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 k_scale: float = 1.0, v_scale: float = 1.0, sliding_window: int | None = None) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
        self.sliding_window = sliding_window
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_scale = k_scale
        self.v_scale = v_scale
        # Set by the model runner only while it records a piecewise CUDA graph
        # (appliance/engine/piecewise.py): attend() hands the call to it, which cuts the graph there.
        self.cut: Callable[[Attention, torch.Tensor, tuple[torch.Tensor, torch.Tensor], AttentionMetadata],
                           torch.Tensor] | None = None

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [N, BS, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Store this step's k/v into their slots, then attend."""
        k_cache, v_cache = kv_cache
        if q.is_cuda:
            from appliance_kernels import attention as triton_attention

            triton_attention.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale=self.k_scale,
                                      v_scale=self.v_scale)
        else:
            reference.store_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        return self.attend(q, kv_cache, meta)

    def attend(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [N, BS, Hkv, D], this step's k/v already stored
        meta: AttentionMetadata,
        out: torch.Tensor | None = None,  # [T, Hq, D] like q: written in place (piecewise replay)
    ) -> torch.Tensor:  # [T, Hq, D]
        """Attend only: the caller has written this step's k/v (e.g. `RotaryEmbedding.rotate_and_store`)."""
        if self.cut is not None:
            return self.cut(self, q, kv_cache, meta)
        k_cache, v_cache = kv_cache
        if meta.use_cascade and self.sliding_window is None:
            result = self._attend_cascade(q, k_cache, v_cache, meta)
            return result if out is None else out.copy_(result)
        if q.is_cuda:
            from appliance_kernels import attention as triton_attention

            return triton_attention.paged_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                self.scale, max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len,
                is_decode_only=meta.is_decode_only, out=out, k_scale=self.k_scale, v_scale=self.v_scale,
                num_decodes=meta.num_decodes, sliding_window=self.sliding_window,
            )
        result = reference.paged_attention_ref(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, self.scale,
            self.k_scale, self.v_scale, self.sliding_window,
        )
        return result if out is None else out.copy_(result)

    def _attend_cascade(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata) -> torch.Tensor:
        """Decode attention with the batch's shared prefix attended once (Triton on CUDA, the torch
        reference on CPU)."""
        args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cascade_prefix_blocks,
                meta.cascade_prefix_len, self.scale)
        if q.is_cuda:
            from appliance_kernels import cascade_attention

            return cascade_attention.cascade_attention(*args, k_scale=self.k_scale, v_scale=self.v_scale,
                                                       row_prefix_lens=meta.cascade_row_prefix_lens)
        return reference.cascade_attention_ref(*args, self.k_scale, self.v_scale, meta.cascade_row_prefix_lens)
