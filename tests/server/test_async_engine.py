"""AsyncEngine on its own (with both clients): deltas, rejection before the first item, abort
on close, merged deltas for a consumer slower than the engine."""

from __future__ import annotations

from contextlib import aclosing

import pytest

from appliance.engine.sequence import SamplingParams
from appliance.errors import PromptTooLongError

from .conftest import MAX_MODEL_LEN, wait_until


def test_generate_yields_one_delta_per_step_to_the_end(server_loop, engine):
    async def run() -> list:
        params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        return [out async for out in engine.generate("ae-1", [1, 2, 3, 4], params)]

    outs = server_loop.call(run())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"
    assert all(not o.finished for o in outs[:-1]) and outs[-1].metrics is not None
    tokens = [t for o in outs for t in o.outputs[0].token_ids]
    assert len(tokens) == 5  # deltas: every token exactly once
    assert all(len(o.outputs[0].token_ids) >= 1 for o in outs)
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
        seen = 0
        async with aclosing(engine.generate("ae-3", list(range(10, 60)), params)) as outputs:
            async for out in outputs:
                seen += len(out.outputs[0].token_ids)
                if seen >= 2:
                    return engine.stats().num_kv_blocks_used
        raise AssertionError("unreachable")

    used_while_running = server_loop.call(run())
    assert used_while_running > 0
    wait_until(lambda: engine.stats().num_kv_blocks_used == 0 and engine.stats().num_running == 0,
               what="blocks to return to the pool")


def test_a_slow_consumer_gets_the_missed_steps_merged_and_final_only_one_delta(server_loop, engine):
    """Deltas are never dropped: a consumer that did not read while the engine ran gets every
    token it missed in its next delta; final_only gets the first delta and the rest in one."""

    async def slow() -> list:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        outs = []
        async with aclosing(engine.generate("ae-slow", [5, 6, 7, 8], params)) as outputs:
            async for out in outputs:
                outs.append(out)
                if len(outs) == 1:  # stop reading until the engine has finished the request
                    await wait_idle()
        return outs

    async def wait_idle() -> None:
        import asyncio

        while engine.stats().num_running or engine.stats().num_waiting:
            await asyncio.sleep(0.01)

    async def final_only() -> list:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        return [out async for out in engine.generate("ae-final", [5, 6, 7, 8], params, final_only=True)]

    outs = server_loop.call(slow())
    # Everything after the first read comes merged in one more delta (none when the engine was
    # done before the first read).
    assert len(outs) <= 2 and outs[-1].finished
    tokens = [t for out in outs for t in out.outputs[0].token_ids]
    assert len(tokens) == 6
    parts = server_loop.call(final_only())
    # final_only: the first delta (the first token's time), then the rest merged at the end.
    assert 1 <= len(parts) <= 2 and parts[-1].finished and all(not p.finished for p in parts[:-1])
    assert [t for p in parts for t in p.outputs[0].token_ids] == tokens  # greedy: the same tokens
