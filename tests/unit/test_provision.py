"""Finding QEMU: the override, the version and device checks."""

import os
import subprocess
import time

import pytest

from pviommu import provision
from pviommu.resources import repo_path


def fake_qemu(tmp_path, version: str, devices: str = ""):
    exe = tmp_path / "qemu-system-aarch64"
    exe.write_text(f"""#!/bin/sh
case "$1" in
  --version) echo "QEMU emulator version {version}";;
  *) printf '%s\\n' {devices!r};;
esac
""")
    exe.chmod(0o755)
    return exe


def test_override_that_is_not_there_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PVIOMMU_QEMU", str(tmp_path / "missing"))
    with pytest.raises(provision.ProvisionError, match="not an executable.*Unset it"):
        provision.find_qemu(build=False)


def test_old_qemu_is_refused_with_its_problems(monkeypatch, tmp_path):
    monkeypatch.setenv("PVIOMMU_QEMU", str(fake_qemu(tmp_path, "10.0.3")))
    with pytest.raises(provision.ProvisionError) as exc:
        provision.find_qemu(build=False)
    msg = str(exc.value)
    assert "version 10.0.3 < 10.2" in msg
    assert "no vhost-user-test-device-pci device" in msg and "no vfio-user-pci device" in msg


def test_override_that_fits_is_used(monkeypatch, tmp_path):
    devices = 'name "vhost-user-test-device-pci"\nname "vfio-user-pci"'
    exe = fake_qemu(tmp_path, "10.2.2", devices)
    monkeypatch.setenv("PVIOMMU_QEMU", str(exe))
    assert provision.find_qemu(build=False) == exe


def test_provisioned_qemu_has_what_pviommu_needs(qemu):
    assert provision.qemu_problems(qemu) == []
    assert provision.qemu_version(qemu)[:2] >= (10, 2)


def test_kernel_without_modules_is_refused(tmp_path):
    with pytest.raises(provision.ProvisionError, match="go together"):
        provision.fetch_guest(kernel=tmp_path / "Image")


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("PVIOMMU_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert provision.cache_dir() == tmp_path / "pviommu"


def test_own_kernel_and_modules_are_used(assets):
    own = provision.fetch_guest(kernel=assets.kernel, modules=assets.modules)
    assert (own.kernel, own.modules, own.busybox) == (assets.kernel, assets.modules,
                                                      assets.busybox)
    assert own.config is None


def test_own_kernel_that_does_not_exist_is_named(tmp_path, assets):
    with pytest.raises(provision.ProvisionError, match="Image does not exist"):
        provision.fetch_guest(kernel=tmp_path / "Image", modules=assets.modules)


def test_build_script_tries_each_version_and_names_the_fix(tmp_path):
    """Versions missing from the archive are skipped; the final error names the fix."""
    env = dict(os.environ, PVIOMMU_CACHE=str(tmp_path),
               PVIOMMU_QEMU_VERSIONS="1:0.0.1+ds-1 1:0.0.2+ds-1")
    out = subprocess.run(["bash", str(repo_path("qemu-scripts", "build-qemu.sh"))],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert out.stdout == ""
    assert out.stderr.count("is not downloadable, trying the next version") == 2
    assert "set PVIOMMU_QEMU_VERSIONS to one the archive has, or PVIOMMU_QEMU" in out.stderr


def test_two_provisioning_runs_take_turns(tmp_path):
    """A second run waits for the first instead of building into the same directory."""
    common = repo_path("qemu-scripts", "common.sh")
    script = f'source "{common}"; cache_lock qemu; echo start >> "$OUT"; sleep 0.5; ' \
             'echo end >> "$OUT"'
    env = dict(os.environ, PVIOMMU_CACHE=str(tmp_path), OUT=str(tmp_path / "out"))
    first = subprocess.Popen(["bash", "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        while not (tmp_path / "out").exists():
            time.sleep(0.01)
        second = subprocess.run(["bash", "-c", script], env=env, capture_output=True,
                                text=True, timeout=10)
    finally:
        first.wait(10)
    assert (tmp_path / "out").read_text().split() == ["start", "end", "start", "end"]
    assert "another pviommu is provisioning qemu; waiting for it" in second.stderr
