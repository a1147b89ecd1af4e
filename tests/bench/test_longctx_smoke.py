"""`python -m appliance_bench.longctx --smoke`: the long-context harness on CPU (Triton interpreter,
tiny shapes), so the GPU run's one command keeps working."""

from __future__ import annotations

import json
from pathlib import Path

from appliance_bench import longctx


def test_longctx_smoke_checks_and_records_every_case(tmp_path: Path) -> None:
    assert longctx.main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    [path] = tmp_path.glob("*-longctx-smoke.json")
    result = json.loads(path.read_text())
    prefill, decode, engine = result["prefill"], result["decode"], result["engine"]
    assert {row["kernel"] for row in prefill} == {"mixed-batch kernel", "prefill kernel"}
    assert any(row["tile"].get("tma") for row in prefill)  # the TMA-box variant is swept too
    assert all(row["rel_err"] < 1e-4 and row["us"] > 0 for row in prefill + decode)
    assert any(row["sliding_window"] for row in decode)
    assert engine["max_model_len"] == 2048
    for label in ("mixed-batch kernel", "prefill kernel"):
        assert engine[label]["alone_32k"]["ttft_s"] > 0 and engine[label]["batch"]["total_tok_s"] > 0
    from appliance_kernels import attention

    assert attention.LONG_PREFILL_MIN_QUERY_TOKENS is None  # the switch is restored
