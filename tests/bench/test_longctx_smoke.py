"""bench/longctx.py, the long-context GPU call, on CPU: the kernel phase at tiny shapes under the
Triton interpreter and the engine phase against our real daemon (default model, tiny prompts), so
the one GPU command keeps working; the switch's choice from timings; the server process handling;
the prefill kernel compiled for sm_90a without a GPU."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from appliance_bench import longctx, longctx_serve


def _result(folder: Path, kind: str) -> dict[str, Any]:
    # The newest: the JSON is rewritten after each step, and its name carries the checkout's commit,
    # which other work in this tree may move during the run.
    return json.loads(max(folder.glob(f"*-{kind}.json"), key=lambda p: p.stat().st_mtime).read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_smoke_runs_both_phases_and_serves_with_the_switch_on(tmp_path: Path) -> None:
    """The GPU call's path at tiny size: the peer server (here a second daemon of ours standing in
    for vLLM) starts during the kernel phase and is measured first; then ours with the switch on."""
    port, peer_port = _free_port(), _free_port()
    peer = (f"{sys.executable} -m appliance.cli serve --port {peer_port} --served-model-name m --max-model-len 512 "
            f"--set engine.cpu_kv_cache_bytes=67108864 --control-socket {tmp_path / 'peer.sock'}")
    assert longctx.main(["--smoke", "--servers", "on,vllm", "--peer-cmd", peer, "--port", str(port), "--vllm-port",
                         str(peer_port), "--results-dir", str(tmp_path)]) == 0
    result = _result(tmp_path, "longctx-smoke")
    assert result["vllm_started_during_kernel_phase"] is True
    kernels, engine = result["kernels"], result["engine"]
    prefill = kernels["prefill"]
    assert {row["kernel"] for row in prefill} == {"mixed-batch kernel", "prefill kernel"}
    assert any(row["tile"].get("tma") == 1 for row in prefill)  # the TMA-box variant is swept too
    assert all(row["rel_err"] < 1e-4 and row["ms"] > 0 for row in prefill)
    assert all(row["rel_err_vs_mixed"] < 1e-4 for row in prefill if row["kernel"] == "prefill kernel")
    assert {(r["num_seqs"], r["q_len"], r["ctx"]) for r in prefill} == set(longctx.SMOKE_PREFILL + longctx.SMOKE_THRESHOLD)
    assert all(row["rel_err"] < 1e-4 for row in kernels["decode"]) and any(r["sliding_window"] for r in kernels["decode"])
    assert kernels["decision"]["tile"] == longctx.SMOKE_TILE
    # The daemon got the switch through the environment (--threshold: CPU timings decide nothing).
    assert list(engine["servers"]) == ["peer", "ours (prefill kernel on)"]  # the peer went first
    label, ours = "ours (prefill kernel on)", engine["servers"]["ours (prefill kernel on)"]
    assert "error" not in ours and "error" not in engine["servers"]["peer"], ours.get("error")
    assert ours["env"]["APPLIANCE_LONG_PREFILL_MIN_QUERY_TOKENS"] == str(longctx.FALLBACK_THRESHOLD)
    sizes = longctx_serve.SMOKE_SIZES
    mixed, alone = ours["mixed"], ours["alone"]
    assert mixed["failed"] == 0 and mixed["requests"] == sizes.num_short + sizes.num_long
    assert mixed["total_input_tokens"] == sizes.num_short * sizes.short_len + sizes.num_long * sizes.long_len
    assert mixed["total_output_tokens"] == mixed["requests"] * sizes.out_tokens and mixed["total_tok_s"] > 0
    assert alone["prompt_tokens"] == [sizes.long_len] * sizes.alone_repeats
    assert alone["output_tokens"] == [sizes.out_tokens] * sizes.alone_repeats
    assert alone["median_ttft_ms"] > 0 and alone["median_tpot_ms"] > 0
    assert (tmp_path / "serve_on.log").stat().st_size > 0 and (tmp_path / "serve_vllm.log").stat().st_size > 0
    ratios = engine["ratios_vs_vllm"][label]
    assert set(ratios) == {"mixed_total_tok_s", "alone_median_ttft", "alone_median_tpot"}
    assert ratios["mixed_total_tok_s"] == pytest.approx(
        ours["mixed"]["total_tok_s"] / engine["servers"]["peer"]["mixed"]["total_tok_s"])
    assert set(engine["targets"][label]) == {"mixed total tok/s >= 1.2x vLLM", "32k alone TTFT <= 0.9x vLLM",
                                             "32k alone TPOT <= vLLM"}
    from appliance_kernels import attention

    assert attention.LONG_PREFILL_MIN_QUERY_TOKENS == 2048  # the kernel phase restores the committed switch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_without_a_gpu_both_phases_say_why_they_did_not_run(tmp_path: Path) -> None:
    assert longctx.main(["--results-dir", str(tmp_path)]) == 0
    result = _result(tmp_path, "longctx")
    for phase in ("kernels", "engine"):
        assert "no CUDA device" in result[phase]["skipped"]


def _row(kernel: str, case: tuple[int, int, int], ms: float | None, tile: dict[str, int] | None = None,
         block_size: int = longctx.BLOCK_SIZE) -> dict[str, Any]:
    row: dict[str, Any] = {"num_seqs": case[0], "q_len": case[1], "ctx": case[2], "kernel": kernel, "tile": tile,
                           "block_size": block_size}
    if ms is not None:
        row["ms"] = ms
    return row


A = {"rows": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
B = {"rows": 64, "block_n": 64, "num_warps": 4, "num_stages": 3}
LONG = [(1, 8192, 0), (1, 8192, 24576)]


def test_choose_takes_the_fastest_tile_that_ran_everywhere_and_the_shortest_winning_chunk() -> None:
    rows = [_row("mixed-batch kernel", c, 10.0) for c in LONG]
    rows += [_row("prefill kernel", LONG[0], 4.0, A), _row("prefill kernel", LONG[1], 4.0, A)]
    rows += [_row("prefill kernel", LONG[0], 1.0, B), _row("prefill kernel", LONG[1], None, B)]  # B failed once
    rows += [_row("prefill kernel", LONG[0], 0.5, {**A, "tma": 1}, 64)]  # other pages: not the engine's
    short = [(1, 2048, 30720), (16, 512, 0), (1, 512, 16384)]
    rows += [_row("mixed-batch kernel", c, 2.0) for c in short]
    rows += [_row("prefill kernel", short[0], 1.0, A), _row("prefill kernel", short[1], 1.5, A),
             _row("prefill kernel", short[2], 2.5, A)]  # loses one of the two 512-token cases
    decision = longctx.choose(rows, LONG, short)
    assert decision["tile"] == A and decision["threshold"] == 2048
    assert decision["speedup_over_mixed"]["1x8192@0"] == pytest.approx(2.5)
    # It loses at the longest chunks: no switch at all, whatever shorter chunks do.
    rows[0]["ms"] = 3.0
    assert longctx.choose(rows, LONG, short)["threshold"] is None


def test_the_on_daemon_serves_whatever_ran_correctly() -> None:
    assert longctx.engine_switch(None, 1024) == (None, 1024, "--threshold (no kernel phase)")
    assert longctx.engine_switch({"tile": A, "threshold": 512}, 1024)[:2] == (A, 512)
    # It lost at some 8k case: still measured in the engine, for the longest chunks only.
    assert longctx.engine_switch({"tile": A, "threshold": None}, 1024)[:2] == (A, 8192)
    assert longctx.engine_switch({"tile": None, "threshold": None}, 1024)[:2] == (None, None)


def test_choose_says_so_when_no_tile_ran_correctly() -> None:
    rows = [_row("mixed-batch kernel", c, 10.0) for c in LONG] + [_row("prefill kernel", c, None, A) for c in LONG]
    decision = longctx.choose(rows, LONG, [])
    assert decision["tile"] is None and decision["threshold"] is None


def test_a_server_that_dies_is_reported_with_its_log(tmp_path: Path) -> None:
    server = longctx_serve.Server("doomed", ["bash", "-c", "echo 'no GPU for you'; exit 3"], port=9)
    server.start(tmp_path / "doomed.log")
    with pytest.raises(RuntimeError, match="(?s)exited with status 3.*no GPU for you"):
        server.wait_healthy(time.monotonic() + 30)
    server.stop()


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    """vLLM's API server spawns its engine core: stopping the server must take both."""
    pid_file = tmp_path / "child.pid"
    server = longctx_serve.Server("tree", ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], port=9)
    server.start(tmp_path / "tree.log")
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert server.stop(grace_s=5) < 15
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_prefill_kernel_compiles_for_hopper_without_spills(tmp_path: Path) -> None:
    """The default tile through Triton and ptxas for sm_90a on this CPU machine: what the
    interpreter cannot show (the lowering: wgmma, async copies, registers, shared memory)."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton wheel has no ptxas")
    assert longctx.main(["--phase", "compile", "--tiles", "default", "--results-dir", str(tmp_path)]) == 0
    [row] = _result(tmp_path, "longctx-compile")["compile"]
    assert row["spill_bytes"] == 0 and row["registers"] <= 255
    assert row["wgmma"] > 0 and row["cp_async"] > 0  # Hopper MMAs, K/V tiles copied asynchronously
    # Pipelined as deep as num_stages asks, the block-id gather notwithstanding (ids carried ahead):
    # a buffer per stage, and the next tile still loading while the loop waits for its own.
    stages = row["tile"]["num_stages"]
    assert row["kv_buffers"] == stages and row["tiles_in_flight"] == stages - 2
    assert row["shared_bytes"] <= 227 * 1024


@pytest.mark.parametrize(("num_seqs", "q_len", "ctx"), [(1, 12, 0), (3, 5, 19)])
def test_sdpa_check_equals_the_paged_reference(num_seqs: int, q_len: int, ctx: int) -> None:
    """SDPA over the gathered K/V is what the GPU run checks every kernel against (and times for
    scale): the same attention as the paged reference, causal from the bottom right after a context."""
    from appliance_kernels import reference

    heads = (8, 2, 16)
    args = longctx._batch(num_seqs, q_len, ctx, torch.device("cpu"), heads, torch.float32)
    _, run = longctx._sdpa_run(args, 0.3, q_len, ctx, heads)
    want = reference.paged_attention_ref(*args, 0.3)
    torch.testing.assert_close(run(), want, rtol=1e-5, atol=1e-5)
    # 64-token pages in order (the TMA runs) hold the same sequences.
    torch.testing.assert_close(reference.paged_attention_ref(*longctx._repage(args, 64), 0.3), want)


@pytest.mark.parametrize("window", [None, 7])
def test_lean_decode_reference_equals_the_paged_reference(window: int | None) -> None:
    from appliance_kernels import reference

    args = longctx._batch(3, 1, 40, torch.device("cpu"), (8, 2, 16), torch.float32)
    want = reference.paged_attention_ref(*args, 0.3, sliding_window=window)
    torch.testing.assert_close(longctx.decode_ref(args, 0.3, window), want, rtol=1e-5, atol=1e-5)


def test_ratios_use_what_both_servers_measured() -> None:
    ours = {"mixed": {"total_tok_s": 300.0}, "alone": {"median_ttft_ms": 90.0, "median_tpot_ms": 10.0}}
    cut = {"mixed": {"total_tok_s": 200.0}}  # the peer's run ended before its alone workload
    assert longctx_serve.ratios(ours, cut) == {"mixed_total_tok_s": 1.5}
    full = {**cut, "alone": {"median_ttft_ms": 100.0, "median_tpot_ms": 10.0}}
    r = longctx_serve.ratios(ours, full)
    assert r == {"mixed_total_tok_s": 1.5, "alone_median_ttft": 0.9, "alone_median_tpot": 1.0}
    assert all(longctx_serve.targets(r).values())
    assert longctx_serve.ratios(ours, {"error": "never healthy"}) == {}
