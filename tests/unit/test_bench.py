"""The benchmark's bookkeeping and tables (the numbers themselves come from real
guests: ./run bench)."""

from pviommu import cli
from pviommu.scenarios import bench, bench_report
from pviommu.scenarios.workloads import BY_NAME, WORKLOADS, job_result

QD1, BIG = BY_NAME["randread-4k-qd1"], BY_NAME["write-1m-huge"]


def _row(iops, mib_s, p50=100.0, p99=300.0, trips=None):
    row = {"iops": iops, "mib_s": mib_s, "ios": 1000, "clat_p50_us": p50,
           "clat_p99_us": p99}
    if trips is not None:
        row.update({"round_trips_per_io": trips, "by_kind": {"map": trips / 2}})
    return row


def _result():
    samples = {
        ("pv", "strict", QD1.name): [_row(400, 1.6, trips=8.0)] * 2 + [_row(200, 0.8, trips=8.0)],
        ("vsmmu", "strict", QD1.name): [_row(x, x / 256, trips=12.0) for x in (200, 250, 300)],
        ("builtin", "strict", QD1.name): [_row(x, x / 256) for x in (1000, 1100, 1040)],
        ("qsd", "strict", QD1.name): [_row(2000, 7.8)] * 3,
        ("pv", "lazy", BIG.name): [_row(90, x, trips=2.0) for x in (90.0, 80.0, 100.0)],
        ("builtin", "lazy", BIG.name): [_row(100, 100.0)],
    }
    paths = bench.PATHS
    return {"table": bench_report.summarize(samples, [QD1, BIG], paths), "paths": list(paths)}


def test_the_summary_takes_medians_ratios_and_round_trips_per_io():
    strict, lazy = _result()["table"]
    assert (strict["iommu"], strict["workload"], strict["metric"]) == (
        "strict", QD1.name, "iops")
    pv = strict["paths"]["pv"]
    assert pv["iops"] == 400 and pv["ratio"] == round(400 / 1040, 3)
    assert pv["samples"] == [400, 400, 200] and pv["round_trips_per_io"] == [8.0] * 3
    assert pv["round_trips"] == "MAP+UNMAP" and pv["clat_p99_us"] == 300.0
    assert "round_trips" not in strict["paths"]["builtin"]
    assert "smmuv3-builtin" not in strict["paths"]  # never measured: left out
    assert strict["vsmmu_to_qsd"] == round(250 / 2000, 3)
    assert lazy["metric"] == "mib_s" and lazy["paths"]["pv"]["ratio"] == 0.9
    assert "vsmmu" not in lazy["paths"] and "vsmmu_to_qsd" not in lazy


def test_a_row_without_the_anchor_has_no_ratio():
    [row] = bench_report.summarize({("vsmmu", "lazy", QD1.name): [_row(5, 0.1, trips=3.0)]},
                                   [QD1], bench.PATHS)
    assert row["paths"]["vsmmu"]["ratio"] is None


def test_round_trips_per_io_sum_only_the_paths_round_trips():
    got = bench.per_io({"miss": 10, "update": 10, "invalidate": 4, "composed_hits": 100},
                       bench.ROUND_TRIPS["vsmmu"], 2)
    assert got["round_trips_per_io"] == 12.0
    assert got["by_kind"]["composed_hits"] == 50.0


def test_the_tables():
    result = _result()
    lines = bench_report.markdown(result).splitlines()
    assert lines[0].startswith("| IOMMU | workload | unit | PV | vSMMU | built-in")
    assert lines[2] == (f"| strict | {QD1.name} | IOPS | 400 | 250 | 1040 | 0.39 | 0.24 "
                        "| 8.0 (8.0-8.0) | 12.0 (12.0-12.0) |")
    assert lines[3] == (f"| lazy | {BIG.name} | MiB/s | 90.0 | - | 100.0 | 0.90 | - "
                        "| 2.0 (2.0-2.0) | - |")
    refs = bench_report.markdown_references(result).splitlines()
    assert refs[2] == f"| strict | {QD1.name} | IOPS | 250 | - | 2000 | 0.12 |"
    latency = bench_report.markdown_latency(result).splitlines()
    assert latency[2].startswith(f"| strict | {QD1.name} | 100 / 300 | 100 / 300 | 100 / 300 "
                                 "| - |")
    rows = bench_report.markdown_samples(result).splitlines()
    assert rows[2] == (f"| strict | {QD1.name} | 400, 400, 200 | 200, 250, 300 "
                       "| 1000, 1100, 1040 | - | 2000, 2000, 2000 | 8.0, 8.0, 8.0 "
                       "| 12, 12, 12 |")
    assert "--iomem=shmhuge" in bench_report.workload_table()


