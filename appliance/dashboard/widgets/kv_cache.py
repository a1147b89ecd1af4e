"""KV cache: blocks in use (a bar), prefix-cache hit rate, preemptions."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from appliance.dashboard import format as fmt
from appliance.dashboard.widgets.panel import DASH, StatusPanel, bar, row
from appliance.status import StatusSnapshot


class KvCachePanel(StatusPanel):
    TITLE = "KV cache"

    def render_status(self, status: StatusSnapshot | None) -> RenderableType:
        w = self.inner_width
        engine = status.engine if status is not None else None
        if engine is None:
            return Group(bar(None, w), row("blocks", DASH, 8), row("prefix", DASH, 8), row("preempt", DASH, 8))
        usage = fmt.percent(engine.kv_cache_usage, ratio=True)
        lines = [
            Text.assemble(bar(engine.kv_cache_usage, w - 5), (f" {usage:>4}", "bold")),
            row("blocks", f"{fmt.count(engine.num_kv_blocks_used)}/{fmt.count(engine.num_kv_blocks_total)}", 8),
            row("prefix", f"{fmt.percent(engine.prefix_cache_hit_rate, ratio=True)} hit", 8),
            row("preempt", fmt.count(engine.num_preemptions), 8),
        ]
        if self.content_region.height >= 5:
            lines.insert(2, row("cached", f"{fmt.count(engine.num_kv_blocks_cached)} blocks", 8))
        return Group(*lines)
