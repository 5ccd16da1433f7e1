"""The machine's wake-up floor: an eventfd ping-pong between two processes.

A round trip is one write to the child's eventfd and a blocking read of the
parent's: two wake-ups of a process blocked in the kernel, what every
backend round trip pays at least. Across cores (parent on CPU 0, child on
CPU 1), on one core (both on CPU 0), and unpinned."""

from __future__ import annotations

import os
import time

from .stats import summary, two_cpus

WARMUP = 200


def _child(ping: int, pong: int, rounds: int) -> None:
    for _ in range(rounds):
        os.read(ping, 8)
        os.write(pong, b"\1\0\0\0\0\0\0\0")


def ping_pong(rounds: int, parent_cpu: int | None, child_cpu: int | None) -> list[int]:
    """``rounds`` timed round trips (ns) between this process and a forked child."""
    ping = os.eventfd(0, os.EFD_CLOEXEC)
    pong = os.eventfd(0, os.EFD_CLOEXEC)
    everything = os.sched_getaffinity(0)
    total = rounds + WARMUP
    pid = os.fork()
    if pid == 0:  # the child: answers, then leaves without running any cleanup
        code = 0
        try:
            if child_cpu is not None:
                os.sched_setaffinity(0, {child_cpu})
            _child(ping, pong, total)
        except BaseException:
            code = 1
        os._exit(code)
    samples = []
    try:
        if parent_cpu is not None:
            os.sched_setaffinity(0, {parent_cpu})
        one = b"\1\0\0\0\0\0\0\0"
        clock = time.perf_counter_ns
        for i in range(total):
            t0 = clock()
            os.write(ping, one)
            os.read(pong, 8)
            if i >= WARMUP:
                samples.append(clock() - t0)
    finally:
        os.sched_setaffinity(0, everything)
        os.waitpid(pid, 0)
        os.close(ping)
        os.close(pong)
    return samples


def floor_samples(rounds: int = 5000) -> dict[str, list[int]]:
    """Round trips (ns) on one core (``one_core``: the first CPU this process may use),
    across cores (``cross_core``: the first two, 0 and 1 on most machines; left out
    with one CPU), and ``unpinned`` (where the scheduler puts the two)."""
    first, second = two_cpus()
    floor = {"one_core": ping_pong(rounds, first, first),
             "unpinned": ping_pong(rounds, None, None)}
    if second != first:
        floor["cross_core"] = ping_pong(rounds, first, second)
    return floor


def measure_floor(rounds: int = 5000) -> dict[str, dict[str, float]]:
    """:func:`floor_samples` as medians and p99s in µs."""
    return {k: summary(v) for k, v in floor_samples(rounds).items()}
