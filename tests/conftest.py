"""Shared fixtures: the provisioned QEMU and guest assets (built when missing), and a
directory short enough for UNIX sockets."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pviommu import provision


@pytest.fixture(scope="session")
def qemu() -> Path:
    """The qemu-system-aarch64 pviommu uses (provisioned if missing)."""
    return provision.find_qemu()


@pytest.fixture(scope="session")
def assets() -> provision.GuestAssets:
    """Debian's guest kernel, modules and busybox (downloaded if missing)."""
    return provision.fetch_guest()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short-lived directory for UNIX sockets (their paths are limited to 108 bytes,
    and pytest's tmp_path can be longer)."""
    d = Path(tempfile.mkdtemp(prefix="pviommu-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
