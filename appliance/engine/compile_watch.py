"""Triton kernels compiled while serving, logged with what they cost.

The warm-up compiles the kernels for the shapes it runs (decode graphs, lone-prefill graphs, a short
request). A step of a shape it did not cover (a kernel variant specialised on a new constant, a
tile choice for a size never seen) compiles on first use: that step, and every request in it,
waits for the compiler, typically 0.2-2 s, and only once per process (once per machine, while
Triton's on-disk cache survives). An operator sees a slow first request and nothing else; this
names the kernel and the time, so the warm-up can be made to cover it.

NOTE: Triton's `knobs.runtime.jit_cache_hook` runs before every compile on a miss of the in-memory
cache (a load from the on-disk cache too) and `jit_post_compile_hook` after it; the first hook's
return value would skip the compile when true, so it returns None. Hooks another party installed
are left in place and chained. Nothing is installed when Triton is absent or lacks the hooks.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class CompileWatch:
    """Counts and logs the compiles that happen after `install()`."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._local = threading.local()  # compiles run on the thread that launches the kernel
        self._previous: tuple[Any, Any] = (None, None)
        self._hooks = (self.before, self.after)  # bound once: installed and compared by identity

    def before(self, **kwargs: Any) -> bool | None:
        self._local.started = time.perf_counter()
        previous = self._previous[0]
        return previous(**kwargs) if previous is not None else None

    def after(self, **kwargs: Any) -> Any:
        started = getattr(self._local, "started", None)
        self._local.started = None
        seconds = time.perf_counter() - started if started is not None else 0.0
        self.count += 1
        self.seconds += seconds
        fn = kwargs.get("fn")
        name = f"{getattr(fn, 'module', '?')}.{getattr(fn, 'name', '?')}" if fn is not None else "?"
        log.warning("Triton compiled %s while serving, in %.2f s: a shape the warm-up did not cover "
                    "(the steps of this shape after it are fast). Specialisation: %s",
                    name, seconds, kwargs.get("repr", "?"))
        previous = self._previous[1]
        return previous(**kwargs) if previous is not None else None

    def install(self) -> bool:
        try:
            from triton import knobs
        except ImportError:
            return False
        runtime = getattr(knobs, "runtime", None)
        if runtime is None or not hasattr(runtime, "jit_cache_hook") or not hasattr(runtime, "jit_post_compile_hook"):
            return False
        self._previous = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = self._hooks
        return True

    def uninstall(self) -> None:
        try:
            from triton import knobs
        except ImportError:
            return
        if knobs.runtime.jit_cache_hook is self._hooks[0]:
            knobs.runtime.jit_cache_hook = self._previous[0]
        if knobs.runtime.jit_post_compile_hook is self._hooks[1]:
            knobs.runtime.jit_post_compile_hook = self._previous[1]


_WATCH: CompileWatch | None = None


def watch_compiles() -> CompileWatch | None:
    """The process's watch, installed on the first call (after an engine's warm-up); None when
    Triton has no hooks to install."""
    global _WATCH
    if _WATCH is None:
        watch = CompileWatch()
        if not watch.install():
            return None
        _WATCH = watch
    return _WATCH


def compiles_so_far() -> int:
    """Compiles seen by this process's watch since it was installed (0 without one)."""
    return _WATCH.count if _WATCH is not None else 0
