#!/usr/bin/env python3
"""Can llm-appliance-runtime-cuda's CUDA runtime drive the GPU of the box this runs on?

The runtime package (~2.8 GB) cannot be carried to a GPU box for a check, and its torch is built for
the suite's Python (3.11 bookworm, 3.13 trixie), not necessarily the box's. What decides whether
it will run there is the CUDA runtime it ships (NVIDIA's libcudart from the nvidia-cuda-runtime
wheel) against the box's driver, and the GPU's compute capability against the architectures torch
was built for. This script checks exactly those with the package's own libcudart.so (under 1 MB),
stdlib only: runtime and driver versions, the devices, each device's capability in ARCH_LIST, and
a real allocation + memset + synchronize on each device.

Usage (on the GPU box):
  python3 packaging/gpu-check.py LIBCUDART [--arch-list sm_75,sm_80,...]
LIBCUDART: libcudart.so.N taken out of the runtime-cuda .deb, e.g.
  mkdir -p .cache/gpu-check && dpkg-deb --fsys-tarfile dist/bookworm/llm-appliance-runtime-cuda_*.deb |
    tar -x -C .cache/gpu-check --wildcards --no-anchored 'nvidia/cu*/lib/libcudart.so.*'
ARCH_LIST: torch's architectures (`torch._C._cuda_getArchFlags()`; packaging/test-install --runtime
cuda prints them). Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

_ATTR_CC_MAJOR = 75  # cudaDevAttrComputeCapabilityMajor
_ATTR_CC_MINOR = 76  # cudaDevAttrComputeCapabilityMinor


class CudaRuntime:
    def __init__(self, path: str) -> None:
        self.lib = ctypes.CDLL(path)
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    def call(self, name: str, *args: object) -> None:
        rc = getattr(self.lib, name)(*args)
        if rc != 0:
            raise RuntimeError(f"{name}: error {rc} ({self.lib.cudaGetErrorString(rc).decode()})")

    def int_out(self, name: str, *args: object) -> int:
        value = ctypes.c_int()
        self.call(name, ctypes.byref(value), *args)
        return value.value


def version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("libcudart")
    parser.add_argument("--arch-list", default="", help="torch's sm_XY architectures, comma-separated")
    args = parser.parse_args(argv)
    failures: list[str] = []
    try:
        check(CudaRuntime(args.libcudart), args, failures)
    except (OSError, RuntimeError) as e:  # the library does not load, or a CUDA call failed
        failures.append(str(e))
    for f in failures:
        print("FAIL:", f)
    print("OK" if not failures else "FAILED")
    return 0 if not failures else 1


def check(rt: CudaRuntime, args: argparse.Namespace, failures: list[str]) -> None:
    runtime, driver = rt.int_out("cudaRuntimeGetVersion"), rt.int_out("cudaDriverGetVersion")
    print(f"CUDA runtime {version(runtime)} ({args.libcudart}), driver supports CUDA {version(driver)}")
    if driver // 1000 < runtime // 1000:
        failures.append(f"the driver (CUDA {version(driver)}) is older than the runtime's major version")
    count = rt.int_out("cudaGetDeviceCount")
    print(f"{count} device(s)")
    if count < 1:
        failures.append("no CUDA device")
    archs = {a.strip() for a in args.arch_list.split(",") if a.strip()}
    for dev in range(count):
        cc = (rt.int_out("cudaDeviceGetAttribute", _ATTR_CC_MAJOR, dev),
              rt.int_out("cudaDeviceGetAttribute", _ATTR_CC_MINOR, dev))
        sm = f"sm_{cc[0]}{cc[1]}"
        line = f"device {dev}: compute capability {cc[0]}.{cc[1]} ({sm})"
        if archs:
            ok = sm in archs
            line += " in torch's arch list" if ok else f" NOT in torch's arch list {sorted(archs)}"
            if not ok:
                failures.append(f"device {dev}: {sm} not built for")
        print(line)
        rt.call("cudaSetDevice", dev)
        ptr, size = ctypes.c_void_p(), 1 << 20
        rt.call("cudaMalloc", ctypes.byref(ptr), ctypes.c_size_t(size))
        rt.call("cudaMemset", ptr, 0x5A, ctypes.c_size_t(size))
        host = (ctypes.c_ubyte * size)()
        rt.call("cudaMemcpy", host, ptr, ctypes.c_size_t(size), 2)  # cudaMemcpyDeviceToHost
        rt.call("cudaDeviceSynchronize")
        rt.call("cudaFree", ptr)
        if any(b != 0x5A for b in host):
            failures.append(f"device {dev}: memset/copy round trip wrong")
        else:
            print(f"device {dev}: 1 MiB allocated, set, copied back and checked")


if __name__ == "__main__":
    sys.exit(main())
