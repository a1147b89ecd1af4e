"""Weight loading: safetensors (sharded), dummy, GGUF errors, and the embedded default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from appliance.config import ModelConfig
from appliance.errors import ModelLoadError, ModelNotFoundError
from appliance.layers.attention import AttentionMetadata
from appliance.models.dummy_configs import DUMMY_CONFIGS
from appliance.models.fetch import ensure_default_model, is_complete
from appliance.models.loader import load_model, resolve_model
from appliance.models.tokenizer import apply_chat_template, eos_token_ids, load_tokenizer

CPU = torch.device("cpu")


def _tiny_hf_model(tie: bool) -> transformers.PreTrainedModel:
    config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)  # non-zero biases and norms, so a misplaced tensor shows
    return model


def _prefill(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of one sequence's prefill over a fresh paged cache (block size 16)."""
    block_size, num_tokens = 16, len(ids)
    num_blocks = -(-num_tokens // block_size)
    dtype = next(model.parameters()).dtype
    shape = (num_blocks + 1, block_size, model.num_kv_heads, model.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(model.num_layers)]
    blocks = torch.arange(1, num_blocks + 1, dtype=torch.int32)  # block 0 left unused on purpose
    positions = torch.arange(num_tokens)
    meta = AttentionMetadata(
        slot_mapping=(blocks.long()[positions // block_size] * block_size + positions % block_size),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        block_tables=blocks.unsqueeze(0), max_query_len=num_tokens, max_seq_len=num_tokens,
    )
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), positions, caches, meta))


@pytest.mark.parametrize("shard", [True, False])
def test_safetensors_dir_round_trip(tmp_path: Path, shard: bool) -> None:
    hf = _tiny_hf_model(tie=not shard)
    hf.save_pretrained(str(tmp_path), max_shard_size="40KB" if shard else "1GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard

    resolved = resolve_model(ModelConfig(model=str(tmp_path)))
    assert resolved.load_format == "safetensors" and resolved.architecture == "Qwen2ForCausalLM"
    ours = load_model(ModelConfig(model=str(tmp_path)), CPU, torch.float32)
    exported = ours.hf_state_dict()
    assert set(exported) == set(hf.state_dict())
    for name, tensor in hf.state_dict().items():
        assert torch.equal(exported[name], tensor), name
    ids = [5, 17, 99, 3, 64, 12, 7]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert (_prefill(ours, ids) - want).abs().max().item() <= 1e-4

    # The same checkpoint in bf16: every weight is HF's, rounded once.
    ours_bf16 = load_model(ModelConfig(model=str(tmp_path)), CPU, torch.bfloat16)
    for name, tensor in ours_bf16.hf_state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, hf.state_dict()[name].bfloat16()), name


def test_dummy_named_configs_are_seeded_and_shaped() -> None:
    first = load_model(ModelConfig(model="tiny-qwen2", load_format="dummy", seed=1), CPU, torch.float32)
    again = load_model(ModelConfig(model="tiny-qwen2", load_format="dummy", seed=1), CPU, torch.float32)
    other = load_model(ModelConfig(model="tiny-qwen2", load_format="dummy", seed=2), CPU, torch.float32)
    a, b, c = first.hf_state_dict(), again.hf_state_dict(), other.hf_state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    assert a["model.layers.1.self_attn.q_proj.bias"].abs().sum() > 0  # Qwen2 biases are filled too
    logits = _prefill(first, [1, 2, 3, 4, 5])
    assert logits.shape == (5, DUMMY_CONFIGS["tiny-qwen2"]["vocab_size"]) and torch.isfinite(logits).all()

    # The benchmark shapes resolve to the real architectures without building them.
    llama = resolve_model(ModelConfig(model="llama-3.1-8b", load_format="dummy"))
    assert llama.architecture == "LlamaForCausalLM" and llama.hf_config.num_key_value_heads == 8
    assert llama.hf_config.rope_parameters["rope_type"] == "llama3"
    qwen = resolve_model(ModelConfig(model="qwen2.5-7b", load_format="dummy"))
    assert qwen.architecture == "Qwen2ForCausalLM" and qwen.hf_config.hidden_size == 3584


def test_dummy_from_a_config_dir(tmp_path: Path) -> None:
    config = dict(DUMMY_CONFIGS["tiny-llama"], num_hidden_layers=3)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(ModelConfig(model=str(tmp_path), load_format="dummy", seed=5), CPU, torch.bfloat16)
    assert model.num_layers == 3 and next(model.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(_prefill(model, [7, 8, 9])).all()


def test_unknown_path_is_model_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        resolve_model(ModelConfig(model=str(missing)))
    with pytest.raises(ModelNotFoundError, match="llama-3.1-8b"):  # the message lists the dummy names
        resolve_model(ModelConfig(model="llama-9b", load_format="dummy"))


@pytest.mark.parametrize("content", [b"", b"\x00\x17 not a gguf file at all" * 50,
                                     b"GGUF\x03\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00\x02"])
def test_corrupt_gguf_is_model_load_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="broken.gguf") as info:
        load_model(ModelConfig(model=str(path)), CPU, torch.float32)
    assert not isinstance(info.value, ModelNotFoundError)


def _write_tiny_gguf(path: Path) -> dict[str, torch.Tensor]:
    """A float32 llama GGUF as llama.cpp's converter lays it out; returns the HF state dict."""
    import gguf

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    state = transformers.AutoModelForCausalLM.from_config(config).state_dict()

    def rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:  # llama.cpp's q/k row order
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(2)
    writer.add_feed_forward_length(48)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(8)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(64)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", state["lm_head.weight"].numpy())
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(2):
        for hf_name, gguf_name in names.items():
            tensor = state[f"model.layers.{layer}.{hf_name}.weight"]
            if hf_name.endswith("q_proj"):
                tensor = rope_permute(tensor, 4)
            elif hf_name.endswith("k_proj"):
                tensor = rope_permute(tensor, 2)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


def test_gguf_file_loads_and_truncated_one_fails(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    state = _write_tiny_gguf(path)
    resolved = resolve_model(ModelConfig(model=str(path)))
    assert resolved.load_format == "gguf" and resolved.architecture == "LlamaForCausalLM"
    exported = load_model(ModelConfig(model=str(path)), CPU, torch.float32, resolved).hf_state_dict()
    assert set(exported) == set(state)
    for name, tensor in state.items():
        assert torch.equal(exported[name], tensor), name

    truncated = tmp_path / "truncated.gguf"
    data = path.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelLoadError, match="truncated.gguf"):
        load_model(ModelConfig(model=str(truncated)), CPU, torch.float32)


def test_corrupt_safetensors_and_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(DUMMY_CONFIGS["tiny-llama"]))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(ModelConfig(model=str(tmp_path)), CPU, torch.float32)

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        resolve_model(ModelConfig(model=str(gpt2), load_format="dummy"))


def test_default_model_matches_hf() -> None:
    model_dir = ensure_default_model(progress=False)
    assert is_complete(model_dir)
    resolved = resolve_model(ModelConfig())
    assert resolved.path == model_dir and resolved.architecture == "LlamaForCausalLM"

    tokenizer = load_tokenizer(resolved.tokenizer_path)
    ids = apply_chat_template(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert eos_token_ids(tokenizer, resolved.hf_config, resolved.generation_config) == [2]

    ours = load_model(ModelConfig(), CPU, torch.float32, resolved)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    got = _prefill(ours, ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert int(got[-1].argmax()) == int(want[-1].argmax())
