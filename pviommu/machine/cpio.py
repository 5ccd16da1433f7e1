"""A writer for the newc ("070701") cpio format the Linux initramfs uses."""

from __future__ import annotations

import stat
from typing import Protocol

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class BinarySink(Protocol):
    """Where an archive goes: a binary file, a gzip stream, a BytesIO."""

    def write(self, data: bytes, /) -> object:
        """Writes ``data`` whole."""
        ...


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Writes newc cpio entries to a binary stream.

    Parent directories are not created implicitly: add them first (or with
    :meth:`add_parents`), the kernel does not create them while unpacking. A
    name may appear once: the kernel would let a later entry replace an
    earlier one, which hides mistakes.
    """

    def __init__(self, out: BinarySink) -> None:
        self._out = out
        self._ino = 1
        self._closed = False
        self._names: set[str] = set()

    def __contains__(self, path: str) -> bool:
        """Whether ``path`` is already in the archive."""
        return path.strip("/") in self._names

    def _entry(self, name: str, mode: int, data: bytes = b"", *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0), mtime: int = 0) -> None:
        if self._closed:
            raise ValueError("cpio archive already closed")
        if name != _TRAILER:
            name = name.strip("/")
            if not name or name in self._names:
                raise ValueError(f"cpio entry {name!r} is empty or already in the archive")
            self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, mtime, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + _pad4(len(header) + len(encoded)))
        self._out.write(data + _pad4(len(data)))
        self._ino += 1

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        """Adds a directory."""
        self._entry(path, stat.S_IFDIR | perm, nlink=2)

    def add_parents(self, path: str) -> None:
        """Adds every parent directory of ``path`` not in the archive yet."""
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self._names:
                self.add_dir(parent)

    def add_file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        """Adds a regular file with the given contents."""
        self._entry(path, stat.S_IFREG | perm, data)

    def add_symlink(self, path: str, target: str) -> None:
        """Adds a symbolic link to target."""
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Adds a character device node (e.g. /dev/console 5:1)."""
        self._entry(path, stat.S_IFCHR | perm, rdev=(major, minor))

    def close(self) -> None:
        """Writes the trailer entry; no entries may follow."""
        if not self._closed:
            self._entry(_TRAILER, 0)
            self._closed = True
