"""The soak, one minute in all (CI's budget): 30 s of guest I/O per mode under
injected faults and revocations; README "Reliability" holds a 10-minute run."""

import pytest

from pviommu.scenarios import soak

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("mode", soak.MODES)
async def test_a_short_soak_loses_nothing_and_leaks_nothing(mode, tmp_path):
    plan = soak.SoakPlan(seconds=30, modes=(mode,), sample_every=3)
    report = await soak.soak_mode(mode, plan, tmp_path / mode)
    summary = {k: v for k, v in report.items() if k != "samples"}
    assert soak.ok(report), (summary, report["samples"])
    # The host's actions did reach the guest: some requests failed and were retried.
    assert report["guest_io_errors"] > 0
    assert report["guest"]["write_retries"] + report["guest"]["read_retries"] > 0
