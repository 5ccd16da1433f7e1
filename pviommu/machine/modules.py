"""Kernel module lookup and dependency resolution from each module's .modinfo.

Debian's kernel package ships no modules.dep, so dependencies are read from
the ``depends=`` entry of each module's ``.modinfo`` ELF section.
"""

from __future__ import annotations

import gzip
import io
import lzma
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile


class ModuleError(Exception):
    """A module is missing or its metadata cannot be read."""


def canonical(name: str) -> str:
    """The kernel's canonical module name: dashes become underscores."""
    return name.replace("-", "_")


def read_ko(path: Path) -> bytes:
    """Returns the uncompressed ELF image of a ``.ko``, ``.ko.xz`` or ``.ko.gz``."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def modinfo(elf_image: bytes) -> dict[str, list[str]]:
    """Parses the ``.modinfo`` section of a module: key -> values, in order."""
    elf = ELFFile(io.BytesIO(elf_image))
    section = elf.get_section_by_name(".modinfo")
    if section is None:
        raise ModuleError("no .modinfo section")
    info: dict[str, list[str]] = {}
    for entry in section.data().split(b"\0"):
        if b"=" in entry:
            key, _, value = entry.decode(errors="replace").partition("=")
            info.setdefault(key, []).append(value)
    return info


@dataclass(frozen=True)
class Module:
    """One loadable module: its canonical name, file, image and dependencies."""

    name: str
    path: Path
    image: bytes
    depends: tuple[str, ...]


class ModuleIndex:
    """The modules of one kernel, found under its ``/lib/modules/VERSION``."""

    def __init__(self, moddir: Path) -> None:
        self.moddir = Path(moddir)
        if not self.moddir.is_dir():
            raise ModuleError(f"module directory {self.moddir} does not exist")
        self._files: dict[str, Path] = {}
        for path in self.moddir.rglob("*.ko*"):
            base = path.name.split(".ko")[0]
            self._files[canonical(base)] = path
        self.builtin: set[str] = set()
        builtin = self.moddir / "modules.builtin"
        if builtin.exists():
            for line in builtin.read_text().split():
                self.builtin.add(canonical(Path(line).name.split(".ko")[0]))
        self._cache: dict[str, Module] = {}

    def get(self, name: str) -> Module:
        """Loads one module's image and metadata."""
        name = canonical(name)
        if name in self._cache:
            return self._cache[name]
        path = self._files.get(name)
        if path is None:
            raise ModuleError(f"module {name} not found under {self.moddir}")
        image = read_ko(path)
        try:
            deps = modinfo(image).get("depends", [""])[0]
        except Exception as exc:
            raise ModuleError(f"cannot read .modinfo of {path}: {exc}") from exc
        mod = Module(name, path, image, tuple(canonical(d) for d in deps.split(",") if d))
        self._cache[name] = mod
        return mod

    def resolve(self, names: list[str]) -> list[Module]:
        """The modules needed for ``names``, dependencies first, each once.

        Names built into the kernel are skipped; the order of ``names`` is kept
        where dependencies allow it.
        """
        order: list[Module] = []
        done: set[str] = set()

        def visit(name: str, stack: tuple[str, ...]) -> None:
            name = canonical(name)
            if name in done:
                return
            if name in stack:
                raise ModuleError(f"dependency cycle: {' -> '.join(stack + (name,))}")
            if name not in self._files and name in self.builtin:
                done.add(name)
                return
            mod = self.get(name)
            for dep in mod.depends:
                visit(dep, stack + (name,))
            done.add(name)
            order.append(mod)

        for n in names:
            visit(n, ())
        return order
