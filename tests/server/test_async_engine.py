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


def test_paced_and_final_only_deliveries_lose_nothing(server_loop, engine):
    """Skipped intermediate outputs are cumulative, so the consumer still sees every token."""

    async def run(final_only: bool) -> list:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        return [out async for out in engine.generate(f"ae-pace-{final_only}", [5, 6, 7, 8], params,
                                                     final_only=final_only)]

    budget = engine.delivery_budget_s
    engine.delivery_budget_s = 60.0  # one stream: at most one intermediate delivery a minute
    try:
        paced = server_loop.call(run(False))
    finally:
        engine.delivery_budget_s = budget
    final_only = server_loop.call(run(True))
    for outs in (paced, final_only):
        assert len(outs) == 2  # the first output, then the final one
        assert len(outs[0].outputs[0].token_ids) == 1 and outs[1].finished
        assert len(outs[1].outputs[0].token_ids) == 6
    assert paced[1].outputs[0].token_ids == final_only[1].outputs[0].token_ids  # greedy: the same tokens
