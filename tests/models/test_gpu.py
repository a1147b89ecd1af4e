"""The models on a GPU (Triton kernels in every layer). Skipped without CUDA.

- A tiny model (and the Gemma 3 270M shape) gives the same logits on CUDA (Triton
  norm/rotary/activation/attention) as on CPU (torch references) with the same weights, through a
  mixed prefill + decode batch.
- The 8B Llama-3.1 shape with dummy bf16 weights builds on the GPU and agrees with HF
  transformers (sharing our weight storage, no copy) on the last-token logits.
"""

from __future__ import annotations

import time

import pytest
import torch

from appliance.config import ModelConfig
from appliance.layers.attention import AttentionMetadata
from appliance.models.loader import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _batch(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, prompt_lens: list[int],
           block_size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list, AttentionMetadata]:
    """A prefill batch of several sequences over a fresh paged cache with shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in prompt_lens]
    pool = torch.randperm(sum(blocks_needed) + 4, generator=gen).tolist()
    tables, slots, positions, starts = [], [], [], [0]
    for n, need in zip(prompt_lens, blocks_needed, strict=True):
        table = [pool.pop() for _ in range(need)]
        tables.append(table + [0] * (max(blocks_needed) - need))
        for pos in range(n):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            positions.append(pos)
        starts.append(starts[-1] + n)
    ids = torch.randint(0, model.vocab_size, (starts[-1],), generator=gen)
    shape = (len(pool) + sum(blocks_needed), block_size, model.num_kv_heads, model.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
              for _ in range(model.num_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(prompt_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        max_query_len=max(prompt_lens), max_seq_len=max(prompt_lens),
    )
    return ids.to(device), torch.tensor(positions, device=device), caches, meta


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "gemma3-270m"])
def test_cuda_matches_cpu(name: str) -> None:
    cpu = load_model(ModelConfig(model=name, load_format="dummy", seed=3), torch.device("cpu"), torch.float32)
    cuda = torch.device("cuda")
    gpu = load_model(ModelConfig(model=name, load_format="dummy"), cuda, torch.float32)
    gpu.load_weights(cpu.hf_state_dict().items())
    # Gemma 3 (head_dim 256, GeGLU, sliding layers): one prompt past its 512-token window.
    lens = [1, 7, 33, 64] + ([700] if name.startswith("gemma3") else [])
    with torch.no_grad():
        want = cpu.compute_logits(cpu(*_batch(cpu, torch.device("cpu"), torch.float32, lens)))
        got = gpu.compute_logits(gpu(*_batch(gpu, cuda, torch.float32, lens))).cpu()
    err = (got - want).norm() / want.norm()
    print(f"{name}: relative error cuda vs cpu {err:.2e}")
    assert torch.isfinite(got).all() and err <= 1e-3


def _hf_sharing(ours: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """HF's model over our weight storage (assign=True: views, no copy)."""
    import transformers
    from transformers.models.llama import modeling_llama

    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(ours.hf_config, dtype=dtype)
    hf.load_state_dict(ours.hf_state_dict(), assign=True, strict=True)
    with torch.device("cuda"):
        hf.model.rotary_emb = modeling_llama.LlamaRotaryEmbedding(ours.hf_config)  # a buffer left on meta
    return hf.eval()


def _last_logits(model: torch.nn.Module, batch: tuple, lens: list[int]) -> torch.Tensor:
    ends = torch.tensor(lens).cumsum(0) - 1
    return model.compute_logits(model(*batch)[ends.to(batch[0].device)])


def _hf_last_logits(hf: torch.nn.Module, ids: torch.Tensor, lens: list[int]) -> torch.Tensor:
    return torch.stack([hf(seq.unsqueeze(0)).logits[0, -1].float() for seq in ids.split(lens)])


def test_llama_8b_dummy_matches_hf_fp32_and_bf16() -> None:
    """fp32: ours == HF. bf16: ours is no further from the fp32 logits than HF's own bf16 run."""
    if torch.cuda.get_device_properties(0).total_memory < 70 * 2**30:
        pytest.skip("needs 70 GiB of GPU memory")
    cuda = torch.device("cuda")
    torch.cuda.synchronize()
    start_s = time.perf_counter()
    ours16 = load_model(ModelConfig(model="llama-3.1-8b", load_format="dummy", seed=0), cuda, torch.bfloat16)
    torch.cuda.synchronize()
    print(f"llama-3.1-8b dummy bf16 built on the GPU in {time.perf_counter() - start_s:.2f} s, "
          f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    ours32 = load_model(ModelConfig(model="llama-3.1-8b", load_format="dummy"), cuda, torch.float32)
    ours32.load_weights(ours16.hf_state_dict().items())  # the same (bf16-representable) weights
    lens = [5, 200, 1, 77]
    with torch.no_grad():
        batch32 = _batch(ours32, cuda, torch.float32, lens)
        got32 = _last_logits(ours32, batch32, lens)
        want32 = _hf_last_logits(_hf_sharing(ours32, torch.float32), batch32[0], lens)
        del ours32
        batch16 = _batch(ours16, cuda, torch.bfloat16, lens)
        got16 = _last_logits(ours16, batch16, lens)
        hf16 = _hf_last_logits(_hf_sharing(ours16, torch.bfloat16), batch16[0], lens)

    def rel(x: torch.Tensor) -> float:
        return ((x - want32).norm() / want32.norm()).item()

    print(f"llama-3.1-8b vs HF fp32 logits, relative error: ours fp32 {rel(got32):.2e}, ours bf16 "
          f"{rel(got16):.2e}, HF bf16 {rel(hf16):.2e}")
    assert torch.isfinite(got16).all() and rel(got32) <= 1e-3
    assert rel(got16) <= 1.5 * rel(hf16) + 1e-3