def test_a_fio_report_gives_iops_bandwidth_and_latency():
    report = ('fio: some warning\n{"jobs": [{"read": {"iops": 250.5, "bw_bytes": 1048576, '
              '"total_ios": 500, "clat_ns": {"percentile": {"50.000000": 1500, '
              '"90.000000": 2500, "99.000000": 9000}}}, "write": {"total_ios": 0}}]}')
    assert job_result(report) == {"iops": 250.5, "mib_s": 1.0, "ios": 500,
                                  "clat_p50_us": 1.5, "clat_p90_us": 2.5, "clat_p99_us": 9.0}


def test_every_workload_is_a_direct_libaio_fio_job():
    for w in WORKLOADS:
        cmd = w.command(3, 1 << 28)
        assert cmd.startswith("fio ") and "--direct=1" in cmd and "--ioengine=libaio" in cmd
        assert ("--iomem=shmhuge" in cmd) == w.huge and "--output-format=json" in cmd


def test_every_path_leads_a_round_in_turn():
    paths = ("a", "b", "c")
    assert [bench.rotate(paths, r)[0] for r in range(4)] == ["a", "b", "c", "a"]
    assert sorted(bench.rotate(paths, 1)) == sorted(paths)


def test_the_c_peer_is_left_out_with_a_reason_when_not_installed(monkeypatch):
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    paths, skipped = bench.available_paths(bench.PATHS)
    assert "qsd" not in paths and "pv" in paths
    assert "qemu-storage-daemon" in skipped["qsd"]


def test_rounds_must_be_positive(capsys):
    args = cli.build_parser().parse_args(["bench", "--rounds", "0"])
    assert args.func(args) == 2
    assert "--rounds" in capsys.readouterr().err


def test_paths_must_be_known(capsys):
    args = cli.build_parser().parse_args(["bench", "--paths", "pv,nope"])
    assert args.func(args) == 2
    assert "--paths" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["bench", "--paths", "vsmmu,qsd"]).paths == [
        "vsmmu", "qsd"]


def test_workloads_must_be_known(capsys):
    args = cli.build_parser().parse_args(["bench", "--workloads", "randread-4k-qd1,nope"])
    assert args.func(args) == 2
    assert "--workloads" in capsys.readouterr().err


def test_the_cost_model_adds_round_trips_and_the_doorbell_to_the_anchor():
    result = _result()
    result["micro"] = {"floor": {"unpinned": {"median_us": 40.0}}, "rows": [
        {"case": bench_report.MAP_UNMAP_CASE, "placement": "any", "median_us": 70.0},
        {"case": bench_report.MAP_UNMAP_CASE, "placement": "same", "median_us": 20.0},
        {"case": bench_report.DOORBELL_CASE, "placement": "any", "median_us": 130.0}]}
    entry, big = bench_report.cost_model(result)  # the QD1 rows with both paths
    assert big["workload"] == BIG.name and big["pv_us"] == round(1e6 / 90, 1)
    assert entry["builtin_us"] == round(1e6 / 1040, 1) and entry["pv_us"] == 2500.0
    assert entry["round_trips"] == 8.0 and entry["rtt_us"] == 70.0
    assert entry["predicted_us"] == round(1e6 / 1040 + 8 * 70 + 130, 1)
    assert entry["explained"] == round((8 * 70 + 130) / (2500 - 1e6 / 1040), 2)
    assert entry["floor_bound"] == round((1e6 / 1040) / (1e6 / 1040 + 9 * 40), 2)
    lines = bench_report.markdown_cost_model(result).splitlines()
    assert len(lines) == 4 and lines[2].startswith(f"| strict | {QD1.name} | 962 | 8.00 | 70 |")
