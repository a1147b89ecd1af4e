"""Host-side integer helpers for the launchers: what `triton.cdiv` and `triton.next_power_of_2`
compute, as plain Python. Triton's are `ConstexprFunction` wrappers (usable inside kernels too) and
cost ~2.8 us a call on the host; an eager layer's launchers call them ~17 times, so an eager step of
a 30-layer model spent ~1.4 ms of host time in them."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for b > 0 (as triton.cdiv)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1, and 0 for n = 0 (as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
