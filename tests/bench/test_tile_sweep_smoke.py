"""`python -m appliance_bench.tile_sweep --smoke`: the sweep harness on CPU (Triton interpreter)."""

from __future__ import annotations

import json
from pathlib import Path

from appliance_bench import tile_sweep


def test_tile_sweep_smoke_checks_and_records_each_case(tmp_path: Path) -> None:
    for phase in ("decode", "prefill"):
        assert tile_sweep.main(["--phase", phase, "--smoke", "--results-dir", str(tmp_path)]) == 0
        [path] = tmp_path.glob(f"*-tile-sweep-{phase}-smoke.json")
        rows = json.loads(path.read_text())["rows"]
        assert rows and all(r["rel_err"] < 1e-4 and r["us"] > 0 for r in rows)
    from appliance_kernels import attention

    # The sweep restores the tables it changed.
    assert attention.DECODE_TILE["block_n"] == 64 and attention.PREFILL_TILE["rows"] == 64
