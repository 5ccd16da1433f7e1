"""The backend micro-benchmark, run very short: its result's shape and sanity (not its
speed: timings are for BENCHMARKS.md, not for tests)."""

from __future__ import annotations

import os

import pytest

from pviommu.microbench import markdown, run_micro
from pviommu.microbench.floor import measure_floor
from pviommu.microbench.stats import summary


def test_summary_is_median_and_p99_in_us() -> None:
    s = summary([i * 1000 for i in range(1, 101)])
    assert s == {"n": 100, "median_us": 51.0, "p99_us": 100.0}
    assert summary([])["n"] == 0


def test_the_floor_is_measured_on_one_core_and_across_two() -> None:
    floor = measure_floor(100)
    kinds = {"one_core", "unpinned"} | ({"cross_core"} if len(os.sched_getaffinity(0)) > 1
                                       else set())
    assert set(floor) == kinds
    for f in floor.values():
        assert f["n"] == 100 and 0 < f["median_us"] <= f["p99_us"]


def test_a_short_run_has_every_case_with_sane_figures(tmp_path) -> None:
    result = run_micro(requests=200, placements=("any",), floor_rounds=200,
                       workdir=tmp_path)
    assert result["floor"]["one_core"]["median_us"] > 0
    cases = [r["case"] for r in result["rows"]]
    assert any("MAP/UNMAP" in c for c in cases)
    assert any("vfio-user" in c for c in cases)
    assert any("MISS cycle" in c for c in cases) and any("INVALIDATE" in c for c in cases)
    for row in result["rows"]:
        assert row["placement"] == "any"
        assert row["n"] > 0 and 0 < row["median_us"] <= row["p99_us"], row
        if "derived_from" not in row:
            assert row["requests_per_s"] > 0 and row["backend_cpu_us"] >= 0, row
    strict = next(r for r in result["rows"] if "misses_per_read" in r)
    assert strict["misses_per_read"] >= 1
    assert list(tmp_path.iterdir()) == []  # the sockets, images and logs are gone
    table = markdown(result)
    assert "eventfd ping-pong floor" in table
    assert table.count("| unpinned |") == len(result["rows"])


def test_unknown_cases_and_placements_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown cases"):
        run_micro(requests=1, cases=("nope",))
    with pytest.raises(ValueError, match="unknown placements"):
        run_micro(requests=1, placements=("cpu7",))
