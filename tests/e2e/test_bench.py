"""The benchmark end to end, cut down: one round, two short fio jobs, on the lab API."""

import pytest

from pviommu.scenarios import bench, bench_report
from pviommu.scenarios.workloads import BY_NAME

pytestmark = pytest.mark.e2e
MiB = 1 << 20


async def test_one_round_measures_every_path_and_counts_round_trips(qemu, assets, tmp_path):
    workloads = (BY_NAME["randread-4k-qd1"], BY_NAME["read-1m-huge"])
    plan = bench.BenchPlan(workloads=workloads, rounds=1, runtime=1, image_bytes=32 * MiB,
                           paths=("pv", "vsmmu", "builtin"), micro_requests=200)
    trace = tmp_path / "bench.json"
    result = await bench.run(qemu, assets, tmp_path / "work", plan, trace=trace)
    rows = {(r["iommu"], r["workload"]): r for r in result["table"]}
    assert set(rows) == {(m, w.name) for m in ("strict", "lazy") for w in workloads}
    for row in rows.values():
        assert set(row["paths"]) == {"pv", "vsmmu", "builtin"}
        for cell in row["paths"].values():
            assert cell["iops"] > 0 and cell["mib_s"] > 0
            assert 0 < cell["clat_p50_us"] <= cell["clat_p99_us"]
        # Every request maps at least its buffer: round trips are counted per I/O.
        assert row["paths"]["pv"]["round_trips_per_io"][0] >= 2
        assert row["paths"]["vsmmu"]["round_trips_per_io"][0] >= 0
        assert row["paths"]["builtin"]["ratio"] == 1.0
    assert {r["case"] for r in result["micro"]["rows"]} >= {
        "PV-IOMMU MAP/UNMAP (vhost-user)"}
    assert len(bench_report.cost_model(result)) == 4  # both workloads are QD1, both modes
    traces = sorted(p.name for p in tmp_path.glob("bench-r0-*.json"))
    assert traces == ["bench-r0-lazy-pv.json", "bench-r0-lazy-vsmmu.json",
                      "bench-r0-strict-pv.json", "bench-r0-strict-vsmmu.json"]
