"""One card per GPU (nvitop's view, condensed): utilisation, memory, temperature, power against
its limit, SM and memory clocks, throttle reasons, ECC errors, processes. N/A where a GPU does not
report a field; `NoGpuCard` on a machine without an NVIDIA GPU."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from appliance.dashboard import format as fmt
from appliance.dashboard.widgets.panel import ALARM, WARN, bar
from appliance.status import GpuReading

_CARD_CSS = """
    border: round $secondary;
    border-title-style: bold;
    padding: 0 1;
    height: auto;
"""
# NOTE: cards draw 3 lines on narrow terminals (the app's "-narrow" breakpoint), else 4.


def _ratio(used: float | None, total: float | None) -> float | None:
    return used / total if used is not None and total else None


def _clock(now: int | None, top: int | None) -> str:
    if now is None:
        return fmt.NA
    return f"{now}/{top} MHz" if top is not None else f"{now} MHz"


def gpu_title(reading: GpuReading) -> str:
    return f"GPU {reading.index} · {reading.name or fmt.NA}"


def gpu_card_lines(g: GpuReading, width: int, lines: int = 4) -> list[Text]:
    """The card's lines (4, or 3 when short of rows) for a content width of `width` cells."""
    util_text = fmt.percent(g.utilization_percent)
    mem_text = fmt.of(fmt.size(g.memory_used_bytes), fmt.size(g.memory_total_bytes))
    # Two bars share what the labels leave of the first line.
    bar_width = max(4, (width - len(util_text) - len(mem_text) - 13) // 2)
    mem_ratio = _ratio(g.memory_used_bytes, g.memory_total_bytes)
    line1 = Text.assemble(("util ", "dim"), bar(_ratio(g.utilization_percent, 100.0), bar_width),
                          (f" {util_text:>4}", "bold"), ("  mem ", "dim"), bar(mem_ratio, bar_width),
                          f" {mem_text}")
    power_ratio = _ratio(g.power_w, g.power_limit_w)
    power = (f"{g.power_w:.0f} / {g.power_limit_w:.0f} W" if g.power_w is not None and g.power_limit_w
             else fmt.unit(g.power_w, "W"))
    hot = g.temperature_c is not None and g.temperature_c >= 85
    temp_power = Text.assemble(
        ("temp ", "dim"), (fmt.unit(g.temperature_c, "°C"), ALARM if hot else ""),
        ("  power ", "dim"), (power, WARN if power_ratio and power_ratio >= 0.95 else ""))
    clocks = Text.assemble(("SM ", "dim"), _clock(g.sm_clock_mhz, g.sm_clock_max_mhz),
                           ("  mem ", "dim"), _clock(g.memory_clock_mhz, g.memory_clock_max_mhz))
    ecc = Text.assemble(("ECC ", "dim"),
                        (f"{fmt.count(g.ecc_errors_corrected)} corr {fmt.count(g.ecc_errors_uncorrected)} uncorr",
                         ALARM if g.ecc_errors_uncorrected else ""))
    if g.throttle_reasons is None:
        throttle = fmt.NA
    else:
        slowdowns = [r for r in g.throttle_reasons if r != "idle"]
        throttle = ", ".join(slowdowns) if slowdowns else ("idle" if g.throttle_reasons else "none")
    throttle_text = Text.assemble(("throttle ", "dim"),
                                  (throttle, "" if throttle in ("none", "idle", fmt.NA) else WARN))
    if g.processes is None:
        procs = fmt.NA
    elif not g.processes:
        procs = "none"
    else:
        procs = ", ".join(f"{p.pid} {p.name or '?'} {fmt.size(p.used_memory_bytes)}" for p in g.processes)
    procs_text = Text.assemble(("procs ", "dim"), procs)
    gap = Text("  ")
    if lines >= 4:
        out = [line1,
               Text.assemble(temp_power, ("  fan ", "dim"), fmt.percent(g.fan_percent),
                             ("  mem busy ", "dim"), fmt.percent(g.memory_utilization_percent)),
               Text.assemble(clocks, gap, ecc),
               Text.assemble(throttle_text, gap, procs_text)]
    else:  # an 80x24 terminal: the same figures less fan and memory-controller load, in three lines
        out = [line1, Text.assemble(temp_power, gap, clocks), Text.assemble(throttle_text, gap, ecc, gap, procs_text)]
    for line in out:
        line.truncate(width, overflow="ellipsis")
        line.no_wrap = True
    return out


class GpuCard(Static):
    DEFAULT_CSS = f"GpuCard {{ {_CARD_CSS} }}"

    reading: reactive[GpuReading | None] = reactive(None)

    def __init__(self, reading: GpuReading, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.set_reactive(GpuCard.reading, reading)

    def on_mount(self) -> None:
        self._redraw()

    def watch_reading(self) -> None:
        self._redraw()

    def on_resize(self) -> None:
        self._redraw()

    def _redraw(self) -> None:
        if self.reading is None:
            return
        self.border_title = gpu_title(self.reading)
        self.border_subtitle = self.reading.uuid[:12] if self.reading.uuid else None
        self.update(self._render_card())

    def _render_card(self) -> RenderableType:
        assert self.reading is not None
        # NOTE: by the screen's breakpoint, not the card's height: the GPU grid sizes its rows to
        # the cards' content, so a card would only ever see the height of what it drew last.
        narrow = self.screen.has_class("-narrow")
        return Group(*gpu_card_lines(self.reading, max(self.content_region.width, 20), lines=3 if narrow else 4))


class NoGpuCard(Static):
    """Why there is no GPU to show (no driver, no device, NVML failing)."""

    DEFAULT_CSS = f"NoGpuCard {{ {_CARD_CSS} height: 3; column-span: 2; }}"

    def __init__(self, message: str, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.border_title = "GPU"
