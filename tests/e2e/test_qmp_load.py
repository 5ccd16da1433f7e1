"""Load on the control plane: a second QMP client polls the mappings at 100 Hz
while the guest runs fio, in both modes; the runs with and without it are
compared (README "Reliability" holds a full run; this checks that the
measurement works, not what it measures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pviommu.scenarios import qmp_load
from pviommu.scenarios.workloads import BY_NAME

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("mode", qmp_load.MODES)
async def test_polling_the_mappings_under_guest_io_is_measured(mode: str, tmp_path: Path
                                                               ) -> None:
    plan = qmp_load.LoadPlan(modes=(mode,), pairs=2, runtime=2,
                             workloads=(BY_NAME["randread-4k-qd1"],))
    report = await qmp_load.load_mode(mode, plan, tmp_path / mode)
    runs = report["runs"]
    # ABBA: the first pair runs unpolled first, the second polled first.
    assert [r["polled"] for r in runs] == [False, True, True, False]
    assert all(r["iops"] > 0 and r["ios"] > 0 for r in runs)
    for r in runs:
        if not r["polled"]:
            assert "poller" not in r
            continue
        poller = r["poller"]
        assert poller["error_count"] == 0, poller["errors"]
        assert poller["polls"] > 0
        # The poller saw the guest's own mappings: the disk's rings and buffers (pv),
        # stage 2's ranges over guest RAM (vsmmu).
        assert poller["mappings_last_seen"] > 0
    [row] = report["compare"]
    assert row["workload"] == "randread-4k-qd1" and row["unit"] == "iops"
    assert sorted(row["unpolled"] + row["polled"]) == sorted(r["iops"] for r in runs)
    assert row["within_noise"] == (min(row["unpolled"]) <= row["median_polled"]
                                   <= max(row["unpolled"]))
    assert report["backend_tracebacks"] == 0
    assert "| within noise |" in qmp_load.markdown([report], plan)
