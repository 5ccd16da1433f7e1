"""The pviommu command's argument handling (serve, patch-dtb, PV-IOMMU options)."""

import subprocess

import libfdt
import pytest

from pviommu import cli
from pviommu.endpoints import create_image
from pviommu.iommu.pv import ResvType

from .test_dtb import DTS


def _parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_endpoint_ids_take_numbers_and_pci_addresses():
    args = _parse("serve", "--viommu", "s", "--endpoint", "0x10", "--endpoint", "00:03.1",
                  "--endpoint", "24", "--endpoint", "1:00.0")
    assert args.endpoint == [0x10, 0x19, 24, 0x100]


@pytest.mark.parametrize("bad", ["zz", "0x100000000", "00:xx.0"])
def test_bad_endpoint_ids_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        _parse("serve", "--viommu", "s", "--endpoint", bad)
    assert "--endpoint" in capsys.readouterr().err


def test_iommu_options_build_the_device_config():
    args = _parse("serve", "--viommu", "s", "--input-range", "0x1000:0xffffffff",
                  "--domain-range", "1:100", "--no-bypass-config", "--bypass",
                  "--reserved", "0x100000:0x1fffff", "--probe-size", "256")
    config = cli.iommu_config(args)
    assert (config.input_start, config.input_end) == (0x1000, 0xFFFFFFFF)
    assert (config.domain_start, config.domain_end) == (1, 100)
    assert config.bypass and not config.bypass_config and config.probe_size == 256
    assert [(r.start, r.end, r.subtype) for r in config.resv_regions()] == [
        (0x08090000, 0x0809FFFF, ResvType.MSI), (0x100000, 0x1FFFFF, ResvType.RESERVED)]
    args = _parse("serve", "--viommu", "s", "--no-msi-region")
    assert cli.iommu_config(args).resv_regions() == []
    args = _parse("serve", "--viommu", "s", "--max-domains", "4", "--max-mappings", "100")
    config = cli.iommu_config(args)
    assert (config.max_domains, config.max_mappings) == (4, 100)


def test_inconsistent_iommu_options_are_a_clear_error():
    args = _parse("serve", "--viommu", "s", "--reserved", "0x08090000:0x08090fff")
    with pytest.raises(SystemExit, match="reserved regions .* overlap"):
        cli.iommu_config(args)
    with pytest.raises(SystemExit):
        _parse("serve", "--viommu", "s", "--input-range", "0x2000:0x1000")
    with pytest.raises(SystemExit, match="at least 1"):
        cli.iommu_config(_parse("serve", "--viommu", "s", "--max-mappings", "0"))


def test_patch_dtb(tmp_path, capsys):
    src = tmp_path / "t.dts"
    src.write_text(DTS)
    subprocess.run(["dtc", "-I", "dts", "-O", "dtb", "-o", tmp_path / "in.dtb", src],
                   check=True)
    assert cli.main(["patch-dtb", str(tmp_path / "in.dtb"), str(tmp_path / "out.dtb"),
                     "--iommu", "00:01.0"]) == 0
    fdt = libfdt.Fdt((tmp_path / "out.dtb").read_bytes())
    node = fdt.path_offset("/pcie@10000000/virtio_iommu@1,0")
    assert fdt.getprop(node, "reg")[:4] == (0x800).to_bytes(4, "big")
    (tmp_path / "junk").write_bytes(b"not a dtb")
    assert cli.main(["patch-dtb", str(tmp_path / "junk"), str(tmp_path / "o2")]) == 1
    assert "FDT_ERR_BADMAGIC" in capsys.readouterr().err
    assert cli.main(["patch-dtb", str(tmp_path / "missing"), str(tmp_path / "o3")]) == 1


def test_endpoint_devices_of_serve(tmp_path):
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    args = _parse("serve", "--viommu", "s", "--blk", f"/b.sock,endpoint=00:02.0,image={image},ro",
                  "--rng", "/r.sock,endpoint=0x18")
    [blk] = args.blk
    assert (blk.kind, str(blk.socket), blk.endpoint, blk.image, blk.read_only) == (
        "blk", "/b.sock", 0x10, image, True)
    [rng] = args.rng
    assert (rng.kind, rng.endpoint, rng.image) == ("rng", 0x18, None)


@pytest.mark.parametrize("bad", ["/b.sock", "/b.sock,endpoint=2.0", "/b.sock,endpoint=2.0,"
                                 "image=/nonexistent", "/b.sock,endpoint=2.0,colour=red"])
def test_bad_blk_options_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        _parse("serve", "--viommu", "s", "--blk", bad)
    assert "--blk" in capsys.readouterr().err


def test_a_missing_blk_image_says_how_to_create_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse("serve", "--viommu", "s", "--blk",
               f"/b.sock,endpoint=2.0,image={tmp_path / 'none.img'}")
    assert "does not exist (add size=SIZE" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "size"), [("64M", 64 << 20), ("1G", 1 << 30),
                                            ("4096", 4096), ("16KiB", 16 << 10)])
def test_blk_size_takes_binary_units(tmp_path, text, size):
    [blk] = _parse("serve", "--viommu", "s", "--blk",
                   f"/b.sock,endpoint=2.0,image={tmp_path / 'd.img'},size={text}").blk
    assert blk.size == size


@pytest.mark.parametrize("bad", ["0", "100", "-1M", "M", "12X", ""])
def test_bad_blk_sizes_are_refused(tmp_path, bad, capsys):
    with pytest.raises(SystemExit):
        _parse("serve", "--viommu", "s", "--blk",
               f"/b.sock,endpoint=2.0,image={tmp_path / 'd.img'},size={bad}")
    assert "size" in capsys.readouterr().err


def test_blk_size_creates_a_sparse_image_once(tmp_path):
    image = tmp_path / "d.img"
    [blk] = _parse("serve", "--viommu", "s", "--blk",
                   f"/b.sock,endpoint=2.0,image={image},size=64M").blk
    assert create_image(blk) is True
    st = image.stat()
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < (1 << 20)  # sparse
    image.write_bytes(b"data" + bytes((64 << 20) - 4))
    assert create_image(blk) is False  # there: left alone
    assert image.read_bytes()[:4] == b"data"


def test_an_existing_image_of_another_size_is_an_error(tmp_path, capsys):
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    assert cli.main(["serve", "--viommu", str(tmp_path / "v.sock"), "--blk",
                     f"{tmp_path / 'b.sock'},endpoint=2.0,image={image},size=64M"]) == 2
    err = capsys.readouterr().err
    assert "is 1048576 bytes, not size=67108864" in err and "remove size=" in err
    assert image.stat().st_size == 1 << 20
    assert not (tmp_path / "v.sock").exists()


@pytest.mark.parametrize("args", [["--modes", "pv,nope"], ["--workloads", "randread-4k-qd7"],
                                  ["--modes", ","]])
def test_qmp_load_names_what_it_takes_before_provisioning(args, capsys):
    assert cli.main(["qmp-load", *args]) == 2
    err = capsys.readouterr().err
    assert "--modes takes some of pv,vsmmu" in err and "randread-4k-qd1" in err


@pytest.mark.parametrize("argv", [["qmp-load", "--hz", "0"], ["qmp-load", "--runtime", "-1"],
                                  ["soak", "--minutes", "0"], ["bench", "--runtime", "x"]])
def test_durations_and_rates_must_be_above_zero(argv, capsys):
    with pytest.raises(SystemExit):
        _parse(*argv)
    assert argv[1] in capsys.readouterr().err
