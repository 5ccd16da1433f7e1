"""Shared fixtures: the provisioned QEMU and guest assets (built when missing)."""

from __future__ import annotations

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
