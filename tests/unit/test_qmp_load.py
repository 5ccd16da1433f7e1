"""The control-plane load measurement's comparison: medians, change, noise, verdict."""

from pviommu.scenarios.qmp_load import LoadPlan, compare, markdown
from pviommu.scenarios.workloads import BY_NAME

W = BY_NAME["randread-4k-qd1"]


def _run(iops: float, polled: bool) -> dict:
    row = {"workload": W.name, "polled": polled, "iops": iops, "mib_s": iops / 256,
           "clat_p99_us": 1.0, "backend_cpu_ms_per_s": 100.0 + 50 * polled, "pair": 0}
    if polled:
        row["poller"] = {"hz": 99.0, "p50_ms": 1.0, "p99_ms": 3.0, "error_count": 0,
                         "missed_ticks": 0}
    return row


def test_a_polled_median_inside_the_unpolled_range_is_within_the_noise():
    runs = [_run(100, False), _run(120, False), _run(110, False),
            _run(105, True), _run(119, True), _run(90, True)]
    [row] = compare(runs, (W,))
    assert (row["median_unpolled"], row["median_polled"]) == (110, 105)
    assert row["change"] == round(105 / 110 - 1, 4)
    assert row["noise"] == round(20 / 110, 4)
    assert row["within_noise"] is True
    assert (row["backend_cpu_ms_per_s_unpolled"], row["backend_cpu_ms_per_s_polled"]) == (
        100.0, 150.0)


def test_a_polled_median_outside_the_range_is_not():
    runs = [_run(100, False), _run(101, False), _run(90, True), _run(91, True)]
    [row] = compare(runs, (W,))
    assert row["within_noise"] is False
    assert "| NO |" in markdown([{"mode": "pv", "runs": runs, "compare": [row]}], LoadPlan())


def test_one_unpolled_run_has_no_noise_and_no_verdict():
    [row] = compare([_run(100, False), _run(90, True)], (W,))
    assert row["noise"] is None and row["within_noise"] is None
