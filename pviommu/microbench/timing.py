"""The timed loop every case shares: warm-up, then one request in flight at a time,
each round trip timed, the backend's CPU taken from /proc around it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .stats import CpuMeter, placed, result_row

WARMUP = 200


def timed(case: str, placement: str, backend_pid: int, requests: int,
          one: Callable[[int], int], after_warmup: Callable[[], None] | None = None,
          **extra: Any) -> dict[str, Any]:
    """Runs ``one(i)`` (one request; returns its round trip in ns) ``WARMUP`` times,
    calls ``after_warmup``, then runs it ``requests`` times, with client and backend
    where ``placement`` says."""
    with placed(placement, backend_pid):
        for i in range(WARMUP):
            one(i)
        if after_warmup is not None:
            after_warmup()
        samples = []
        meter = CpuMeter(backend_pid)
        meter.start()
        start = time.perf_counter()
        for i in range(requests):
            samples.append(one(i))
        elapsed = time.perf_counter() - start
        cpu = meter.stop(requests)
    return result_row(case, placement, samples, elapsed, cpu, **extra)
