"""The guest initramfs: busybox, modules and an init.

Two kinds: a scenario's (the demo's and the tests', whose init reports to the
host with markers) and a user's (``pviommu guest-image``: the modules, the
user's own files and init script, or a shell on the console).
"""

from __future__ import annotations

import gzip
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..resources import repo_path
from .cpio import CpioWriter
from .modules import Module, ModuleIndex, canonical

_DIRS = ("bin", "dev", "etc", "lib", "lib/modules", "lib/pviommu", "proc", "sys", "tmp")
DEFAULT_MODULES = ("virtio_iommu", "virtio_blk", "virtio-rng")
"""What a user image loads by default: the PV-IOMMU's driver and the backend's endpoints'."""
USER_INIT = "etc/pviommu/init.sh"
"""Where a user image keeps the user's init script (run by the generic init)."""


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
        _add_base(cpio, busybox, resolved, repo_path("guest-kernel-config", "init.sh"))
        cpio.add_file("scenario.sh", scenario_path(scenario).read_bytes(), 0o755)
        for lib in sorted(repo_path("guest-kernel-config", "lib").glob("*.sh")):
            cpio.add_file(f"lib/pviommu/{lib.name}", lib.read_bytes(), 0o644)
        cpio.add_file("etc/pviommu.env", env_text.encode())
        cpio.close()
    return resolved


def _add_base(cpio: CpioWriter, busybox: Path, modules: list[Module], init: Path) -> None:
    """What every guest image holds: directories, console, busybox, modules, /init."""
    for d in _DIRS:
        cpio.add_dir(d)
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_chardev("dev/null", 1, 3, perm=0o666)
    cpio.add_file("bin/busybox", busybox.read_bytes(), perm=0o755)
    cpio.add_symlink("bin/sh", "busybox")
    cpio.add_file("init", init.read_bytes(), 0o755)
    cpio.add_file("etc/modules.order", "".join(m.name + "\n" for m in modules).encode())
    for mod in modules:
        cpio.add_file(f"lib/modules/{mod.name}.ko", mod.image)


class GuestImageError(Exception):
    """A user's guest image cannot be built as asked; the message says why."""


@dataclass(frozen=True)
class ExtraFile:
    """A host file or directory copied into a user image at ``dest``."""

    src: Path
    dest: str

    @classmethod
    def parse(cls, text: str) -> ExtraFile:
        """``SRC[:DEST]``; DEST defaults to /root/NAME (the shell starts in /root)."""
        src, sep, dest = text.partition(":")
        if not src or (sep and not dest):
            raise ValueError(f"{text!r} is not SRC[:DEST]")
        dest = dest or f"/root/{Path(src).name}"
        if not dest.startswith("/") or ".." in PurePosixPath(dest).parts:
            raise ValueError(f"{dest!r}: DEST must be an absolute path without '..'")
        return cls(Path(src), dest)


def load_order(names: list[str]) -> list[str]:
    """``names`` with virtio_iommu first: the endpoints' drivers must find the IOMMU
    when they probe (otherwise they wait up to the 10 s deferred-probe timeout)."""
    return sorted(dict.fromkeys(names), key=lambda n: canonical(n) != "virtio_iommu")


def build_guest_image(
    out: Path,
    *,
    busybox: Path,
    modules_dir: Path,
    modules: list[str],
    files: Sequence[ExtraFile] = (),
    init: Path | None = None,
) -> list[Module]:
    """Writes a user's gzip-compressed initramfs to ``out``.

    Its init (guest-kernel-config/user-init.sh) loads ``modules`` (with their
    dependencies, virtio_iommu first), then runs ``init`` if given, else a
    shell on the console. ``files`` are copied in (directories recursively,
    permissions kept). Returns the modules, in load order; GuestImageError if
    a file cannot be read or would replace one of the image's own.
    """
    resolved = ModuleIndex(modules_dir).resolve(load_order(modules))
    tmp = out.with_name(out.name + ".tmp")
    try:
        with gzip.open(tmp, "wb", compresslevel=6) as fh:
            cpio = CpioWriter(fh)
            _add_base(cpio, busybox, resolved, repo_path("guest-kernel-config", "user-init.sh"))
            cpio.add_dir("root", 0o700)
            if init is not None:
                _add_host_file(cpio, init, "/" + USER_INIT, perm=0o755)
            for f in files:
                _add_host_tree(cpio, f.src, f.dest)
            cpio.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return resolved


def _add_host_file(cpio: CpioWriter, src: Path, dest: str, perm: int | None = None) -> None:
    if dest.strip("/") in cpio:
        raise GuestImageError(f"{dest} is already in the image (from pviommu or another "
                              "--file): choose another DEST")
    try:
        data = src.read_bytes()
        mode = src.stat().st_mode & 0o7777
    except OSError as exc:
        raise GuestImageError(f"cannot read {src}: {exc.strerror}") from None
    cpio.add_parents(dest)
    cpio.add_file(dest, data, mode if perm is None else perm)


def _add_host_tree(cpio: CpioWriter, src: Path, dest: str) -> None:
    if not src.is_dir():
        _add_host_file(cpio, src, dest)
        return
    if dest.strip("/") not in cpio:
        cpio.add_parents(dest)
        cpio.add_dir(dest, src.stat().st_mode & 0o7777)
    for root, dirs, names in os.walk(src):
        dirs.sort()
        rel = Path(root).relative_to(src)
        for d in dirs:
            target = str(PurePosixPath(dest) / rel / d)
            if target.strip("/") not in cpio:
                cpio.add_dir(target, (Path(root) / d).stat().st_mode & 0o7777)
        for name in sorted(names):
            _add_host_file(cpio, Path(root) / name, str(PurePosixPath(dest) / rel / name))
