"""engine/compile_watch.py: a Triton compile after warm-up is logged with its kernel and time.

Under TRITON_INTERPRET nothing compiles, so the hooks are driven here the way Triton's JIT calls
them (jit_cache_hook before a compile, jit_post_compile_hook after, keyword arguments); the
installation is checked against the installed Triton's real `knobs.runtime`."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest

from appliance.engine.compile_watch import CompileWatch


def test_a_compile_is_logged_with_its_kernel_and_time(caplog):
    watch = CompileWatch()
    fn = SimpleNamespace(module="appliance_kernels.attention", name="_paged_attention_kernel")
    with caplog.at_level(logging.WARNING, logger="appliance.engine.compile_watch"):
        assert watch.before(key="k", repr="_paged_attention_kernel[num_warps=4](q: *bf16)", fn=fn, compile={},
                            is_manual_warmup=False, already_compiled=False) is None  # never skips the compile
        time.sleep(0.05)
        watch.after(key="k", repr="_paged_attention_kernel[num_warps=4](q: *bf16)", fn=fn, compile={},
                    is_manual_warmup=False, already_compiled=False)
    assert watch.count == 1 and 0.04 <= watch.seconds < 5
    (record,) = caplog.records
    message = record.getMessage()
    assert "appliance_kernels.attention._paged_attention_kernel" in message and "while serving" in message
    assert "num_warps=4" in message


def test_install_chains_the_hooks_already_there_and_uninstall_restores_them():
    knobs = pytest.importorskip("triton").knobs
    seen = []
    knobs.runtime.jit_cache_hook = lambda **kw: seen.append(("before", kw["key"]))
    knobs.runtime.jit_post_compile_hook = lambda **kw: seen.append(("after", kw["key"]))
    previous = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    watch = CompileWatch()
    try:
        assert watch.install()
        assert knobs.runtime.jit_cache_hook is not previous[0]
        knobs.runtime.jit_cache_hook(key="a", repr="r", fn=None)
        knobs.runtime.jit_post_compile_hook(key="a", repr="r", fn=None)
        assert seen == [("before", "a"), ("after", "a")] and watch.count == 1
    finally:
        watch.uninstall()
        assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == previous
        knobs.runtime.jit_cache_hook = knobs.runtime.jit_post_compile_hook = None
