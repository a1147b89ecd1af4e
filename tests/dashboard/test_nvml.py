"""The NVML sampler on this machine (no NVIDIA driver: the real library is absent, so its error
path is the real one) and the GPU card's text for readings with every field and with fields a GPU
does not report."""

from __future__ import annotations

import subprocess
import sys

import pytest

from appliance.dashboard.nvml import NvmlSampler, throttle_reason_names
from appliance.dashboard.widgets.gpu_card import gpu_card_lines, gpu_title
from appliance.status import GpuProcess, GpuReading, GpuSnapshot, from_json, to_json


def _has_nvml() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_has_nvml(), reason="this machine has an NVIDIA driver: the no-GPU path is not reachable")
def test_without_a_gpu_the_sampler_says_so_and_never_raises() -> None:
    sampler = NvmlSampler()
    first = sampler.sample()
    assert first.gpus == [] and first.error is not None
    assert first.error.startswith("no NVIDIA GPU: ")
    assert "NVML Shared Library Not Found" in first.error  # pynvml's own message, passed through
    again = sampler.sample()  # retried only every REINIT_INTERVAL_S: the same answer, no raise
    assert again.error == first.error
    sampler.close()


def test_the_sampler_runs_without_torch() -> None:
    code = ("import sys; from appliance.dashboard.nvml import NvmlSampler; NvmlSampler().sample(); "
            "import appliance.dashboard.app; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_throttle_reason_bits() -> None:
    assert throttle_reason_names(0) == []
    assert throttle_reason_names(0x1) == ["idle"]
    assert throttle_reason_names(0x4 | 0x40) == ["power cap", "hw thermal"]


# Inputs for the card's text: the shape of NVML's answers for an H200 SXM (no fan: NVML answers
# NOT_SUPPORTED, so None), with values chosen by this test.
BUSY = GpuReading(
    index=0, name="NVIDIA H200", uuid="GPU-5d1a5c7e-0000-4000-8000-000000000000",
    utilization_percent=97.0, memory_utilization_percent=61.0,
    memory_used_bytes=127_331_844_096, memory_total_bytes=150_754_820_096,
    temperature_c=71.0, power_w=688.4, power_limit_w=700.0,
    sm_clock_mhz=1755, sm_clock_max_mhz=1980, memory_clock_mhz=3201, memory_clock_max_mhz=3201,
    fan_percent=None, throttle_reasons=["power cap"], ecc_errors_corrected=0, ecc_errors_uncorrected=0,
    processes=[GpuProcess(pid=4242, name="llm-appliance", used_memory_bytes=126_000_000_000)],
)
BARE = GpuReading(index=3)  # a GPU that answers nothing but its index


def _text(lines: list) -> str:
    return "\n".join(line.plain for line in lines)


def test_card_text_of_a_busy_gpu() -> None:
    text = _text(gpu_card_lines(BUSY, 76))
    assert gpu_title(BUSY) == "GPU 0 · NVIDIA H200"
    assert "97%" in text and "118.6 GiB / 140.4 GiB" in text
    assert "temp 71 °C" in text and "power 688 / 700 W" in text and "fan N/A" in text
    assert "SM 1755/1980 MHz" in text and "mem 3201/3201 MHz" in text
    assert "ECC 0 corr 0 uncorr" in text and "throttle power cap" in text
    assert "procs 4242 llm-appliance 117.3 GiB" in text
    assert len(gpu_card_lines(BUSY, 76)) == 4 and all(len(line.plain) <= 76 for line in gpu_card_lines(BUSY, 76))


def test_card_text_of_a_recorded_h200() -> None:
    """Readings NVML gave on an H200 under a matmul load (bench/gpu_dashboard_card.py)."""
    from recorded import recorded_gpus

    snapshot = recorded_gpus("gpu_h200")
    (h200,) = snapshot.gpus
    text = _text(gpu_card_lines(h200, 96))
    assert gpu_title(h200) == "GPU 0 · NVIDIA H200" and snapshot.driver_version == "580.159.04"
    assert "100%" in text and "1.6 GiB / 140.4 GiB" in text
    assert "temp 57 °C" in text and "power 690 / 700 W" in text
    assert "fan N/A" in text  # an SXM board has no fan: NVML answers NOT_SUPPORTED
    assert "SM 1455/1980 MHz" in text and "mem 3201/3201 MHz" in text
    assert "throttle power cap" in text and "ECC 0 corr 0 uncorr" in text
    assert "procs 555 python3 1002 MiB" in text


def test_card_text_in_three_lines_keeps_the_alarms() -> None:
    lines = gpu_card_lines(BUSY, 76, lines=3)
    text = _text(lines)
    assert len(lines) == 3 and "power 688 / 700 W" in text and "throttle power cap" in text and "ECC" in text


def test_every_missing_field_reads_na() -> None:
    text = _text(gpu_card_lines(BARE, 76))
    assert gpu_title(BARE) == "GPU 3 · N/A"
    assert "N/A / N/A" in text  # memory used / total
    for label in ("temp N/A", "power N/A", "fan N/A", "SM N/A", "throttle N/A", "procs N/A", "ECC N/A corr N/A"):
        assert label in text, label


def test_readings_cross_json_unchanged() -> None:
    snapshot = GpuSnapshot(gpus=[BUSY, BARE], driver_version="570.86.15", sampled_at_s=1.5)
    assert from_json(GpuSnapshot, to_json(snapshot)) == snapshot
