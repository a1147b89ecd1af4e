"""When each request is released: all at once (rate inf), a Poisson process, or gamma arrivals.

Gaps are gamma-distributed with shape `burstiness` and mean 1/rate: burstiness 1 is a Poisson
process, below 1 burstier, above 1 more regular (vLLM's convention). The schedule is then scaled
so the last arrival falls at exactly num/rate seconds, as vLLM does: the sum of N random gaps
strays a few percent from N/rate, and the offered load would stray with it between seeds.
A fixed concurrency is not a schedule: the runner holds a semaphore (see runner.py).
"""

from __future__ import annotations

import math
import random


def parse_rate(text: str) -> float:
    value = float(text)  # "inf" parses
    if not value > 0:
        raise ValueError(f"request rate {text!r} must be positive (or inf)")
    return value


def schedule_s(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Arrival offsets in seconds from the start, non-decreasing, one per request."""
    if num < 1:
        raise ValueError("need at least one request")
    if not burstiness > 0:
        raise ValueError(f"burstiness {burstiness} must be positive")
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    mean_gap_s = 1.0 / rate
    offsets = []
    t = 0.0
    for _ in range(num):
        t += rng.gammavariate(burstiness, mean_gap_s / burstiness)
        offsets.append(t)
    scale = (num / rate) / offsets[-1]
    return [o * scale for o in offsets]
