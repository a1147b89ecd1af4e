"""Pure-torch references for every kernel. They are also the CPU path of the engine.

Paged KV cache layout (one per layer, K and V separate):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A token at position p of a sequence lives in block block_table[p // block_size], row p % block_size;
its flat slot is block_id * block_size + p % block_size.

A batch is "varlen": the new (query) tokens of all sequences are concatenated along dim 0.
    query_start_loc: int32 [B + 1]  cumulative query lengths (decode rows have length 1)
    seq_lens:        int32 [B]      context length of each sequence *including* this step's tokens
    block_tables:    int32 [B, max_blocks_per_seq]  (unused entries are ignored)
Query token i of sequence b sits at position seq_lens[b] - q_len[b] + i and attends causally to
positions 0..that position. With a sliding window W (a per-layer setting: Mistral v0.1, Gemma 2/3's
local layers) it sees only the last W of them: positions p with q_pos - W < p <= q_pos, as HF's
`sliding_window_overlay`. Block-table entries wholly before every window of a sequence may be -1
(the block manager freed them); they are never read.

A cache may be float8_e4m3fn (kv_cache_dtype = "fp8"): it holds clamp(x / scale, ±448) and reads
back as fp8 * scale, with per-tensor floats k_scale / v_scale (see kernels/fp8.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = 448.0


def to_cache_dtype(x: torch.Tensor, cache_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """x as the cache stores it: cast, or for fp8 divided by `scale` and saturated to ±448 (never NaN)."""
    if cache_dtype == _FP8_DTYPE:
        return (x.float() / scale).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8_DTYPE)
    return x.to(cache_dtype)


def from_cache(cache_rows: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Cache rows as fp32 values: fp8 rows times their scale, others as they are."""
    if cache_rows.dtype == _FP8_DTYPE:
        return cache_rows.float() * scale
    return cache_rows.float()


def store_kv_ref(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, BS, Hkv, D]
    v_cache: torch.Tensor,  # [N, BS, Hkv, D]
    slot_mapping: torch.Tensor,  # int64 [T]; -1 marks a padding token that is not stored
    k_scale: float = 1.0,  # fp8 caches only
    v_scale: float = 1.0,
) -> None:
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = to_cache_dtype(k[valid], k_cache.dtype,
                                                                                          k_scale)
    v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = to_cache_dtype(v[valid], v_cache.dtype,
                                                                                          v_scale)


def paged_attention_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, BS, Hkv, D]
    v_cache: torch.Tensor,  # [N, BS, Hkv, D]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    seq_lens: torch.Tensor,  # int32 [B]
    query_start_loc: torch.Tensor,  # int32 [B + 1]
    scale: float,
    k_scale: float = 1.0,  # fp8 caches: dequantisation scales
    v_scale: float = 1.0,
    sliding_window: int | None = None,  # keys per query incl. itself; None = the whole context
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each sequence's new tokens over its paged context (fp32 math)."""
    num_q_heads = q.shape[1]
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        # Keys from the first row's window start on: the blocks before it may be freed (-1).
        first = 0 if sliding_window is None else max(0, seq_len - q_len - sliding_window + 1)
        first_block = first // block_size
        blocks = block_tables[b, first_block:num_blocks].long()
        skip = first - first_block * block_size
        keys = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[skip : seq_len - first_block * block_size]
        values = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[skip : seq_len - first_block * block_size]
        qb = q[q_start:q_end].float().transpose(0, 1)  # [Hq, L, D]
        kb = from_cache(keys, k_scale).transpose(0, 1)  # [Hkv, S, D]; GQA is expanded inside SDPA
        vb = from_cache(values, v_scale).transpose(0, 1)
        if q_len == 1 and sliding_window is None:
            mask = None  # a decode row sees its whole context
        else:
            # Causal: query i (position seq_len - q_len + i) sees keys first..seq_len - q_len + i.
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
            k_pos = torch.arange(first, seq_len, device=q.device).unsqueeze(0)
            mask = k_pos <= q_pos  # [L, S]
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        out[q_start:q_end] = ob.transpose(0, 1).to(q.dtype)
    return out


