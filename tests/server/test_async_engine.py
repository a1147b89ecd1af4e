"""AsyncEngine on its own: outputs, rejection before the first item, abort on close, stats."""

from __future__ import annotations

from contextlib import aclosing

import pytest

from appliance.engine.sequence import SamplingParams
from appliance.errors import PromptTooLongError

from .conftest import MAX_MODEL_LEN, wait_until


def test_generate_yields_cumulative_outputs_to_the_end(server_loop, engine):
    async def run() -> list:
        outs = []
        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        async for out in engine.generate("ae-1", [1, 2, 3, 4], params):
            outs.append(out)
        return outs

    outs = server_loop.call(run())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths) and lengths[-1] == 5
    assert engine.is_progressing(60.0) and not engine.dead


def test_engine_rejection_raises_before_the_first_item(server_loop, engine):
    async def run() -> None:
        async for _ in engine.generate("ae-2", [1] * (MAX_MODEL_LEN + 5), SamplingParams(max_tokens=1)):
            raise AssertionError("no output expected")

    with pytest.raises(PromptTooLongError):
        server_loop.call(run())


def test_closing_the_iterator_aborts(server_loop, engine):
    async def run() -> int:
        params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
        async with aclosing(engine.generate("ae-3", list(range(10, 60)), params)) as outputs:
            async for out in outputs:
                if len(out.outputs[0].token_ids) >= 2:
                    return engine.stats().num_kv_blocks_used
        raise AssertionError("unreachable")

    used_while_running = server_loop.call(run())
    assert used_while_running > 0
    wait_until(lambda: engine.stats().num_kv_blocks_used == 0 and engine.stats().num_running == 0,
               what="blocks to return to the pool")
