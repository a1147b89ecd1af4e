"""appliance/gc_watch.py: a long pause of the cyclic garbage collector is logged with its duration."""

from __future__ import annotations

import gc
import logging

from appliance.gc_watch import GcPauseWatch, watch_gc_pauses


def _cyclic_garbage(n: int) -> None:
    for _ in range(n):
        a: list = []
        b = [a]
        a.append(b)


def test_a_collection_over_the_threshold_is_logged_and_shorter_ones_counted(caplog):
    watch = GcPauseWatch("engine", threshold_s=0.0).install()  # every collection is "long"
    quiet = GcPauseWatch("engine", threshold_s=3600.0).install()
    try:
        _cyclic_garbage(10_000)
        with caplog.at_level(logging.WARNING, logger="appliance.gc_watch"):
            gc.collect()
    finally:
        watch.uninstall()
        quiet.uninstall()
    assert watch.collections >= 1 and watch.long_pauses == watch.collections
    assert quiet.collections == watch.collections and quiet.long_pauses == 0
    assert quiet.longest_s > 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("engine: the garbage collector paused" in m and "generation 2" in m for m in messages), messages
    assert watch not in gc.callbacks and quiet not in gc.callbacks


def test_one_watch_per_process_names_every_role(monkeypatch):
    from appliance import gc_watch

    monkeypatch.setattr(gc_watch, "_WATCH", None)  # this process's own stays as it is
    first = watch_gc_pauses("engine")
    try:
        assert watch_gc_pauses("daemon") is first and watch_gc_pauses("engine") is first
        assert first.where == "engine+daemon" and first in gc.callbacks
    finally:
        first.uninstall()
