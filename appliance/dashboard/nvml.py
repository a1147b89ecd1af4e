"""GPU readings from NVML (nvidia-ml-py's `pynvml`), as plain `GpuSnapshot`s.

`NvmlSampler.sample()` blocks (NVML calls take up to milliseconds each), so the dashboard calls it
from a thread worker about once a second, never on the UI loop. Nothing here raises: a machine
without the NVIDIA driver gives a snapshot with `error` set ("no NVIDIA GPU"), and a field a GPU
or driver does not report (NOT_SUPPORTED, NO_PERMISSION, ...) is None, shown as N/A. The UI never
sees a pynvml handle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from appliance.status import GpuProcess, GpuReading, GpuSnapshot

T = TypeVar("T")

# After a failed nvmlInit (no driver yet, or a driver reload), try again this often.
REINIT_INTERVAL_S = 10.0

# Clock event ("throttle") reason bits, as nvml.h defines them; names for the card.
THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "idle"),
    (0x2, "app clocks"),
    (0x4, "power cap"),
    (0x8, "hw slowdown"),
    (0x10, "sync boost"),
    (0x20, "sw thermal"),
    (0x40, "hw thermal"),
    (0x80, "power brake"),
    (0x100, "display clocks"),
)


def throttle_reason_names(mask: int) -> list[str]:
    """Names of the set bits; "idle" alone is not a slowdown worth shouting about, but shown."""
    return [name for bit, name in THROTTLE_REASONS if mask & bit]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _process_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() or None
    except OSError:
        return None  # another PID namespace (a container) or gone already


class NvmlSampler:
    """Samples every GPU NVML sees. Thread-safe (one lock); `close()` shuts NVML down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None  # the pynvml module once nvmlInit succeeded
        self._init_error: str | None = None
        self._last_init_s = -REINIT_INTERVAL_S

    def _ensure_init(self) -> str | None:
        """None when NVML is up, else why not (kept until the next retry)."""
        if self._nvml is not None:
            return None
        now = time.monotonic()
        if self._init_error is not None and now - self._last_init_s < REINIT_INTERVAL_S:
            return self._init_error
        self._last_init_s = now
        try:
            import pynvml
        except ImportError:
            self._init_error = "no NVIDIA GPU: nvidia-ml-py is not installed"
            return self._init_error
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            self._init_error = f"no NVIDIA GPU: {e}"
            return self._init_error
        self._nvml = pynvml
        self._init_error = None
        return None

    def sample(self) -> GpuSnapshot:
        with self._lock:
            error = self._ensure_init()
            if error is not None:
                return GpuSnapshot(error=error, sampled_at_s=time.time())
            nvml = self._nvml
            try:
                count = nvml.nvmlDeviceGetCount()
            except nvml.NVMLError as e:
                return GpuSnapshot(error=f"NVML: cannot count GPUs: {e}", sampled_at_s=time.time())
            if count == 0:
                return GpuSnapshot(error="no NVIDIA GPU: the driver sees none", sampled_at_s=time.time())
            driver = self._get(nvml.nvmlSystemGetDriverVersion)
            gpus = [self._reading(i) for i in range(count)]
            return GpuSnapshot(gpus=gpus, driver_version=_text(driver) if driver is not None else None,
                               sampled_at_s=time.time())

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except self._nvml.NVMLError:
                    pass  # shutting down anyway
                self._nvml = None

    def _get(self, fn: Callable[..., T], *args: Any) -> T | None:
        """One NVML call; None when the GPU or driver does not answer it."""
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def _reading(self, index: int) -> GpuReading:
        nvml, get = self._nvml, self._get
        handle = get(nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            return GpuReading(index=index)
        name = get(nvml.nvmlDeviceGetName, handle)
        uuid = get(nvml.nvmlDeviceGetUUID, handle)
        util = get(nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = get(nvml.nvmlDeviceGetMemoryInfo, handle)
        power_mw = get(nvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = get(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        # The "clocks event" name is the newer one (nvidia-ml-py 12.535+); the bits are the same.
        reasons_fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        reasons = get(reasons_fn, handle)
        return GpuReading(
            index=index,
            name=_text(name) if name is not None else None,
            uuid=_text(uuid) if uuid is not None else None,
            utilization_percent=float(util.gpu) if util is not None else None,
            memory_utilization_percent=float(util.memory) if util is not None else None,
            memory_used_bytes=int(memory.used) if memory is not None else None,
            memory_total_bytes=int(memory.total) if memory is not None else None,
            temperature_c=_float(get(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)),
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
            sm_clock_mhz=get(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
            sm_clock_max_mhz=get(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM),
            memory_clock_mhz=get(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM),
            memory_clock_max_mhz=get(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM),
            fan_percent=_float(get(nvml.nvmlDeviceGetFanSpeed, handle)),
            throttle_reasons=throttle_reason_names(int(reasons)) if reasons is not None else None,
            ecc_errors_corrected=get(nvml.nvmlDeviceGetTotalEccErrors, handle,
                                     nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC),
            ecc_errors_uncorrected=get(nvml.nvmlDeviceGetTotalEccErrors, handle,
                                       nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC),
            processes=self._processes(handle),
        )

    def _processes(self, handle: Any) -> list[GpuProcess] | None:
        compute = self._get(self._nvml.nvmlDeviceGetComputeRunningProcesses, handle)
        if compute is None:
            return None
        out = []
        for p in compute:
            used = getattr(p, "usedGpuMemory", None)
            # NVML reports "not available" (e.g. inside a container) as None or as a huge sentinel.
            used_bytes = int(used) if isinstance(used, int) and 0 <= used < (1 << 62) else None
            out.append(GpuProcess(pid=int(p.pid), name=_process_name(int(p.pid)), used_memory_bytes=used_bytes))
        return out


def _float(value: Any) -> float | None:
    return float(value) if value is not None else None
