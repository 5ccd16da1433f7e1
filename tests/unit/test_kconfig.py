"""check-kernel against Debian's config and broken variants of it."""

import pytest

from pviommu import cli, kconfig


def test_debian_kernel_config_passes(assets, capsys):
    assert cli.main(["check-kernel", str(assets.config)]) == 0
    assert "satisfied" in capsys.readouterr().out


def test_config_without_virtio_iommu_fails_and_names_it(assets, tmp_path, capsys):
    text = assets.config.read_text().replace("CONFIG_VIRTIO_IOMMU=m",
                                             "# CONFIG_VIRTIO_IOMMU is not set")
    assert "CONFIG_VIRTIO_IOMMU is not set" in text
    broken = tmp_path / "config"
    broken.write_text(text)
    assert cli.main(["check-kernel", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "CONFIG_VIRTIO_IOMMU: missing (not set), needs y or m" in out


def test_option_absent_from_config_is_missing():
    problems = kconfig.check("CONFIG_A=y\n", "CONFIG_A=y\nCONFIG_B=m\n")
    assert [str(p) for p in problems] == ["CONFIG_B: missing (not set), needs y or m"]


@pytest.mark.parametrize(("wanted", "actual", "ok"), [
    ("y", "y", True), ("y", "m", False), ("m", "m", True), ("m", "y", True),
    ("n", "n", True), ("n", "y", False),
])
def test_values(wanted, actual, ok):
    frag = f"CONFIG_X={wanted}\n" if wanted != "n" else "# CONFIG_X is not set\n"
    conf = f"CONFIG_X={actual}\n" if actual != "n" else ""
    assert (kconfig.check(conf, frag) == []) is ok


def test_unreadable_config_is_an_error(tmp_path, capsys):
    assert cli.main(["check-kernel", str(tmp_path / "nope")]) == 2
    assert "cannot read" in capsys.readouterr().err
