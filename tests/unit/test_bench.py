"""The benchmark's bookkeeping and tables (the numbers themselves come from real
guests: ./run bench)."""

from pviommu import cli
from pviommu.scenarios import bench

MiB = 1 << 20
TESTS = [("read", 4096, 8 * MiB), ("write", MiB, 256 * MiB)]


def _load(total, **by_kind):
    return {"round_trips_per_mib": total, "by_kind": by_kind}


def _result():
    samples = {
        ("pv", "strict", "read", 4096): [3.9, 4.1, 2.0],
        ("vsmmu", "strict", "read", 4096): [2.0, 2.5, 3.0],
        ("builtin", "strict", "read", 4096): [10.4, 10.0, 11.0],
        ("qsd", "strict", "read", 4096): [20.0, 20.0, 20.0],
        ("pv", "lazy", "write", MiB): [90.0, 80.0, 100.0],
        ("builtin", "lazy", "write", MiB): [100.0],
    }
    loads = {
        ("pv", "strict", "read", 4096): [_load(2048.0, MAP=1024.0, UNMAP=1024.0)] * 3,
        ("vsmmu", "strict", "read", 4096): [
            _load(x, iotlb_miss=x / 3, composed_hits=7.0) for x in (3000.0, 3100.0, 2900.0)],
        ("pv", "lazy", "write", MiB): [_load(x) for x in (50.0, 500.0, 60.0)],
    }
    return {"table": bench.summarize(samples, loads, TESTS, bench.PATHS),
            "paths": list(bench.PATHS)}


def test_summary_keeps_the_first_tables_keys_and_adds_every_path():
    strict, lazy = _result()["table"]
    assert (strict["iommu"], strict["op"], strict["bs"]) == ("strict", "read", 4096)
    assert strict["pv_mib_s"] == 3.9 and strict["builtin_mib_s"] == 10.4
    assert strict["ratio"] == round(3.9 / 10.4, 3)
    assert strict["pv_samples"] == [3.9, 4.1, 2.0]
    assert strict["pv_iommu_requests_per_mib"] == [2048.0] * 3
    vsmmu = strict["paths"]["vsmmu"]
    assert vsmmu["mib_s"] == 2.5 and vsmmu["ratio"] == round(2.5 / 10.4, 3)
    assert vsmmu["round_trips"] == "miss+update+invalidate"
    assert vsmmu["round_trips_per_mib"] == [3000.0, 3100.0, 2900.0]
    assert vsmmu["by_kind"][0] == {"iotlb_miss": 1000.0, "composed_hits": 7.0}
    assert "round_trips" not in strict["paths"]["builtin"]
    assert "smmuv3-builtin" not in strict["paths"]  # never measured: left out
    assert strict["vsmmu_to_qsd"] == round(2.5 / 20.0, 3)
    assert "vsmmu" not in lazy["paths"] and "vsmmu_to_qsd" not in lazy


def test_a_row_without_the_anchor_has_no_ratio_and_no_first_table_keys():
    table = bench.summarize({("vsmmu", "lazy", "read", 4096): [2.0]}, {}, TESTS, bench.PATHS)
    assert table == [{"iommu": "lazy", "op": "read", "bs": 4096, "paths": {"vsmmu": {
        "mib_s": 2.0, "samples": [2.0], "ratio": None,
        "round_trips": "miss+update+invalidate",
        "round_trips_per_mib": [], "by_kind": []}}}]


def test_round_trips_per_mib_sum_only_the_paths_round_trips():
    got = bench.per_mib({"miss": 10, "update": 10, "invalidate": 4,
                         "composed_hits": 100}, bench.ROUND_TRIPS["vsmmu"], 2.0)
    assert got["round_trips_per_mib"] == 12.0
    assert got["by_kind"]["composed_hits"] == 50.0


def test_the_three_way_table():
    lines = bench.markdown(_result()).splitlines()
    assert lines[0].startswith("| IOMMU | op | block | PV MiB/s | vSMMU MiB/s | built-in MiB/s")
    assert lines[2] == ("| strict | read | 4 KiB | 3.9 | 2.5 | 10.4 | 0.38 (below 0.8) "
                        "| 0.24 (below 0.8) | 2048 (2048-2048) | 3000 (2900-3100) |")
    assert lines[3] == "| lazy | write | 1 MiB | 90.0 | - | 100.0 | 0.90 | - | 60 (50-500) | - |"


def test_the_reference_table_and_the_samples():
    refs = bench.markdown_references(_result()).splitlines()
    assert refs[2] == "| strict | read | 4 KiB | 2.5 | - | 20.0 | 0.12 |"
    rows = bench.markdown_samples(_result()).splitlines()
    assert rows[0] == ("| IOMMU | op | block | pv | vsmmu | builtin | smmuv3-builtin | qsd "
                       "| PV MAP+UNMAP per MiB | vSMMU MISS+UPDATE+INVALIDATE per MiB |")
    assert rows[2] == ("| strict | read | 4 KiB | 3.9, 4.1, 2.0 | 2.0, 2.5, 3.0 "
                       "| 10, 10, 11 | - | 20, 20, 20 | 2048, 2048, 2048 | 3000, 3100, 2900 |")


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
