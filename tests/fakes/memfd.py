"""Guest RAM as QEMU's memory-backend-memfd creates it: a memfd sealed against resizing."""

from __future__ import annotations

import fcntl
import os

QEMU_SEALS = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
"""The seals QEMU adds by default (``seal=on``, backends/hostmem-memfd.c)."""


def sealed_memfd(size: int, name: str = "fake-guest", seals: int = QEMU_SEALS) -> int:
    """A new memfd of ``size`` bytes with ``seals`` added (0: unsealed, resizable)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd
