"""Each model family against HF transformers (fp32, eager attention) over a real paged KV cache.

Every sequence is a fixed random token string. HF runs each string once (causal, so its logits at
position p are the next-token logits after p); our model consumes the same strings in steps: a
batched prefill of sequences of different lengths, one prompt split across two calls (chunked
prefill, mixed with decode rows), then 16 decode steps. Blocks are handed out from a shuffled pool,
so block tables are non-contiguous, and the cache starts as NaN so any read of an unwritten slot
poisons the logits.

Sliding-window families run with windows shorter than the sequences; when every layer slides, the
driver also frees (marks -1, fills with NaN) the blocks that fell out of the window, as the block
manager does. Rope rules whose frequencies HF changes with the forward pass's length (dynamic NTK,
LongRoPE) are compared against HF decoding one token at a time with its KV cache, the way their
rotation is defined here (appliance/layers/rope_scaling.py).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers

from appliance.layers.attention import AttentionMetadata
from appliance.models.registry import model_class

VOCAB = 96
BLOCK_SIZE = 4
NUM_BLOCKS = 48
DECODE_STEPS = 16
TOLERANCE = 1e-4

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
)

FAMILIES = {
    "llama3-rope": (transformers.LlamaConfig, dict(
        _COMMON, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )),
    "llama-tied-linear-rope": (transformers.LlamaConfig, dict(
        _COMMON, tie_word_embeddings=True, attention_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    )),
    "mistral": (transformers.MistralConfig, dict(_COMMON, num_key_value_heads=1, tie_word_embeddings=False)),
    "qwen2-bias": (transformers.Qwen2Config, dict(_COMMON, tie_word_embeddings=False)),
    "qwen3-qknorm": (transformers.Qwen3Config, dict(_COMMON, head_dim=32, tie_word_embeddings=False)),
    "mistral-sliding": (transformers.MistralConfig, dict(_COMMON, sliding_window=6, tie_word_embeddings=False)),
    "qwen2-sliding-layers": (transformers.Qwen2Config, dict(
        _COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=1, tie_word_embeddings=False)),
    "qwen3-yarn": (transformers.Qwen3Config, dict(
        _COMMON, head_dim=32, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32})),
    "llama-dynamic-ntk": (transformers.LlamaConfig, dict(
        _COMMON, max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                              "factor": 2.0})),
    "phi3-longrope": (transformers.LlamaConfig, dict(
        _COMMON, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                  "original_max_position_embeddings": 12,
                                  "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                  "long_factor": [1.0 + 0.9 * i for i in range(8)]})),
    "phi3-longrope-sliding": (transformers.Phi3Config, dict(
        _COMMON, tie_word_embeddings=False, sliding_window=7, original_max_position_embeddings=12, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0 + 0.1 * i for i in range(8)],
                         "long_factor": [1.0 + 0.9 * i for i in range(8)]})),
    "gemma3": (transformers.Gemma3TextConfig, dict(
        _COMMON, num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        final_logit_softcapping=30.0, rms_norm_eps=1e-6,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0}})),
}
# Families compared against HF decoding token by token (see the module docstring).
INCREMENTAL_HF = {"llama-dynamic-ntk", "phi3-longrope", "phi3-longrope-sliding"}


def _build_pair(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    config_cls, kwargs = FAMILIES[family]
    config = config_cls(**kwargs)
    if family == "gemma3":
        config.architectures = ["Gemma3ForCausalLM"]
    config._attn_implementation = "eager"
    torch.manual_seed(1234)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # HF's init (std 0.02, unit norms, zero biases) leaves too little signal to catch a mistake:
    # perturb every tensor so norms, biases and each projection matter.
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    ours = model_class(config)(config).eval()
    ours.load_weights(hf.state_dict().items())
    return hf, ours


class PagedDriver:
    """Feeds sequences into our model in steps over a hand-built paged cache."""

    def __init__(self, model: torch.nn.Module, tokens: list[torch.Tensor], seed: int = 0) -> None:
        self.model = model
        self.tokens = tokens
        self.done = [0] * len(tokens)
        gen = torch.Generator().manual_seed(seed)
        pool = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
        self.block_tables: list[list[int]] = []
        for seq in tokens:
            need = -(-len(seq) // BLOCK_SIZE)
            self.block_tables.append([pool.pop() for _ in range(need)])
        shape = (NUM_BLOCKS, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
        self.kv_caches = [(torch.full(shape, float("nan")), torch.full(shape, float("nan")))
                          for _ in range(model.num_layers)]
        windows = model.sliding_windows
        # Every layer slides: blocks before the widest window are never read again.
        self.free_window = None if None in windows else max(windows)
        self.num_freed = 0

    def _free_out_of_window(self, s: int) -> None:
        assert self.free_window is not None
        first_needed = max(0, self.done[s] - self.free_window + 1)
        table = self.block_tables[s]
        for i in range(first_needed // BLOCK_SIZE):
            if table[i] >= 0:
                for k_cache, v_cache in self.kv_caches:
                    k_cache[table[i]] = float("nan")
                    v_cache[table[i]] = float("nan")
                table[i] = -1
                self.num_freed += 1

    def step(self, chunks: dict[int, int]) -> dict[int, torch.Tensor]:
        """Run one forward with `chunks[seq] = new tokens`; return each seq's logits rows [n, V]."""
        seqs = sorted(chunks)
        ids, positions, slots, starts, seq_lens = [], [], [], [0], []
        for s in seqs:
            begin, end = self.done[s], self.done[s] + chunks[s]
            for pos in range(begin, end):
                positions.append(pos)
                slots.append(self.block_tables[s][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
            ids.append(self.tokens[s][begin:end])
            starts.append(starts[-1] + chunks[s])
            seq_lens.append(end)
        width = max(len(self.block_tables[s]) for s in seqs)
        tables = torch.zeros(len(seqs), width, dtype=torch.int32)
        for row, s in enumerate(seqs):
            tables[row, : len(self.block_tables[s])] = torch.tensor(self.block_tables[s], dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=tables,
            max_query_len=max(chunks.values()),
            max_seq_len=max(seq_lens),
            is_decode_only=all(chunks[s] == 1 for s in seqs),
        )
        with torch.no_grad():
            hidden = self.model(torch.cat(ids), torch.tensor(positions, dtype=torch.int64), self.kv_caches, meta)
            logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32 and logits.shape == (len(positions), self.model.vocab_size)
        out = {}
        for row, s in enumerate(seqs):
            out[s] = logits[starts[row]: starts[row + 1]]
            self.done[s] += chunks[s]
            if self.free_window is not None:
                self._free_out_of_window(s)
        return out


def hf_logits(hf: torch.nn.Module, seq: torch.Tensor, incremental: bool) -> torch.Tensor:  # [L, V]
    """HF's next-token logits at every position: one forward, or one token at a time with a cache."""
    if not incremental:
        return hf(seq.unsqueeze(0)).logits[0]
    cache = transformers.DynamicCache(config=hf.config)
    # transformers 5.2x renamed past_key_values to cache (the old name warns, then goes in 5.40).
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    rows = [hf(seq[i:i + 1].unsqueeze(0), use_cache=True, **{name: cache}).logits[0] for i in range(len(seq))]
    return torch.cat(rows)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_hf_through_prefill_chunked_prefill_and_decode(family: str) -> None:
    hf, ours = _build_pair(family)
    prompt_lens = [3, 9, 14]  # the last one arrives in two chunks: 6, then 8 (with decode rows)
    gen = torch.Generator().manual_seed(7)
    tokens = [torch.randint(0, VOCAB, (n + DECODE_STEPS,), generator=gen) for n in prompt_lens]
    with torch.no_grad():
        expected = [hf_logits(hf, seq, family in INCREMENTAL_HF) for seq in tokens]  # [L, V] each

    driver = PagedDriver(ours, tokens)
    steps: list[dict[int, int]] = [{0: 3, 1: 9, 2: 6}, {0: 1, 1: 1, 2: 8}]
    steps += [{0: 1, 1: 1, 2: 1}] * (DECODE_STEPS - 1)
    steps += [{2: 1}]  # sequence 2 started decoding one step later
    worst = 0.0
    for step in steps:
        begins = dict(zip(step, (driver.done[s] for s in step), strict=True))
        for s, got in driver.step(step).items():
            want = expected[s][begins[s]: begins[s] + step[s]]
            assert torch.isfinite(got).all()
            worst = max(worst, (got - want).abs().max().item())
    assert driver.done == [len(t) for t in tokens]
    assert worst <= TOLERANCE, f"{family}: max |ours - HF| = {worst:.3g}"
    if family == "mistral-sliding":
        assert driver.num_freed > 0  # the freed-block path ran


@pytest.mark.parametrize("family", ["llama-tied-linear-rope", "qwen3-qknorm", "gemma3"])
def test_hf_state_dict_round_trips_into_hf(family: str) -> None:
    hf, ours = _build_pair(family)
    exported = ours.hf_state_dict()
    expected_keys = set(hf.state_dict())
    assert set(exported) == expected_keys
    for name, tensor in hf.state_dict().items():
        assert torch.equal(exported[name], tensor), name