def cascade_attention_ref(
    q: torch.Tensor,  # [B, Hq, D]: one new token per sequence
    k_cache: torch.Tensor,  # [N, BS, Hkv, D]
    v_cache: torch.Tensor,  # [N, BS, Hkv, D]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]; each row starts with the prefix's blocks
    seq_lens: torch.Tensor,  # int32 [B]
    prefix_blocks: torch.Tensor,  # int32 [P]: the shared prefix's block ids
    prefix_len: torch.Tensor | int,  # shared tokens (<= P * BS)
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    row_prefix_lens: torch.Tensor | None = None,  # int32 [B]: row b shares only its first ones
) -> torch.Tensor:  # [B, Hq, D]
    """Decode attention split at `prefix_len` (kernels/cascade_attention.py's contract, fp32 math):
    the shared prefix's keys against all B queries at once (each row sees keys below its seq_len
    and its share, `row_prefix_lens[b]`, default prefix_len), each sequence's keys [share, seq_len)
    alone, and the two softmax parts merged by their
    log-sum-exp. Equals `paged_attention_ref` of the same decode batch."""
    num_seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    prefix = int(prefix_len)
    lens = seq_lens.tolist()
    shares = [prefix] * num_seqs if row_prefix_lens is None else row_prefix_lens.tolist()
    qf = q.float().view(num_seqs, num_kv_heads, group, head_dim) * scale
    num_prefix_blocks = -(-prefix // block_size)
    blocks = prefix_blocks[:num_prefix_blocks].long()
    pk = from_cache(k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:prefix], k_scale)  # [L, Hkv, D]
    pv = from_cache(v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:prefix], v_scale)
    scores = torch.einsum("bhgd,lhd->bhgl", qf, pk)
    ends = torch.tensor([min(n, p) for n, p in zip(lens, shares, strict=True)], device=q.device)
    seen = torch.arange(prefix, device=q.device)[None, :] < ends[:, None]  # [B, L]
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    lse_prefix = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G]; -inf where a row sees no prefix key
    out_prefix = torch.einsum("bhgl,lhd->bhgd", torch.softmax(scores, dim=-1).nan_to_num(0.0), pv)
    out = torch.empty_like(q)
    for b, seq_len in enumerate(lens):
        first = min(shares[b], seq_len)
        first_block = first // block_size
        table = block_tables[b, first_block : -(-seq_len // block_size)].long()
        rows = slice(first - first_block * block_size, seq_len - first_block * block_size)
        keys = from_cache(k_cache[table].reshape(-1, num_kv_heads, head_dim)[rows], k_scale)  # [S, Hkv, D]
        values = from_cache(v_cache[table].reshape(-1, num_kv_heads, head_dim)[rows], v_scale)
        s = torch.einsum("hgd,shd->hgs", qf[b], keys)
        lse_suffix = torch.logsumexp(s, dim=-1)  # [Hkv, G]; -inf for an empty suffix
        out_suffix = torch.einsum("hgs,shd->hgd", torch.softmax(s, dim=-1).nan_to_num(0.0), values)
        lse = torch.logaddexp(lse_prefix[b], lse_suffix)
        merged = (out_prefix[b] * torch.exp(lse_prefix[b] - lse)[..., None]
                  + out_suffix * torch.exp(lse_suffix - lse)[..., None])
        out[b] = merged.nan_to_num(0.0).reshape(num_q_heads, head_dim).to(q.dtype)
    return out


def rms_norm_ref(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm with fp32 math. With a residual: h = x + residual; returns (norm(h), h)."""
    dtype = x.dtype
    h = x.float()
    if residual is not None:
        h = h + residual.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(dtype), (h.to(dtype) if residual is not None else None)


def rotary_ref(
    positions: torch.Tensor,  # int64 [T]
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # fp32 [max_pos, D] = cat(cos[:, :D/2], sin[:, :D/2])
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rotary embedding, as Llama/Qwen in HF apply it."""
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions]  # [T, D]
    cos = cs[:, :half].unsqueeze(1)
    sin = cs[:, half:].unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_store_kv_ref(
    positions: torch.Tensor,  # int64 [T]
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, BS, Hkv, D]
    v_cache: torch.Tensor,  # [N, BS, Hkv, D]
    slot_mapping: torch.Tensor,  # int64 [T]; -1 marks a padding token that is not stored
    cos_sin_cache: torch.Tensor,  # fp32 [max_pos, D]
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:  # rotated q [T, Hq, D]
    """Rotary on q and k, then rotated k and (unrotated) v into their cache slots: the fused kernel's
    contract, and the CPU path of the layers (the same ops in the same order as before the fusion)."""
    q, k = rotary_ref(positions, q, k, cos_sin_cache)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:  # x: [T, 2 * I] -> [T, I]
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:  # x: [T, 2 * I] -> [T, I]
    gate, up = x.chunk(2, dim=-1)
    return (F.gelu(gate.float(), approximate="tanh") * up.float()).to(x.dtype)
