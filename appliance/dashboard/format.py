"""Human-readable figures for the dashboard and `ctl`: one place decides how a duration, a byte
count or a missing reading looks. Standard library only. None always reads as N/A."""

from __future__ import annotations

import grp
import os
import stat

NA = "N/A"


def duration(total_s: float | None) -> str:
    """Whole seconds as 1h02m03s / 2m03s / 3s."""
    if total_s is None:
        return NA
    total = int(total_s)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    if h >= 24:
        d, h = divmod(h, 24)
        return f"{d}d{h:02d}h{m:02d}m"
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def seconds(value_s: float | None, *, compact: bool = False) -> str:
    """A latency: 850 µs, 12.3 ms, 1.24 s (compact: 850µs, 12ms, 1.24s)."""
    if value_s is None:
        return NA
    sep = "" if compact else " "
    if value_s < 1e-3:
        return f"{value_s * 1e6:.0f}{sep}µs"
    if value_s < 1.0:
        return f"{value_s * 1e3:.0f}{sep}ms" if compact and value_s >= 0.1 else f"{value_s * 1e3:.1f}{sep}ms"
    return f"{value_s:.2f}{sep}s"


def size(num_bytes: float | None) -> str:
    """Binary units, as nvidia-smi and nvitop show memory: 512 MiB, 79.6 GiB."""
    if num_bytes is None:
        return NA
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit != "MiB" or value >= 100 else f"{value:.1f} {unit}"
        value /= 1024
    # GiB keep a decimal: 79.6 of 80 GiB is a different story from 79.0.
    return f"{value:.1f} GiB" if value < 1024 else f"{value / 1024:.1f} TiB"


def percent(ratio_or_percent: float | None, *, ratio: bool = False) -> str:
    if ratio_or_percent is None:
        return NA
    value = ratio_or_percent * 100 if ratio else ratio_or_percent
    return f"{value:.0f}%" if value >= 10 or value == 0 else f"{value:.1f}%"


def rate(per_s: float | None, unit: str = "") -> str:
    """A rate with a short suffix: 12.3k tok/s."""
    if per_s is None:
        return NA
    suffix = f" {unit}" if unit else ""
    if per_s >= 10_000:
        return f"{per_s / 1000:.1f}k{suffix}"
    if per_s >= 100:
        return f"{per_s:.0f}{suffix}"
    return f"{per_s:.1f}{suffix}"


def count(value: int | float | None) -> str:
    """An integer with thin grouping: 12,345 / 1.2M."""
    if value is None:
        return NA
    if value >= 10_000_000:
        return f"{value / 1e6:.1f}M"
    return f"{int(value):,}"


def unit(value: float | int | None, suffix: str, digits: int = 0) -> str:
    """A reading with its unit (62 °C, 350 W, 1980 MHz), N/A when absent."""
    if value is None:
        return NA
    return f"{value:.{digits}f} {suffix}"


def of(used: str, total: str) -> str:
    return f"{used} / {total}"


def socket_error(path: str, error: OSError) -> str:
    """Why the control socket cannot be opened, in the operator's terms: a permission problem
    names the group to join."""
    if isinstance(error, PermissionError):
        try:
            group = grp.getgrgid(os.stat(path).st_gid).gr_name
        except (OSError, KeyError):
            group = "llm-appliance"
        return (f"permission denied on {path}: join its group ({group}): "
                f"`sudo usermod -aG {group} $USER`, then log in again")
    if isinstance(error, FileNotFoundError):
        return f"no daemon: {path} does not exist (is llm-appliance running?)"
    if isinstance(error, ConnectionRefusedError):
        return f"no daemon listens on {path} (a stale socket: the daemon stopped or crashed)"
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return f"{path} is not a socket"
    except OSError:
        pass
    return f"cannot connect to {path}: {error.strerror or error}"
