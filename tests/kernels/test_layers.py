"""Fused RMSNorm, rotary embedding and SiLU/GELU-and-mul against their torch references.

CPU: Triton interpreter, float32, tiny shapes. CUDA: also bf16 at the issue's tolerance.
Hidden sizes that are not powers of two check the masking of the padded lanes.
"""

from __future__ import annotations

import pytest
import torch
from appliance_kernels import activation, norm, reference, rotary

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def randn(*shape: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(dtype).to(DEVICE)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the output: an element was not written"
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype: torch.dtype, hidden: int, with_residual: bool) -> None:
    g = torch.Generator().manual_seed(hidden)
    # x is a row slice of a wider buffer: the row stride is not the hidden size.
    x = randn(7, hidden + 8, dtype=dtype, generator=g)[:, :hidden]
    weight = randn(hidden, dtype=dtype, generator=g)
    residual = randn(7, hidden, dtype=dtype, generator=g) if with_residual else None
    out = torch.full((7, hidden), float("nan"), dtype=dtype, device=DEVICE)
    residual_out = torch.full_like(out, float("nan"))
    got, got_residual = norm.rms_norm(x, weight, 1e-5, residual, out=out, residual_out=residual_out)
    ref, ref_residual = reference.rms_norm_ref(x, weight, 1e-5, residual)
    assert got is out
    assert relative_error(got, ref) <= TOLERANCE[dtype]
    if with_residual:
        assert got_residual is residual_out
        assert relative_error(got_residual, ref_residual) <= TOLERANCE[dtype]
    else:
        assert got_residual is None


def test_rms_norm_updates_the_residual_in_place() -> None:
    g = torch.Generator().manual_seed(1)
    x = randn(3, 32, dtype=torch.float32, generator=g)
    residual = randn(3, 32, dtype=torch.float32, generator=g)
    ref, ref_residual = reference.rms_norm_ref(x, torch.ones(32, device=DEVICE), 1e-6, residual.clone())
    out, new_residual = norm.rms_norm(x, torch.ones(32, device=DEVICE), 1e-6, residual, residual_out=residual)
    assert new_residual is residual
    assert relative_error(residual, ref_residual) <= 1e-6 and relative_error(out, ref) <= 1e-5


def cos_sin_cache(max_pos: int, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim"), [(4, 2, 64), (3, 1, 24)])
def test_rotary_matches_reference(dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    g = torch.Generator().manual_seed(head_dim)
    tokens = 6
    # q and k as views of one fused qkv projection, as the attention layer hands them over.
    qkv = randn(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, generator=g)
    q = qkv[:, : num_q_heads * head_dim].view(tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_kv_heads) * head_dim].view(tokens, num_kv_heads, head_dim)
    positions = torch.tensor([0, 5, 1, 63, 17, 2], device=DEVICE)
    cache = cos_sin_cache(64, head_dim)
    q_out = torch.full((tokens, num_q_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    k_out = torch.full((tokens, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    q_ref, k_ref = reference.rotary_ref(positions, q, k, cache)
    before = qkv.clone()
    rotary.rotary_embedding(positions, q, k, cache, q_out=q_out, k_out=k_out)
    assert relative_error(q_out, q_ref) <= TOLERANCE[dtype]
    assert relative_error(k_out, k_ref) <= TOLERANCE[dtype]
    assert torch.equal(qkv, before)  # out of place by default: the inputs are untouched


def test_rotary_in_place() -> None:
    g = torch.Generator().manual_seed(2)
    q = randn(4, 2, 32, dtype=torch.float32, generator=g)
    k = randn(4, 1, 32, dtype=torch.float32, generator=g)
    positions = torch.tensor([3, 0, 9, 9], device=DEVICE)
    cache = cos_sin_cache(16, 32)
    q_ref, k_ref = reference.rotary_ref(positions, q, k, cache)
    q_got, k_got = rotary.rotary_embedding(positions, q, k, cache, q_out=q, k_out=k)
    assert q_got is q and k_got is k
    assert relative_error(q, q_ref) <= 1e-6 and relative_error(k, k_ref) <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [64, 1500])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, intermediate: int) -> None:
    g = torch.Generator().manual_seed(intermediate)
    x = randn(5, 2 * intermediate, dtype=dtype, generator=g)
    out = torch.full((5, intermediate), float("nan"), dtype=dtype, device=DEVICE)
    activation.silu_and_mul(x, out=out)
    assert relative_error(out, reference.silu_and_mul_ref(x)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [64, 1500])
def test_gelu_tanh_and_mul_matches_reference(dtype: torch.dtype, intermediate: int) -> None:
    g = torch.Generator().manual_seed(intermediate + 1)
    x = randn(5, 2 * intermediate, dtype=dtype, generator=g) * 3  # into tanh's curved range
    out = torch.full((5, intermediate), float("nan"), dtype=dtype, device=DEVICE)
    activation.gelu_tanh_and_mul(x, out=out)
    ref = reference.gelu_tanh_and_mul_ref(x)
    assert relative_error(out, ref) <= TOLERANCE[dtype]
    assert relative_error(reference.silu_and_mul_ref(x), ref) > 1e-2  # not the other activation


def test_launchers_reject_bad_inputs() -> None:
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        norm.rms_norm(x, torch.ones(4, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        norm.rms_norm(x, torch.ones(8, device=DEVICE), 1e-6, torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[T, 2 \* I\]"):
        activation.silu_and_mul(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        activation.silu_and_mul(x, out=torch.empty(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary.rotary_embedding(torch.zeros(2, dtype=torch.int64, device=DEVICE), x.view(2, 1, 8), x.view(2, 1, 8),
                                torch.zeros(4, 6, device=DEVICE))
