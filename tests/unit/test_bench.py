"""The benchmark's table (the numbers themselves come from real guests: ./run bench)."""

from pviommu import cli
from pviommu.scenarios import bench


def test_the_table_shows_medians_ratios_and_the_iommu_load():
    result = {"table": [
        {"iommu": "strict", "op": "read", "bs": 4096, "pv_mib_s": 3.9, "builtin_mib_s": 10.4,
         "ratio": 0.375, "pv_iommu_requests_per_mib": [2048.0, 2048.0]},
        {"iommu": "lazy", "op": "write", "bs": 1 << 20, "pv_mib_s": 90.0, "builtin_mib_s": 100.0,
         "ratio": 0.9, "pv_iommu_requests_per_mib": [50.0, 500.0, 60.0]}]}
    lines = bench.markdown(result).splitlines()
    assert lines[0].startswith("| IOMMU | op | block | PV path MiB/s")
    assert lines[2] == ("| strict | read | 4 KiB | 3.9 | 10.4 | 0.38 (below 0.8) "
                        "| 2048 (2048-2048) |")
    assert lines[3] == "| lazy | write | 1 MiB | 90.0 | 100.0 | 0.90 | 60 (50-500) |"


def test_rounds_must_be_positive(capsys):
    args = cli.build_parser().parse_args(["bench", "--rounds", "0"])
    assert args.func(args) == 2
    assert "--rounds" in capsys.readouterr().err
