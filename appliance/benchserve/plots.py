"""PNG plots next to the JSON result (matplotlib, the `plots` extra):

- `<stem>-throughput-latency.png`: p50/p99 TTFT and ITL against output throughput, one point per
  load (the curve an operator reads a budget off);
- `<stem>-percentiles.png`: TTFT and ITL percentiles per load point;
- `<stem>-capacity.png` (capacity mode): each probe's measured SLO metrics against its rate, with
  the limits and the answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'llm-appliance[plots]' (or pass --no-plots)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _values(runs: list[dict[str, Any]], metric: str, stat: str) -> list[float]:
    """One figure per run; NaN (a gap in the line) where a run has none (every request failed)."""
    out = []
    for r in runs:
        v = r["latency_ms"][metric].get(stat)
        out.append(float("nan") if v is None else v)
    return out


def _label(run: dict[str, Any]) -> str:
    rate, conc = run["load"]["rate"], run["load"]["concurrency"]
    if conc is not None and rate == "inf":
        return f"c={conc}"
    return f"{rate}/s" + (f" c={conc}" if conc is not None else "")


def write_all(stem: Path, runs: list[dict[str, Any]], percentiles: list[str],
              capacity: dict[str, Any] | None = None) -> list[Path]:
    plt = _pyplot()
    paths = [_throughput_latency(plt, stem, runs), _percentiles(plt, stem, runs, percentiles)]
    if capacity is not None:
        paths.append(_capacity(plt, stem, capacity))
    return paths


def _throughput_latency(plt: Any, stem: Path, runs: list[dict[str, Any]]) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [r["output_throughput"] for r in runs]
    for ax, metric, name in ((axes[0], "ttft", "TTFT"), (axes[1], "itl", "ITL")):
        for stat, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(x, _values(runs, metric, stat), style, label=f"{stat} {name}")
        for xi, r in zip(x, runs, strict=True):
            y = r["latency_ms"][metric].get("p99")
            if y is not None:
                ax.annotate(_label(r), (xi, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("latency against throughput")
    fig.tight_layout()
    path = stem.with_name(stem.name + "-throughput-latency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _percentiles(plt: Any, stem: Path, runs: list[dict[str, Any]], percentiles: list[str]) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [_label(r) for r in runs]
    xs = range(len(runs))
    for ax, metric, name in ((axes[0], "ttft", "TTFT"), (axes[1], "itl", "ITL")):
        drawn = []
        for stat in percentiles:
            drawn += _values(runs, metric, stat)
            ax.plot(list(xs), _values(runs, metric, stat), "o-", label=stat)
        ax.set_xticks(list(xs), labels, rotation=30, fontsize=8)
        ax.set_xlabel("load")
        ax.set_ylabel(f"{name} (ms)")
        if any(v > 0 for v in drawn):  # NaN compares False: an all-failed sweep stays linear
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("TTFT and ITL percentiles per load")
    fig.tight_layout()
    path = stem.with_name(stem.name + "-percentiles.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _capacity(plt: Any, stem: Path, capacity: dict[str, Any]) -> Path:
    probes = sorted(capacity["probes"], key=lambda p: p["rate"])
    checks = probes[0]["run"]["slos"]["checks"] if probes else []
    fig, axes = plt.subplots(1, max(len(checks), 1), figsize=(5.5 * max(len(checks), 1), 4.2), squeeze=False)
    for i, check in enumerate(checks):
        ax = axes[0][i]
        rates = [p["rate"] for p in probes]
        measured = [p["run"]["slos"]["checks"][i]["measured_ms"] for p in probes]
        measured = [float("nan") if m is None else m for m in measured]
        colors = ["tab:green" if p["met"] else "tab:red" for p in probes]
        ax.scatter(rates, measured, c=colors, zorder=3)
        ax.plot(rates, measured, "-", color="gray", alpha=0.5)
        ax.axhline(check["limit_ms"], color="black", linestyle="--", label=check["slo"])
        if capacity["capacity_rate"] is not None:
            ax.axvline(capacity["capacity_rate"], color="tab:blue", linestyle=":",
                       label=f"capacity {capacity['capacity_rate']:.3g} req/s")
        ax.set_xlabel("Poisson rate (req/s)")
        ax.set_ylabel(f"{check['slo'].split(' ')[0]} {check['metric'].upper()} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("capacity search (green: met, red: missed)")
    fig.tight_layout()
    path = stem.with_name(stem.name + "-capacity.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
