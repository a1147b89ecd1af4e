"""Mixed and multi-prompt steps through the static inputs that the piecewise CUDA graphs replay.

On CUDA such steps replay graphs captured per token count and cut at each layer's attention
(appliance/engine/piecewise.py); here (CPU) `_setup_piecewise_graphs(capture=False)` runs the same
forward over the same static buffers, with each layer's attention computed from the step's live
metadata into the shared q/out buffers. So the padding, the one-copy upload of tokens, sampled rows
and attention metadata, the placeholder gather of async scheduling and the cut at every layer are
checked against plain eager steps on the real default model. (tests/engine/test_gpu_engine.py
replays the captured pieces on a GPU.)
"""

from __future__ import annotations

import dataclasses

import pytest

from appliance.engine.llm_engine import EngineCore
from appliance.engine.piecewise import Recorder, cutting, piecewise_sizes
from appliance.engine.sequence import SamplingParams

from .conftest import CHAT_PROMPTS, chat_ids, engine_config, run_to_completion


def _with_piecewise(engine: EngineCore) -> list[tuple[int, int, int]]:
    """Route the steps no other graph serves through the static piecewise path; returns, per step
    it served, (tokens, sequences, padded size)."""
    runner = engine.runner
    runner._setup_piecewise_graphs(capture=False)
    served: list[tuple[int, int, int]] = []
    replay = runner._replay_piecewise

    def counting(hb, size, prev):
        served.append((len(hb.ids), len(hb.q_lens), size))
        assert size >= len(hb.ids) and size in runner.piecewise
        return replay(hb, size, prev)

    runner._replay_piecewise = counting
    return served


def _config(model_dir, **overrides):
    config = engine_config(model_dir, max_num_batched_tokens=64, max_num_seqs=8, **overrides)
    return dataclasses.replace(config, cuda_graph_piecewise_max_tokens=64)


