"""The launchers' host-side integer helpers give what Triton's (ConstexprFunction) versions give."""

from __future__ import annotations

import triton
from appliance_kernels.intmath import cdiv, next_power_of_2


def test_next_power_of_2_matches_triton() -> None:
    assert [next_power_of_2(n) for n in range(9)] == [0, 1, 2, 4, 4, 8, 8, 8, 8]
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1 << 17))


def test_cdiv_matches_triton() -> None:
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(4097) for b in (1, 2, 3, 7, 16, 64, 100, 128))
