"""The guest initramfs: busybox, the scenario's modules and a scenario init."""

from __future__ import annotations

import gzip
import shlex
from pathlib import Path

from ..resources import repo_path
from .cpio import CpioWriter
from .modules import Module, ModuleIndex

_DIRS = ("bin", "dev", "etc", "lib", "lib/modules", "lib/pviommu", "proc", "sys", "tmp")


def scenario_path(name: str) -> Path:
    """The guest script of a scenario, guest-kernel-config/scenarios/NAME.sh."""
    return repo_path("guest-kernel-config", "scenarios", f"{name}.sh")


def build_initramfs(
    out: Path,
    *,
    busybox: Path,
    modules_dir: Path,
    modules: list[str],
    scenario: str,
    env: dict[str, str] | None = None,
) -> list[Module]:
    """Writes a gzip-compressed newc initramfs to ``out``.

    ``modules`` are resolved with their dependencies and loaded by the init in
    dependency order; ``env`` is written to /etc/pviommu.env for the scenario.
    Returns the modules included, in load order.
    """
    resolved = ModuleIndex(modules_dir).resolve(modules)
    env_text = "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in (env or {}).items())
    with gzip.open(out, "wb", compresslevel=1) as fh:
        cpio = CpioWriter(fh)
        for d in _DIRS:
            cpio.add_dir(d)
        cpio.add_chardev("dev/console", 5, 1)
        cpio.add_chardev("dev/null", 1, 3, perm=0o666)
        cpio.add_file("bin/busybox", busybox.read_bytes(), perm=0o755)
        cpio.add_symlink("bin/sh", "busybox")
        cpio.add_file("init", repo_path("guest-kernel-config", "init.sh").read_bytes(), 0o755)
        cpio.add_file("scenario.sh", scenario_path(scenario).read_bytes(), 0o755)
        for lib in sorted(repo_path("guest-kernel-config", "lib").glob("*.sh")):
            cpio.add_file(f"lib/pviommu/{lib.name}", lib.read_bytes(), 0o644)
        cpio.add_file("etc/pviommu.env", env_text.encode())
        cpio.add_file("etc/modules.order", "".join(m.name + "\n" for m in resolved).encode())
        for mod in resolved:
            cpio.add_file(f"lib/modules/{mod.name}.ko", mod.image)
        cpio.close()
    return resolved
