"""Greedy argmax kernel against torch.argmax: ties, NaN, -inf, padded vocab, strided rows."""

from __future__ import annotations

import pytest
import torch
from appliance_kernels import sampling

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="bf16 loads need CUDA"))]


def _check(logits: torch.Tensor) -> None:
    got = sampling.argmax(logits.to(DEVICE))
    assert got.dtype == torch.int32
    want = logits.float().argmax(dim=-1)
    assert got.cpu().tolist() == want.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 5, 2048, 2049, 5000])
def test_argmax_matches_torch(dtype: torch.dtype, vocab: int) -> None:
    g = torch.Generator().manual_seed(vocab)
    _check(torch.randn((3, vocab), generator=g).to(dtype))


def test_argmax_ties_nan_and_masked_rows() -> None:
    vocab = 4500  # three chunks, the last one partial
    x = torch.full((5, vocab), -1.0)
    x[0, [7, 2100, 4400]] = 3.0  # a tie across chunks: the first index wins
    x[1, [4400, 4401]] = 2.0  # a tie inside the last, partial chunk
    x[2] = float("-inf")  # everything masked (e.g. min_tokens on a tiny vocab): index 0, as torch
    x[3, 3000] = float("nan")  # NaN counts as the largest, as torch
    x[3, 10] = float("inf")
    x[4, vocab - 1] = 0.5  # the very last entry
    _check(x)


def test_argmax_strided_rows_and_empty() -> None:
    wide = torch.randn((4, 3000), generator=torch.Generator().manual_seed(1))
    _check(wide[:, :2500])  # rows with a stride larger than the vocab (a padded lm head)
    assert sampling.argmax(torch.empty((0, 10), device=DEVICE)).shape == (0,)


def test_argmax_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        sampling.argmax(torch.zeros(4, device=DEVICE))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        sampling.argmax(torch.zeros((2, 4), dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        sampling.argmax(torch.zeros((4, 2), device=DEVICE).T)
