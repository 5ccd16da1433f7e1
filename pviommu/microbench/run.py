"""The micro-benchmark as a whole: the wake-up floor before and after, the PV and the
vSMMU cases, one result dict, and its Markdown table."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from .floor import floor_samples
from .pv import run_pv
from .served import environment_note
from .stats import PLACEMENTS, summary
from .vsmmu import run_vsmmu

CASES = ("pv", "vsmmu")
PLACEMENT_NAMES = {"any": "unpinned", "cross": "2 cores", "same": "1 core"}
FLOOR_OF = {"any": "unpinned", "cross": "cross_core", "same": "one_core"}
"""The floor each placement is compared with."""


def run_micro(requests: int = 20000, placements: tuple[str, ...] = PLACEMENTS,
              floor_rounds: int = 5000, cases: tuple[str, ...] = CASES,
              workdir: Path | None = None) -> dict[str, Any]:
    """Runs the micro-benchmark against real ``pviommu serve`` processes.

    ``requests`` round trips per case and placement (the strict vSMMU reads: a
    fifth of them), ``floor_rounds`` eventfd ping-pongs, half before the cases and
    half after. ``placements`` are some of ``any`` (unpinned), ``cross`` (client and
    backend on two CPUs), ``same`` (both on one). Returns ``floor`` (``cross_core``
    and ``one_core``: n, median_us, p99_us), ``rows`` (one per case and placement:
    case, placement, n, median_us, p99_us, requests_per_s, backend_cpu_us,
    client_cpu_us, trips: how many floor round trips its wake-ups amount to; rows
    with ``derived_from`` are parts of another row's requests), ``environment`` and
    ``duration_s``. Each placement's rows compare with the floor of the same
    placement: ``cross_core``, ``one_core``, ``unpinned``.
    """
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown cases {unknown}: choose from {', '.join(CASES)}")
    unknown = [p for p in placements if p not in PLACEMENTS]
    if unknown:
        raise ValueError(f"unknown placements {unknown}: choose from {', '.join(PLACEMENTS)}")
    start = time.monotonic()
    environment = environment_note()
    before = floor_samples(max(1, floor_rounds // 2))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pviommu-micro-", dir=workdir) as tmp:
        if "pv" in cases:
            rows += run_pv(Path(tmp), requests, placements)
        if "vsmmu" in cases:
            rows += run_vsmmu(Path(tmp), requests, placements)
    after = floor_samples(max(1, floor_rounds // 2))
    floor = {k: summary(before[k] + after[k]) | {"median_before_us": summary(before[k])[
        "median_us"], "median_after_us": summary(after[k])["median_us"]} for k in before}
    return {"floor": floor, "rows": rows, "floor_rounds": floor_rounds, "requests": requests,
            "environment": environment + "; after: " + environment_note().split(", ", 1)[1],
            "duration_s": time.monotonic() - start}


def _floor_of(result: dict[str, Any], row: dict[str, Any]) -> float | None:
    floor = result["floor"]
    kind = FLOOR_OF[row["placement"]]
    if kind not in floor:
        return None
    median_us: float = floor[kind]["median_us"]
    trips: int = row.get("trips", 1)
    return median_us * trips


def markdown(result: dict[str, Any]) -> str:
    """The result as Markdown: the floor, then a table of every case and placement."""
    floor = result["floor"]
    lines = []
    for kind, name in (("cross_core", "across cores (CPUs 0 and 1)"),
                       ("one_core", "on one core (CPU 0)"), ("unpinned", "unpinned")):
        if kind in floor:
            f = floor[kind]
            lines.append(f"- eventfd ping-pong floor {name}: median {f['median_us']:.1f} µs, "
                         f"p99 {f['p99_us']:.1f} µs ({f['n']} round trips; median "
                         f"{f['median_before_us']:.1f} before the cases, "
                         f"{f['median_after_us']:.1f} after)")
    lines += ["", "| case | placement | requests/s | median µs | p99 µs | median / floor "
              "| backend CPU µs/request |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        floor_us = _floor_of(result, row)
        trips = row.get("trips", 1)
        ratio = "" if not floor_us else f"{row['median_us'] / floor_us:.2f}x" + (
            f" of {trips:g} trips" if trips != 1 else "")
        rate = f"{row['requests_per_s']:.0f}" if "requests_per_s" in row else "(part)"
        cpu = f"{row['backend_cpu_us']:.1f}" if "backend_cpu_us" in row else ""
        if "derived_from" in row and cpu:
            cpu += " (derived)"
        case = row["case"]
        if "misses_per_read" in row:
            case += f", {row['misses_per_read']:g} misses/read"
        lines.append(f"| {case} | {PLACEMENT_NAMES.get(row['placement'], row['placement'])} "
                     f"| {rate} | {row['median_us']:.1f} | {row['p99_us']:.1f} | {ratio} "
                     f"| {cpu} |")
    lines += ["", f"{result['requests']} requests per case and placement; "
              f"{result['environment']}; {result['duration_s']:.0f} s."]
    return "\n".join(lines)


def profile_map_unmap(out: Path, requests: int = 20000, top: int = 25) -> str:
    """Runs MAP/UNMAP round trips (unpinned) against a backend under cProfile, writes the
    profile to ``out`` and returns its ``top`` functions by own time, and by
    cumulative time, as text."""
    import io
    import pstats

    with tempfile.TemporaryDirectory(prefix="pviommu-micro-") as tmp:
        rows = run_pv(Path(tmp), requests, ("any",), profile=out)
    text = io.StringIO()
    row = rows[0]
    text.write(f"{requests} MAP/UNMAP under cProfile: median {row['median_us']:.1f} µs, "
               f"backend CPU {row['backend_cpu_us']:.1f} µs/request\n")
    stats = pstats.Stats(str(out), stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()
