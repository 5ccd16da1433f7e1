"""The benchmark end to end, cut down: one round, small tests, on the lab API."""

import pytest

from pviommu.scenarios import bench

pytestmark = pytest.mark.e2e
MiB = 1 << 20


async def test_one_round_measures_every_path_and_counts_round_trips(qemu, assets, tmp_path):
    plan = bench.BenchPlan(tests=[("read", 4096, MiB), ("write", 65536, 2 * MiB)], rounds=1,
                           image_bytes=16 * MiB, paths=("pv", "vsmmu", "builtin"))
    trace = tmp_path / "bench.json"
    result = await bench.run(qemu, assets, tmp_path / "work", plan, trace=trace)
    rows = {(r["iommu"], r["op"], r["bs"]): r for r in result["table"]}
    assert set(rows) == {(m, op, bs) for m in ("strict", "lazy")
                         for op, bs, _ in plan.tests}
    for row in rows.values():
        assert set(row["paths"]) == {"pv", "vsmmu", "builtin"}
        assert all(cell["mib_s"] > 0 for cell in row["paths"].values())
        # A 4 KiB read maps and unmaps at least one page per request: 256 reads a MiB.
        if row["bs"] == 4096:
            assert row["paths"]["pv"]["round_trips_per_mib"][0] >= 512
            assert row["paths"]["vsmmu"]["round_trips_per_mib"][0] > 0
    traces = sorted(p.name for p in tmp_path.glob("bench-r0-*.json"))
    assert traces == ["bench-r0-lazy-pv.json", "bench-r0-lazy-vsmmu.json",
                      "bench-r0-strict-pv.json", "bench-r0-strict-vsmmu.json"]
