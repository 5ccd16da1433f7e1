"""Module dependency resolution from .modinfo, on built ELF objects and Debian's modules."""

import lzma
import subprocess
from pathlib import Path

import pytest

from pviommu.machine.guest_image import build_initramfs
from pviommu.machine.modules import ModuleError, ModuleIndex, modinfo


def make_module(directory: Path, name: str, depends: str, *, xz: bool = True) -> Path:
    """Compiles an ELF object with a .modinfo section, as a kernel module has."""
    src = directory / f"{name}.c"
    src.write_text(
        f'__attribute__((section(".modinfo"), used)) static const char a[] = "license=GPL";\n'
        f'__attribute__((section(".modinfo"), used)) static const char b[] = "depends={depends}";\n'
        f'__attribute__((section(".modinfo"), used)) static const char c[] = "name={name}";\n')
    obj = directory / f"{name}.ko"
    subprocess.run(["gcc", "-c", "-o", obj, src], check=True)
    src.unlink()
    if xz:
        xz_path = obj.with_name(obj.name + ".xz")
        xz_path.write_bytes(lzma.compress(obj.read_bytes()))
        obj.unlink()
        return xz_path
    return obj


@pytest.fixture
def moddir(tmp_path):
    d = tmp_path / "lib/modules/6.0.0"
    (d / "kernel/drivers").mkdir(parents=True)
    make_module(d / "kernel/drivers", "top-mod", "mid,leaf")
    make_module(d / "kernel/drivers", "mid", "leaf,core_builtin", xz=False)
    make_module(d / "kernel/drivers", "leaf", "")
    (d / "modules.builtin").write_text("kernel/drivers/core_builtin.ko\n")
    return d


def test_modinfo_reads_the_section(moddir):
    image = lzma.decompress((moddir / "kernel/drivers/top-mod.ko.xz").read_bytes())
    info = modinfo(image)
    assert info["depends"] == ["mid,leaf"]
    assert info["license"] == ["GPL"]


def test_resolve_orders_dependencies_first_and_skips_builtins(moddir):
    order = [m.name for m in ModuleIndex(moddir).resolve(["top_mod"])]
    assert order == ["leaf", "mid", "top_mod"]


def test_resolve_keeps_each_module_once(moddir):
    order = [m.name for m in ModuleIndex(moddir).resolve(["leaf", "top-mod", "mid"])]
    assert order == ["leaf", "mid", "top_mod"]


def test_missing_module_is_named(moddir):
    with pytest.raises(ModuleError, match="nonexistent"):
        ModuleIndex(moddir).resolve(["nonexistent"])


def test_cycle_is_reported(tmp_path):
    make_module(tmp_path, "a", "b")
    make_module(tmp_path, "b", "a")
    with pytest.raises(ModuleError, match="cycle"):
        ModuleIndex(tmp_path).resolve(["a"])


def test_debian_modules_resolve(assets):
    order = [m.name for m in ModuleIndex(assets.modules).resolve(["virtio_iommu", "virtio_blk",
                                                                   "virtio_rng"])]
    assert order[0] == "virtio_iommu"
    assert {"virtio_blk", "virtio_rng"} <= set(order)
    # every module appears after its dependencies
    index = ModuleIndex(assets.modules)
    for pos, name in enumerate(order):
        for dep in index.get(name).depends:
            assert dep in index.builtin or order.index(dep) < pos


def test_initramfs_holds_the_resolved_modules(assets, tmp_path):
    import gzip

    from tests.unit.test_cpio import parse_newc

    out = tmp_path / "initrd.gz"
    mods = build_initramfs(out, busybox=assets.busybox, modules_dir=assets.modules,
                           modules=["virtio_blk"], scenario="anchor-dma", env={"A": "b c"})
    entries = {e["name"]: e for e in parse_newc(gzip.decompress(out.read_bytes()))}
    assert entries["etc/modules.order"]["data"].decode().split() == [m.name for m in mods]
    for m in mods:
        assert entries[f"lib/modules/{m.name}.ko"]["data"][:4] == b"\x7fELF"
    assert entries["etc/pviommu.env"]["data"] == b"A='b c'\n"
    assert entries["init"]["data"].startswith(b"#!/bin/busybox sh")
