"""Provisioning: find or build QEMU, fetch the guest kernel, modules and busybox,
build the guest's fio.

The work is done by the shell scripts in ``qemu-scripts/`` (the Dockerfile
runs the same ones); this module decides what is missing and runs them, with
their progress on the terminal.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .resources import repo_path

MIN_QEMU = (10, 2)
REQUIRED_DEVICES = ("vhost-user-test-device-pci", "vfio-user-pci")


class ProvisionError(Exception):
    """Something pviommu needs cannot be provided; the message names the fix."""


def cache_dir() -> Path:
    """Where provisioned things live: $PVIOMMU_CACHE, else $XDG_CACHE_HOME/pviommu."""
    if "PVIOMMU_CACHE" in os.environ:
        return Path(os.environ["PVIOMMU_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pviommu"


def _run_script(name: str, *args: str, capture: bool = True) -> str:
    script = repo_path("qemu-scripts", name)
    env = dict(os.environ, PVIOMMU_CACHE=str(cache_dir()))
    proc = subprocess.run(
        ["bash", str(script), *args], env=env, text=True,
        stdout=subprocess.PIPE if capture else None, stderr=sys.stderr,
    )
    if proc.returncode != 0:
        raise ProvisionError(
            f"{script.name} failed (exit {proc.returncode}); see the messages above")
    return proc.stdout or ""


def _script_paths(name: str, *args: str) -> dict[str, Path]:
    """Runs a script that prints KEY=PATH lines and returns them."""
    output = _run_script(name, *args)
    return {k: Path(v) for k, _, v in (line.partition("=") for line in output.splitlines())
            if v}


def qemu_version(qemu: Path) -> tuple[int, int, int]:
    """The version of a qemu-system binary, e.g. (10, 2, 2)."""
    out = subprocess.run([str(qemu), "--version"], capture_output=True, text=True,
                         timeout=30).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise ProvisionError(f"cannot read the version of {qemu}: {out.strip()!r}")
    major, minor, micro = (int(x) for x in m.groups())
    return major, minor, micro


def qemu_problems(qemu: Path) -> list[str]:
    """What a QEMU binary lacks for pviommu (empty when it is usable)."""
    if not (qemu.is_file() and os.access(qemu, os.X_OK)):
        return [f"{qemu} is not an executable file"]
    problems = []
    version = qemu_version(qemu)
    if version[:2] < MIN_QEMU:
        problems.append(f"version {'.'.join(map(str, version))} < {'.'.join(map(str, MIN_QEMU))}")
    devices = subprocess.run([str(qemu), "-M", "virt", "-device", "help"],
                             capture_output=True, text=True, timeout=30).stdout
    problems += [f"no {d} device" for d in REQUIRED_DEVICES if f'"{d}"' not in devices]
    return problems


def find_qemu(*, build: bool = True) -> Path:
    """The qemu-system-aarch64 to use.

    $PVIOMMU_QEMU wins; then a qemu-system-aarch64 on PATH that is recent enough
    and has the devices pviommu needs; then the cached build, built when missing.
    """
    override = os.environ.get("PVIOMMU_QEMU")
    if override:
        qemu = Path(override)
        problems = qemu_problems(qemu)
        if problems:
            raise ProvisionError(
                f"PVIOMMU_QEMU={override} is not usable: {'; '.join(problems)}. "
                "Unset it to let pviommu build QEMU 10.2 itself."
            )
        return qemu
    on_path = shutil.which("qemu-system-aarch64")
    if on_path and not qemu_problems(Path(on_path)):
        return Path(on_path)
    cached = sorted(cache_dir().glob("qemu-*/bin/qemu-system-aarch64"))
    if cached:
        return cached[-1]
    if not build:
        raise ProvisionError("QEMU is not provisioned yet: run `pviommu setup`")
    print("pviommu: building QEMU (no usable qemu-system-aarch64 >= 10.2 found)",
          file=sys.stderr)
    path = Path(_run_script("build-qemu.sh").strip().splitlines()[-1])
    if qemu_problems(path):
        raise ProvisionError(f"the QEMU built at {path} is unusable: {qemu_problems(path)}")
    return path


@dataclass(frozen=True)
class GuestAssets:
    """The guest kernel, its module directory, its config (if known) and busybox."""

    kernel: Path
    modules: Path
    busybox: Path
    config: Path | None = None


def fetch_guest(kernel: Path | None = None, modules: Path | None = None) -> GuestAssets:
    """Returns the guest assets, downloading Debian's when needed.

    ``kernel`` and ``modules`` replace Debian's kernel and module directory
    (give both; busybox still comes from the cache).
    """
    if (kernel is None) != (modules is None):
        raise ProvisionError("--kernel and --modules go together: give both or neither")
    if kernel is not None and modules is not None:
        for p in (kernel, modules):
            if not p.exists():
                raise ProvisionError(f"{p} does not exist")
        paths = _script_paths("fetch-guest.sh", "--busybox-only")
        return GuestAssets(kernel, modules, paths["BUSYBOX"])
    paths = _script_paths("fetch-guest.sh")
    return GuestAssets(paths["KERNEL"], paths["MODULES"], paths["BUSYBOX"], paths["CONFIG"])


def fetch_fio() -> Path:
    """The guest's fio: a static arm64 build of Debian's fio source, made into the
    cache when missing (qemu-scripts/fetch-fio.sh, about a minute; then instant)."""
    return _script_paths("fetch-fio.sh")["FIO"]


def setup(kernel: Path | None = None, modules: Path | None = None) -> tuple[Path, GuestAssets]:
    """Provisions everything that is missing; returns QEMU and the guest assets."""
    _run_script("install-host-deps.sh", capture=False)
    return find_qemu(), fetch_guest(kernel, modules)
