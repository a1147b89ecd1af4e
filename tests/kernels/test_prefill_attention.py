"""The Hopper-shaped prefill kernel (kernels/prefill_attention.py) against the torch reference.

Tiny tiles (16 rows x 16 keys) make a few hundred keys of context walk all three key ranges of a
program: window-masked, unmasked and diagonal. Under the interpreter everything runs in float32;
with CUDA the same cases also run in bfloat16 with the production tile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
from appliance_kernels import attention
from appliance_kernels.fp8 import FP8_DTYPE

from .test_attention import (
    CUDA,
    DTYPES,
    TOLERANCE,
    free_out_of_window,
    make_batch,
    reference_attention,
    relative_error,
)

TINY_TILE = {"rows": 16, "block_n": 16, "num_warps": 4, "num_stages": 2}
TINY_TMA_TILE = {**TINY_TILE, "tma": 1}  # K/V tiles as tensor-descriptor boxes: needs block_size % 16 == 0
TILES = [TINY_TILE, pytest.param(None, marks=pytest.mark.skipif(not CUDA, reason="production tile: GPU only"))]
# (new tokens per sequence, context before them): fresh prompts, chunks after long contexts, a
# one-token chunk, a chunk that is not a multiple of the tile.
LONG = ([24, 13, 1, 17], [0, 101, 40, 150])


def run(batch, scale: float, tile: dict[str, int] | None, **kwargs: object) -> torch.Tensor:
    out = torch.full_like(batch.q, float("nan"))
    attention.paged_prefill_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale,
        max_query_len=batch.max_query_len, out=out, tile=tile, **kwargs)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim"), [(8, 2, 32), (6, 2, 48), (2, 2, 64), (4, 1, 160)])
def test_prefill_kernel_matches_reference(dtype: torch.dtype, tile: dict[str, int] | None, num_q_heads: int,
                                          num_kv_heads: int, head_dim: int) -> None:
    generator = torch.Generator().manual_seed(zlib.crc32(repr((num_q_heads, head_dim)).encode()))
    batch = make_batch(*LONG, num_q_heads, num_kv_heads, head_dim, 16, dtype, generator)
    scale = head_dim**-0.5
    assert relative_error(run(batch, scale, tile), reference_attention(batch, scale)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 7, 20, 70, 1000])
def test_prefill_kernel_sliding_window_never_reads_freed_blocks(dtype: torch.dtype, window: int) -> None:
    generator = torch.Generator().manual_seed(window)
    full = make_batch(*LONG, 4, 2, 32, 8, dtype, generator)
    batch, freed = free_out_of_window(full, window)
    assert freed > 0 or window == 1000
    ref = reference_attention(full, 0.2, sliding_window=window)
    assert relative_error(run(batch, 0.2, TINY_TILE, sliding_window=window), ref) <= TOLERANCE[dtype]


def test_prefill_kernel_reads_fp8_caches_with_their_scales() -> None:
    generator = torch.Generator().manual_seed(5)
    batch = make_batch(*LONG, 4, 2, 32, 16, torch.float32, generator, cache_dtype=FP8_DTYPE)
    ref = reference_attention(batch, 0.2, 0.5, 2.0)
    assert relative_error(run(batch, 0.2, TINY_TILE, k_scale=0.5, v_scale=2.0), ref) <= 1e-4


def test_long_chunks_of_a_mixed_batch_take_the_prefill_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the public launcher: decode rows in their own launch, the long chunks here."""
    calls: list[int] = []
    original = attention.launch_prefill

    def counting(*args: object, **kwargs: object) -> None:
        calls.append(int(kwargs["seq_end"]) - int(kwargs["seq_start"]))  # type: ignore[call-overload]
        original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(attention, "LONG_PREFILL_MIN_QUERY_TOKENS", 16)
    monkeypatch.setattr(attention, "launch_prefill", counting)
    generator = torch.Generator().manual_seed(9)
    batch = make_batch([1, 1, 30, 5], [200, 3, 90, 0], 4, 2, 32, 16, torch.float32, generator)
    out = torch.full_like(batch.q, float("nan"))
    attention.paged_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.2,
        max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len, out=out, num_decodes=2,
        sliding_window=50)
    assert calls == [2]  # the two prefill sequences, in one launch
    assert relative_error(out, reference_attention(batch, 0.2, sliding_window=50)) <= 1e-4


