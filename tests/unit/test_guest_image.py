"""pviommu guest-image: a user's initramfs with modules, files and an init."""

import gzip
import stat
import subprocess

import pytest

from pviommu import cli
from pviommu.machine.guest_image import ExtraFile, GuestImageError, build_guest_image, load_order
from pviommu.resources import repo_path

from .test_cpio import parse_newc
from .test_modules import make_module


@pytest.fixture
def assets(tmp_path):
    moddir = tmp_path / "lib/modules/6.0.0"
    drivers = moddir / "kernel/drivers"
    drivers.mkdir(parents=True)
    make_module(drivers, "virtio_blk", "")
    make_module(drivers, "virtio-rng", "rng_core")
    make_module(drivers, "rng_core", "")
    make_module(drivers, "virtio_iommu", "")
    make_module(drivers, "extra", "")
    (moddir / "modules.builtin").write_text("")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    return busybox, moddir


def _entries(path):
    return {e["name"]: e for e in parse_newc(gzip.decompress(path.read_bytes()))}


def test_virtio_iommu_is_loaded_first():
    assert load_order(["virtio_blk", "virtio-iommu", "x", "virtio_blk"]) == [
        "virtio-iommu", "virtio_blk", "x"]


def test_the_default_image_loads_the_modules_then_gives_a_shell(assets, tmp_path):
    busybox, moddir = assets
    out = tmp_path / "guest.cpio.gz"
    mods = build_guest_image(out, busybox=busybox, modules_dir=moddir,
                             modules=["virtio_blk", "virtio-rng", "virtio_iommu"])
    assert [m.name for m in mods] == ["virtio_iommu", "virtio_blk", "rng_core", "virtio_rng"]
    entries = _entries(out)
    assert entries["etc/modules.order"]["data"].decode().split() == [m.name for m in mods]
    assert entries["init"]["data"] == repo_path("guest-kernel-config",
                                                "user-init.sh").read_bytes()
    assert entries["init"]["mode"] & 0o777 == 0o755
    assert stat.S_ISDIR(entries["root"]["mode"])
    assert "etc/pviommu/init.sh" not in entries
    assert not (tmp_path / "guest.cpio.gz.tmp").exists()


def test_files_and_init_go_where_asked(assets, tmp_path):
    busybox, moddir = assets
    (tmp_path / "tool").write_text("#!/bin/sh\necho hi\n")
    (tmp_path / "tool").chmod(0o750)
    tree = tmp_path / "data"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub/a.txt").write_text("a")
    init = tmp_path / "my-init.sh"
    init.write_text("echo from my init\n")
    out = tmp_path / "g.cpio.gz"
    build_guest_image(out, busybox=busybox, modules_dir=moddir, modules=[], init=init,
                      files=[ExtraFile.parse(str(tmp_path / "tool")),
                             ExtraFile.parse(f"{tree}:/opt/data")])
    entries = _entries(out)
    assert entries["root/tool"]["data"] == b"#!/bin/sh\necho hi\n"
    assert entries["root/tool"]["mode"] & 0o777 == 0o750
    assert stat.S_ISDIR(entries["opt"]["mode"]) and stat.S_ISDIR(entries["opt/data/sub"]["mode"])
    assert entries["opt/data/sub/a.txt"]["data"] == b"a"
    assert entries["etc/pviommu/init.sh"]["data"] == b"echo from my init\n"
    assert entries["etc/modules.order"]["data"] == b""


@pytest.mark.parametrize("bad", ["", ":/x", "a:", "a:relative", "a:/x/../y"])
def test_bad_file_specs_are_refused(bad):
    with pytest.raises(ValueError):
        ExtraFile.parse(bad)


def test_a_file_over_the_images_own_is_refused(assets, tmp_path):
    busybox, moddir = assets
    (tmp_path / "x").write_text("x")
    with pytest.raises(GuestImageError, match="/init is already in the image"):
        build_guest_image(tmp_path / "g", busybox=busybox, modules_dir=moddir, modules=[],
                          files=[ExtraFile.parse(f"{tmp_path / 'x'}:/init")])
    with pytest.raises(GuestImageError, match="cannot read"):
        build_guest_image(tmp_path / "g", busybox=busybox, modules_dir=moddir, modules=[],
                          files=[ExtraFile.parse(str(tmp_path / "missing"))])
    assert not (tmp_path / "g").exists()


def test_the_command(assets, tmp_path, monkeypatch, capsys):
    busybox, moddir = assets
    kernel = tmp_path / "Image"
    kernel.write_bytes(b"kernel")
    monkeypatch.setattr(cli.provision, "fetch_guest", lambda k, m: cli.provision.GuestAssets(
        kernel, moddir, busybox))
    out = tmp_path / "g.cpio.gz"
    assert cli.main(["guest-image", str(out), "--module", "extra"]) == 0
    assert _entries(out)["etc/modules.order"]["data"].decode().split() == [
        "virtio_iommu", "virtio_blk", "rng_core", "virtio_rng", "extra"]
    printed = capsys.readouterr().out
    assert "then a shell on the console" in printed and f"kernel:  {kernel}" in printed
    assert cli.main(["guest-image", str(out), "--no-default-modules", "--module", "nope"]) == 1
    assert "module nope not found" in capsys.readouterr().err


def test_the_init_is_valid_shell():
    subprocess.run(["sh", "-n", repo_path("guest-kernel-config", "user-init.sh")], check=True)
