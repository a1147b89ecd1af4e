"""`--capacity`: the highest Poisson request rate at which a run still meets every SLO.

Search: from `start` double the rate while runs pass (halve while they fail), which brackets the
answer between a passing and a failing rate; then bisect the bracket until it is narrower than
`tolerance` (relative) or the probe budget is spent. Each probe is a full run (fresh prompts,
its own seed) long enough to hold `min_prompts` requests and `seconds` of arrivals. The answer is
the highest passing rate, a lower bound: the true limit lies below the lowest failing one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.benchserve.metrics import Slo

Probe = Callable[[float], Awaitable[dict[str, Any]]]  # rate -> a run result (with "slos")


@dataclass(frozen=True)
class CapacitySearch:
    start_rate: float = 1.0
    min_rate: float = 0.05
    max_rate: float = 4096.0
    tolerance: float = 0.05
    max_probes: int = 14


def _passes(run: dict[str, Any]) -> bool:
    return bool(run.get("slos", {}).get("met"))


async def search(probe: Probe, spec: CapacitySearch) -> dict[str, Any]:
    if not 0 < spec.min_rate <= spec.start_rate <= spec.max_rate:
        raise ValueError("capacity search needs 0 < min rate <= start rate <= max rate")
    probes: list[dict[str, Any]] = []

    async def attempt(rate: float) -> bool:
        run = await probe(rate)
        ok = _passes(run)
        probes.append({"rate": rate, "met": ok, "run": run})
        return ok

    passing: float | None = None
    failing: float | None = None
    rate = spec.start_rate
    # Bracket the answer.
    if await attempt(rate):
        passing = rate
        while rate < spec.max_rate and len(probes) < spec.max_probes:
            rate = min(rate * 2, spec.max_rate)
            if await attempt(rate):
                passing = rate
            else:
                failing = rate
                break
    else:
        failing = rate
        while rate > spec.min_rate and len(probes) < spec.max_probes:
            rate = max(rate / 2, spec.min_rate)
            if await attempt(rate):
                passing = rate
                break
            failing = rate
    # Narrow it.
    while (passing is not None and failing is not None and failing / passing - 1 > spec.tolerance
           and len(probes) < spec.max_probes):
        mid = (passing + failing) / 2
        if await attempt(mid):
            passing = mid
        else:
            failing = mid
    if passing is None:
        status = "below_min_rate"
    elif failing is None:
        status = "at_least_max_rate" if passing >= spec.max_rate else "probe_budget_spent"
    else:
        status = "converged" if failing / passing - 1 <= spec.tolerance else "probe_budget_spent"
    return {"capacity_rate": passing, "lowest_failing_rate": failing, "status": status,
            "tolerance": spec.tolerance, "probes": probes}


def answer_line(result: dict[str, Any], slos: Sequence[Slo], workload: str) -> str:
    """The one line an operator needs ("serves 21.5 req/s with p99 TTFT ≤ 500 ms ... at these lengths")."""
    limits = " and ".join(s.describe() for s in slos)
    rate, failing = result["capacity_rate"], result["lowest_failing_rate"]
    if rate is None:
        return (f"does not meet {limits} even at {failing:.3g} req/s ({workload})")
    bound = f", not at {failing:.3g}" if failing is not None else ""
    prefix = "serves at least" if result["status"] == "at_least_max_rate" else "serves"
    note = " (probe budget spent before the bracket narrowed)" if result["status"] == "probe_budget_spent" else ""
    return f"{prefix} {rate:.3g} req/s with {limits} at these lengths ({workload}){bound}{note}"
