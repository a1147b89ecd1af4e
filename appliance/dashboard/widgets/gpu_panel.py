"""All GPU cards: one per GPU, in a grid that uses the width of a wide terminal and scrolls when
a box has more GPUs than fit; before the first NVML sample it says it is sampling."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.reactive import reactive

from appliance.dashboard.widgets.gpu_card import GpuCard, NoGpuCard
from appliance.status import GpuSnapshot


class GpuPanel(VerticalScroll):
    DEFAULT_CSS = """
    GpuPanel {
        layout: grid;
        grid-size: 1;
        grid-gutter: 0 1;
        grid-rows: auto;
        height: auto;
        max-height: 12;
    }
    """

    gpus: reactive[GpuSnapshot | None] = reactive(None)

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._shape: tuple[int, str | None] | None = None  # (GPU count, error) the cards were built for

    def on_mount(self) -> None:
        self.mount(NoGpuCard("sampling NVML…"))

    def watch_gpus(self, snapshot: GpuSnapshot | None) -> None:
        if snapshot is None:
            return
        shape = (len(snapshot.gpus), snapshot.error)
        if shape != self._shape:
            self._shape = shape
            self.remove_children()
            if snapshot.error is not None or not snapshot.gpus:
                self.mount(NoGpuCard(snapshot.error or "no NVIDIA GPU"))
            else:
                self.mount_all(GpuCard(g, id=f"gpu-{g.index}") for g in snapshot.gpus)
            return
        for card, reading in zip(self.query(GpuCard), snapshot.gpus, strict=True):
            card.reading = reading
