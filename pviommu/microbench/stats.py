"""What the micro-benchmark measures with: percentiles of round trips, a process's CPU
time from /proc, CPU placement, and the timed wait on an eventfd."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PLACEMENTS = ("any", "cross", "same")
"""Where the client and the backend run: unpinned, on two CPUs, both on one CPU."""


def two_cpus() -> tuple[int, int]:
    """The first two CPUs this process may run on (the same one twice if it has one):
    CPU 0 and 1 on most machines."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[0], allowed[min(1, len(allowed) - 1)]


def summary(samples_ns: list[int]) -> dict[str, float]:
    """Count, median and p99 of round trips given in ns, in µs."""
    s = sorted(samples_ns)
    if not s:
        return {"n": 0, "median_us": 0.0, "p99_us": 0.0}
    return {"n": len(s), "median_us": s[len(s) // 2] / 1000,
            "p99_us": s[min(len(s) - 1, (len(s) * 99) // 100)] / 1000}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads) so far, in s."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


class CpuMeter:
    """The CPU a process spends between :meth:`start` and :meth:`stop`, per request."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._t0 = 0.0
        self._own0 = 0.0

    def start(self) -> None:
        """Takes the starting figures (the backend's and this process's own)."""
        self._t0 = cpu_seconds(self.pid)
        self._own0 = time.process_time()

    def stop(self, requests: int) -> dict[str, float]:
        """Backend and client CPU per request since :meth:`start`, in µs."""
        backend = cpu_seconds(self.pid) - self._t0
        own = time.process_time() - self._own0
        return {"backend_cpu_us": backend / requests * 1e6,
                "client_cpu_us": own / requests * 1e6}


def cpus(placement: str) -> tuple[set[int] | None, set[int] | None]:
    """The (client, backend) CPU sets of ``placement`` (None: leave as it is)."""
    first, second = two_cpus()
    if placement == "cross":
        return {first}, {second}
    if placement == "same":
        return {first}, {first}
    if placement == "any":
        return None, None
    raise ValueError(f"placement {placement!r} is not one of {', '.join(PLACEMENTS)}")


def pin_process(pid: int, cpu_set: set[int]) -> None:
    """Pins every thread of process ``pid`` (threads made later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpu_set)


@contextmanager
def placed(placement: str, backend_pid: int) -> Iterator[None]:
    """Runs the block with this process and the backend where ``placement`` says,
    and puts both back on every CPU after it."""
    client, backend = cpus(placement)
    everything = os.sched_getaffinity(0)
    if client is not None and backend is not None:
        os.sched_setaffinity(0, client)
        pin_process(backend_pid, backend)
    try:
        yield
    finally:
        if client is not None:
            os.sched_setaffinity(0, everything)
            pin_process(backend_pid, everything)


def wait_fd(poller: select.poll, timeout_ms: int = 5000) -> list[tuple[int, int]]:
    """Polls; raises TimeoutError when nothing is ready within ``timeout_ms``."""
    ready = poller.poll(timeout_ms)
    if not ready:
        raise TimeoutError("the backend did not answer")
    return ready


def take_eventfd(fd: int) -> int:
    """Reads an eventfd's counter (0 if it was not signalled: non-blocking fds)."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def result_row(kind: str, placement: str, samples_ns: list[int], elapsed_s: float,
               cpu: dict[str, float], **extra: Any) -> dict[str, Any]:
    """One measured case: its round trips, rate and CPU per request."""
    return {"case": kind, "placement": placement, **summary(samples_ns),
            "requests_per_s": len(samples_ns) / elapsed_s if elapsed_s else 0.0,
            **cpu, **extra}
