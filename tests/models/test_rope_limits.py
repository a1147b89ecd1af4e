"""How long a sequence a model's rope covers, and the engine refusing a max_model_len past it
(a position past the cos/sin table would read another position's row: silently wrong)."""

from __future__ import annotations

import pytest
import transformers

from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from appliance.errors import ConfigError
from appliance.layers.rotary import RotaryEmbedding
from appliance.models.registry import model_class

_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)


@pytest.mark.parametrize(("rope", "positions"), [
    ({"rope_type": "default", "rope_theta": 10000.0}, 64),
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}, 256),
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 128),
    ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, 64),
])
def test_rope_rules_set_how_many_positions_a_model_covers(rope: dict[str, object], positions: int) -> None:
    config = transformers.Qwen2Config(**_TINY, rope_parameters=rope)
    model = model_class(config)(config)
    assert model.max_positions == positions
    rotary = next(m for m in model.modules() if isinstance(m, RotaryEmbedding))
    assert rotary.cos_sin_cache.shape[0] == positions


def test_max_model_len_past_the_rope_table_is_refused_naming_the_key() -> None:
    from appliance.engine.llm_engine import EngineCore

    config = EngineConfig(model=ModelConfig(model="tiny-llama", load_format="dummy", device="cpu"),
                          cache=CacheConfig(cpu_kv_cache_bytes=16 << 20),
                          scheduler=SchedulerConfig(max_model_len=4096))  # tiny-llama: 2048 positions
    with pytest.raises(ConfigError, match=r"engine\.max_model_len = 4096 exceeds the 2048 positions"):
        EngineCore(config)