def poison_unwritten_slots(batch):  # noqa: ANN001, ANN201 (a PagedBatch)
    """NaN in every slot past each sequence's length in its last block (and in spare blocks): a TMA
    box reads whole tiles, and nothing of those rows may reach the output."""
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    block_size = k_cache.shape[1]
    used = set()
    for b, seq_len in enumerate(batch.seq_lens.tolist()):
        num_blocks = -(-seq_len // block_size)
        last = int(batch.block_tables[b, num_blocks - 1])
        k_cache[last, seq_len - (num_blocks - 1) * block_size:] = float("nan")
        v_cache[last, seq_len - (num_blocks - 1) * block_size:] = float("nan")
        used.update(int(x) for x in batch.block_tables[b, :num_blocks])
    for block in set(range(k_cache.shape[0])) - used:
        k_cache[block] = v_cache[block] = float("nan")
    return type(batch)(batch.q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                       batch.max_query_len, batch.max_seq_len)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 7, 40])
@pytest.mark.parametrize("block_size", [16, 32])
def test_tma_tiles_match_reference_and_never_use_unwritten_slots(dtype: torch.dtype, window: int | None,
                                                                 block_size: int) -> None:
    generator = torch.Generator().manual_seed(block_size + (window or 0))
    full = make_batch(*LONG, 4, 2, 32, block_size, dtype, generator)
    batch = poison_unwritten_slots(full)
    if window is not None:
        batch, _ = free_out_of_window(batch, window)
    ref = reference_attention(full, 0.2, sliding_window=window)
    assert relative_error(run(batch, 0.2, TINY_TMA_TILE, sliding_window=window), ref) <= TOLERANCE[dtype]


def test_tma_tile_is_refused_when_a_page_does_not_hold_whole_key_tiles() -> None:
    batch = make_batch([5], [3], 4, 2, 32, 8, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="TMA needs block_size"):
        run(batch, 0.2, TINY_TMA_TILE)


def test_switch_and_tile_come_from_the_environment_at_import() -> None:
    """The daemon is started with the overrides (bench/longctx.py's engine phase): a fresh import
    reads them; a bad value fails the import instead of serving with a default."""
    code = ("from appliance_kernels import attention, prefill_attention as p; "
            "print(attention.LONG_PREFILL_MIN_QUERY_TOKENS, p.TILE)")
    tile = '{"rows": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}'
    env = {**os.environ, "APPLIANCE_LONG_PREFILL_MIN_QUERY_TOKENS": "512", "APPLIANCE_PREFILL_TILE": tile}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == f"512 {json.loads(tile)}"
    env["APPLIANCE_LONG_PREFILL_MIN_QUERY_TOKENS"] = "lots"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "APPLIANCE_LONG_PREFILL_MIN_QUERY_TOKENS='lots'" in bad.stderr


@pytest.mark.parametrize(("text", "want"), [("", 7), ("  ", 7), ("off", None), ("None", None), ("1024", 1024)])
def test_min_query_tokens_from_env(monkeypatch: pytest.MonkeyPatch, text: str, want: int | None) -> None:
    from appliance_kernels import prefill_attention

    monkeypatch.setenv(prefill_attention.ENV_MIN_QUERY_TOKENS, text)
    assert prefill_attention.min_query_tokens_from_env(default=7) == want


@pytest.mark.parametrize("text", ["0", "-3", "1e3", "yes"])
def test_min_query_tokens_from_env_refuses_nonsense(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    from appliance_kernels import prefill_attention

    monkeypatch.setenv(prefill_attention.ENV_MIN_QUERY_TOKENS, text)
    with pytest.raises(ValueError, match="integer >= 1 or 'off'"):
        prefill_attention.min_query_tokens_from_env(default=None)


@pytest.mark.parametrize("text", ['{"rows": 128}', '{"rows": 96, "block_n": 64, "num_warps": 8, "num_stages": 3}',
                                  '{"rows": 128, "block_n": 64, "num_warps": 8, "num_stages": 0}',
                                  '{"rows": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "tma": 2}',
                                  '{"rows": 128, "block_n": 64, "num_warps": 8, "num_stages": 3, "x": 1}', "128x64"])
def test_tile_from_env_refuses_what_the_launcher_cannot_take(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    from appliance_kernels import prefill_attention

    monkeypatch.setenv(prefill_attention.ENV_TILE, text)
    with pytest.raises(ValueError, match="APPLIANCE_PREFILL_TILE"):
        prefill_attention.tile_from_env(prefill_attention.DEFAULT_TILE)
