"""The fused rotary + KV-cache write against its reference composition (rotary_ref, then
store_kv_ref), in float32 and float16 under the interpreter on CPU (bf16 on CUDA too), with
bf16/fp16/fp32 and fp8 (e4m3) caches, padding slots, and k/v as views of one qkv projection."""

from __future__ import annotations

import pytest
import torch
from appliance_kernels import reference, rotary_kv
from appliance_kernels.fp8 import FP8_DTYPE

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]


def cos_sin_cache(max_pos: int, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)


def qkv_views(tokens: int, hq: int, hkv: int, d: int, dtype: torch.dtype, g: torch.Generator, spread: float = 1.0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv = (spread * torch.randn((tokens, (hq + 2 * hkv) * d), generator=g)).to(dtype).to(DEVICE)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(tokens, hkv, d)
    return q, k, v


def run_both(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
             cache_dtype: torch.dtype, block_size: int, num_blocks: int, **scales: float
             ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(fused q, reference q, [fused k/v caches, reference k/v caches]); caches start NaN-poisoned."""
    shape = (num_blocks, block_size, k.shape[1], k.shape[2])
    caches = [torch.full(shape, float("nan"), device=DEVICE).to(cache_dtype) for _ in range(4)]
    cs = cos_sin_cache(64, q.shape[2])
    q_out = torch.full_like(q, float("nan"))
    got = rotary_kv.rotary_store_kv(positions, q, k, v, caches[0], caches[1], slots, cs, q_out=q_out, **scales)
    assert got is q_out
    want = reference.rotary_store_kv_ref(positions, q, k, v, caches[2], caches[3], slots, cs, **scales)
    return got, want, caches


TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("hq", "hkv", "d", "block_size"), [(4, 2, 16, 4), (3, 1, 24, 16), (6, 3, 64, 8)])
def test_fused_matches_rotary_then_store_kv(dtype: torch.dtype, hq: int, hkv: int, d: int, block_size: int) -> None:
    g = torch.Generator().manual_seed(hq * 100 + d)
    tokens, num_blocks = 9, 5
    q, k, v = qkv_views(tokens, hq, hkv, d, dtype, g)
    positions = torch.tensor([0, 5, 1, 63, 17, 2, 40, 41, 9], device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[[2, 6]] = -1  # padding tokens: rotated q still written, nothing stored
    got, want, caches = run_both(q, k, v, positions, slots.to(DEVICE), dtype, block_size, num_blocks)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for fused, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(fused, ref, rtol=tol, atol=tol, equal_nan=True)
    written = ~caches[0].isnan().all(-1).all(-1)  # [N, BS]: slots that hold a token
    assert int(written.sum()) == tokens - 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_into_fp8_cache(dtype: torch.dtype) -> None:
    """fp8 caches: x / scale saturated to ±448, padding untouched, no NaN, as the reference stores.

    NOTE: the Triton interpreter (3.7) rounds fp32 -> fp8 wrongly (half up, and a mantissa carry
    at a binade edge is lost: 31.9 -> 16), while its fp8 loads are exact. On CPU the inputs are
    therefore fp8 values times the scale, some far out of range, at position 0 (cos 1, sin 0), so
    every stored value is exact and the kernel's scaling, clamping and slot logic are checked bit
    for bit; with CUDA the hardware rounds (RNE, as torch) and random rotated values are checked.
    """
    g = torch.Generator().manual_seed(42)
    tokens, hq, hkv, d, block_size, num_blocks = 7, 4, 2, 32, 4, 4
    k_scale, v_scale = 2.0, 0.5
    if CUDA:
        q, k, v = qkv_views(tokens, hq, hkv, d, dtype, g, spread=2000.0)
        positions = torch.randint(0, 64, (tokens,), generator=g).to(DEVICE)
    else:
        q, k, v = qkv_views(tokens, hq, hkv, d, dtype, g)
        for x, scale in ((k, k_scale), (v, v_scale)):
            exact = (torch.randn(x.shape, generator=g) * 100).to(FP8_DTYPE).float() * scale
            exact[:, :, :3] = torch.tensor([1000.0, -1000.0, 600.0]) * scale  # saturate at ±448
            x.copy_(exact.to(dtype))
        positions = torch.zeros(tokens, dtype=torch.int64)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[3] = -1
    got, want, caches = run_both(q, k, v, positions, slots.to(DEVICE), FP8_DTYPE, block_size, num_blocks,
                                 k_scale=k_scale, v_scale=v_scale)
    tol = TOLERANCE[dtype]
    # On CUDA the values reach ~2000: the fused and torch rotations may round (FMA) differently
    # by an fp32 ulp of that size (3e-5 seen on an H100), far below any fp8 step.
    torch.testing.assert_close(got, want, rtol=max(tol, 1e-4), atol=tol * (2000.0 if CUDA else 1.0))
    written = ~caches[0].float().isnan().all(-1).all(-1)
    assert int(written.sum()) == tokens - 1
    for fused, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        stored = fused.float()[written]
        assert not stored.isnan().any() and stored.abs().max() == 448.0
        if CUDA:  # one fp8 step (12.5%) where the fused and torch rotations round differently
            torch.testing.assert_close(fused.float(), ref.float(), rtol=0.13, atol=1e-2, equal_nan=True)
        else:
            assert torch.equal(fused.view(torch.uint8), ref.view(torch.uint8))


def test_fused_in_place_and_empty_batch() -> None:
    g = torch.Generator().manual_seed(5)
    q, k, v = qkv_views(4, 2, 1, 8, torch.float32, g)
    q = q.contiguous()  # in place needs a contiguous q
    positions = torch.tensor([3, 1, 0, 7], device=DEVICE)
    slots = torch.tensor([0, 1, 2, 3], device=DEVICE)
    cs = cos_sin_cache(8, 8)
    caches = [torch.zeros((1, 4, 1, 8), device=DEVICE) for _ in range(4)]
    want = reference.rotary_store_kv_ref(positions, q.clone(), k, v, caches[2], caches[3], slots, cs)
    got = rotary_kv.rotary_store_kv(positions, q, k, v, caches[0], caches[1], slots, cs, q_out=q)
    assert got is q
    torch.testing.assert_close(q, want, rtol=0, atol=1e-6)
    none = torch.empty((0,), dtype=torch.int64, device=DEVICE)
    out = rotary_kv.rotary_store_kv(none, q[:0], k[:0], v[:0], caches[0], caches[1], none, cs)
    assert out.shape == (0, 2, 8)


def test_fused_launcher_rejects_bad_inputs() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = qkv_views(3, 4, 2, 16, torch.float32, g)
    positions = torch.arange(3, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    cs = cos_sin_cache(8, 16)
    kc, vc = torch.zeros((2, 4, 2, 16), device=DEVICE), torch.zeros((2, 4, 2, 16), device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping"):
        rotary_kv.rotary_store_kv(positions, q, k, v, kc, vc, slots[:2], cs)
    with pytest.raises(TypeError, match="caches"):
        rotary_kv.rotary_store_kv(positions, q, k, v, kc.half(), vc.half(), slots, cs)
    with pytest.raises(ValueError, match="fp8 cache only"):
        rotary_kv.rotary_store_kv(positions, q, k, v, kc, vc, slots, cs, k_scale=2.0)
    with pytest.raises(ValueError, match="positive finite"):
        rotary_kv.rotary_store_kv(positions, q, k, v, kc.to(FP8_DTYPE), vc.to(FP8_DTYPE), slots, cs, v_scale=0.0)
    with pytest.raises(ValueError, match="caches must both be"):
        rotary_kv.rotary_store_kv(positions, q, k, v, kc[:, :, :1], vc[:, :, :1], slots, cs)