def _burst(engine: EngineCore, prompts: dict[str, list[int]], max_tokens: int) -> dict[str, object]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=2)
    return run_to_completion(engine, {rid: (ids, params) for rid, ids in prompts.items()})


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_mixed_steps_match_eager_steps(engine, default_model_dir, async_scheduling):
    prompts = {f"p{i}": chat_ids(engine.tokenizer, p) for i, p in enumerate(CHAT_PROMPTS[:5])}
    # A second wave of the same prompts: prefix-cache hits, so those prefills start mid-prompt.
    prompts.update({f"again{i}": ids for i, ids in enumerate(list(prompts.values())[:3])})
    config = dataclasses.replace(_config(default_model_dir), async_scheduling=async_scheduling)
    want = _burst(EngineCore(dataclasses.replace(config, cuda_graph_piecewise_max_tokens=0)), prompts, 10)
    static = EngineCore(config)
    served = _with_piecewise(static)
    assert sorted(static.runner.piecewise) == [16, 32, 64]
    got = _burst(static, prompts, 10)
    for rid, out in want.items():
        assert got[rid].outputs[0].token_ids == out.outputs[0].token_ids, rid
        for a, b in zip(got[rid].outputs[0].logprobs, out.outputs[0].logprobs, strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
    # Chunked prefills with decodes riding along, several prompts in one step, and padded sizes.
    assert any(seqs > 1 and tokens > seqs for tokens, seqs, _ in served), served
    assert any(size > tokens for tokens, _, size in served), served
    assert static.runner.piecewise_steps == len(served)
    assert static.stats().prefix_cache_hits > 0
    paths = static.stats().steps_by_path  # /metrics' llm_appliance_engine_steps_total{path}
    assert paths["piecewise_graphs"] == len(served) == sum(paths.values())  # (no decode graphs on CPU)


def test_every_layer_is_cut_once_into_two_shared_buffers(default_model_dir):
    import torch

    from appliance.layers.attention import AttentionMetadata

    runner = EngineCore(_config(default_model_dir)).runner
    width = runner.model.num_heads * runner.model.head_dim
    q_buf, out_buf = torch.zeros(64 * width), torch.zeros(64 * width)
    recorder = Recorder(q_buf, out_buf)  # neither capturing nor live: the attention is skipped
    ids = torch.zeros(32, dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.full((32,), -1, dtype=torch.int32),
                             query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
                             seq_lens=torch.ones(1, dtype=torch.int32),
                             block_tables=torch.zeros((1, 1), dtype=torch.int32), max_query_len=1, max_seq_len=1)
    layers = runner.model.model.layers
    with cutting(runner.model, recorder):
        runner.model(ids, ids, runner.kv_caches, meta)
    assert [c.attn for c in recorder.cuts] == [layer.self_attn.attn for layer in layers]
    assert all(c.q.data_ptr() == q_buf.data_ptr() and c.out.data_ptr() == out_buf.data_ptr()
               and c.q.shape == (32, runner.model.num_heads, runner.model.head_dim) for c in recorder.cuts)
    assert all(layer.self_attn.attn.cut is None for layer in layers)  # attending normally again


def test_prompt_logprob_steps_stay_eager(engine, default_model_dir):
    static = EngineCore(_config(default_model_dir))
    served = _with_piecewise(static)
    ids = chat_ids(static.tokenizer, CHAT_PROMPTS[0])
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    out = run_to_completion(static, {"a": (ids, params), "b": (ids[:20], params)})
    assert out["a"].prompt_logprobs is not None and len(out["a"].prompt_logprobs) == len(ids)
    assert all(tokens == seqs for tokens, seqs, _ in served), served  # only the decode steps


def test_the_ladder():
    sizes = piecewise_sizes(8192)
    assert sizes[:6] == [16, 32, 64, 128, 256, 384] and sizes[-2:] == [7680, 8192]
    assert piecewise_sizes(100) == [16, 32, 64, 100] and piecewise_sizes(16) == [16]

    def padded(n: int) -> int:
        return next(s for s in sizes if s >= n)

    assert all(padded(n) - n < n / 2 for n in range(257, 8193))
    assert all(padded(n) - n < n / 4 for n in range(2049, 8193))


def test_on_by_default_captured_on_cuda_only(default_model_dir):
    """On by default (8,192 tokens, capped by max_num_batched_tokens); a CPU engine captures
    nothing (its steps run eager), and 0 turns the ladder off."""
    config = engine_config(default_model_dir)
    assert config.cuda_graph_piecewise_max_tokens == 8192
    engine = EngineCore(config)
    assert engine.runner.piecewise == {}
    assert engine.runner._piecewise_sizes()[-1] == min(8192, config.scheduler.max_num_batched_tokens)
    off = EngineCore(dataclasses.replace(config, cuda_graph_piecewise_max_tokens=0))
    off.runner._setup_piecewise_graphs(capture=False)
    assert off.runner.piecewise == {}


def test_capture_cuts_the_forward_into_one_piece_more_than_layers(default_model_dir, monkeypatch):
    """The capture sequencing without a GPU: CUDA's graph API (which cannot run here) is replaced
    by a log of its calls; tests/engine/test_gpu_engine.py runs the real one. One piece per layer
    plus one, each ended before the next begins, all in one pool, q copied into the static buffer
    before its piece ends."""
    import torch

    from appliance.layers.attention import AttentionMetadata

    calls: list[str] = []

    class LoggedGraph:
        def capture_begin(self, pool=None):
            calls.append(f"begin {pool}")

        def capture_end(self):
            calls.append("end")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", LoggedGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool-1")
    runner = EngineCore(_config(default_model_dir)).runner
    width = runner.model.num_heads * runner.model.head_dim
    q_buf, out_buf = torch.zeros(64 * width), torch.zeros(64 * width)
    recorder = Recorder(q_buf, out_buf, capture=True)
    ids = torch.arange(32, dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.full((32,), -1, dtype=torch.int32),
                             query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
                             seq_lens=torch.ones(1, dtype=torch.int32),
                             block_tables=torch.zeros((1, 1), dtype=torch.int32), max_query_len=1, max_seq_len=1)
    with torch.inference_mode(), cutting(runner.model, recorder):
        recorder.begin()
        runner.model(ids, ids, runner.kv_caches, meta)
        recorder.end()
    layers = runner.model.num_layers
    assert calls == ["begin pool-1", "end"] * (layers + 1)
    assert len(recorder.pieces) == layers + 1 and len(recorder.cuts) == layers
    assert q_buf[: 32 * width].abs().sum() > 0  # the last layer's q, copied in


def test_a_layer_attending_outside_attend_is_refused(default_model_dir, monkeypatch):
    """A model whose layer computes attention without Attention.attend would be captured inside a
    piece over the capture's dummy metadata: setting the pieces up refuses it, naming the key."""
    from appliance.engine.piecewise import attention_modules
    from appliance.errors import ModelLoadError

    engine = EngineCore(_config(default_model_dir))
    layer = attention_modules(engine.runner.model)[3]
    plain = type(layer).attend

    def bypass(self, q, kv_cache, meta, out=None):  # the cut hook never sees this layer
        cut, self.cut = self.cut, None
        try:
            return plain(self, q, kv_cache, meta, out)
        finally:
            self.cut = cut

    monkeypatch.setattr(layer, "attend", bypass.__get__(layer))
    with pytest.raises(ModelLoadError, match="cuda_graph_piecewise_max_tokens = 0"):
        engine.runner._setup_piecewise_graphs(capture=False)
