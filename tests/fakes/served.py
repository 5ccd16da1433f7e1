"""A real ``pviommu serve`` process for hostile-client tests, and the checks that it
still serves everyone else.

The hostile tests attack one socket of a real backend process, then check that
QMP, the vhost-user PV-IOMMU and the untouched endpoint still answer, and that
the process's fd count, mappings and RSS came back to their baseline::

    async with ServedBackend.start(tmp_path) as served:
        before = served.resources()
        ...attack served.blk...
        await served.assert_serving()
        await served.assert_back_to(before)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient

from pviommu.microbench.served import stop_process
from pviommu.transport.vhost_user.protocol import Request as R

from .vfio_user import FakeQemu
from .vhost_user import FakeFrontend

START_TIMEOUT = 20.0


@dataclass(frozen=True)
class Resources:
    """What a process holds: open fds, mappings of files (guest RAM memfds among them;
    anonymous ones are left out, the allocator makes and keeps those as it likes),
    resident memory."""

    fds: int
    maps: int
    rss_kib: int


def _file_backed(maps_line: str) -> bool:
    fields = maps_line.split(maxsplit=5)
    return len(fields) == 6 and fields[5].startswith("/")


def resources(pid: int) -> Resources:
    """The fds, file-backed /proc/PID/maps lines and VmRSS of process ``pid``."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for line in f if _file_backed(line))
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return Resources(fds, maps, rss)


class ServedBackend:
    """``pviommu serve`` with the PV-IOMMU, QMP, a blk and an rng endpoint in ``workdir``."""

    def __init__(self, workdir: Path, extra: list[str]) -> None:
        self.workdir = workdir
        self.viommu = workdir / "viommu.sock"
        self.qmp = workdir / "qmp.sock"
        self.blk = workdir / "blk.sock"
        self.rng = workdir / "rng.sock"
        self.image = workdir / "disk.img"
        self.log = workdir / "serve.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The ``pviommu serve`` command line."""
        return [sys.executable, "-m", "pviommu.cli", "-v", "serve",
                "--viommu", str(self.viommu), "--qmp", str(self.qmp),
                "--blk", f"{self.blk},endpoint=00:02.0,image={self.image}",
                "--rng", f"{self.rng},endpoint=00:03.0", *self.extra]

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, workdir: Path, extra: list[str] | None = None,
                    image_size: int = 1 << 20) -> AsyncIterator[ServedBackend]:
        """Starts the backend, waits until every socket answers, and stops it on exit."""
        served = cls(workdir, extra or [])
        if not served.image.exists():
            served.image.write_bytes(bytes(image_size))
        with open(served.log, "wb") as log:
            served.proc = subprocess.Popen(served.command(), stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT)
        try:
            await served.wait_listening()
            yield served
        finally:
            served.stop()

    @property
    def pid(self) -> int:
        """The backend's process ID."""
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        """Everything the backend logged so far."""
        return self.log.read_text(errors="replace")

    async def wait_listening(self) -> None:
        """Waits until the backend's startup line is logged (every socket is bound)."""
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while "pviommu: serving virtio-rng" not in self.log_text():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"pviommu serve exited with {self.proc.returncode}:\n"
                                     + self.log_text())
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("pviommu serve did not start:\n" + self.log_text())
            await asyncio.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Stops the backend (SIGKILL if ``sig`` does not); returns its exit status."""
        if self.proc is None:
            return None
        return stop_process(self.proc, sig, timeout)

    def resources(self) -> Resources:
        """The backend's fds, mappings and RSS now."""
        return resources(self.pid)

    async def baseline(self) -> Resources:
        """The resources of a backend that has served each socket once (so that what
        Python loads on first use is not counted against an attack)."""
        await self.assert_serving()
        return self.resources()

    async def assert_back_to(self, baseline: Resources, timeout: float = 5.0,
                             rss_slack_kib: int = 16 << 10) -> Resources:
        """Waits until the fds and mappings are back to ``baseline`` and the RSS is within
        ``rss_slack_kib`` of it; raises AssertionError with both if they are not."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            now = self.resources()
            if (now.fds <= baseline.fds and now.maps <= baseline.maps
                    and now.rss_kib <= baseline.rss_kib + rss_slack_kib):
                return now
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"backend holds {now}, baseline {baseline}")
            await asyncio.sleep(0.05)

    async def qmp_client(self) -> QMPClient:
        """A connected QMP client (the caller disconnects it)."""
        client = QMPClient("hostile-test")
        await asyncio.wait_for(client.connect(str(self.qmp)), 5)
        return client

    async def assert_serving(self, endpoints: tuple[Path, ...] | None = None,
                             vhost: bool = True) -> None:
        """QMP answers, the vhost-user PV-IOMMU negotiates, and each endpoint socket in
        ``endpoints`` (default: both) answers a vfio-user VERSION."""
        assert self.proc is not None and self.proc.poll() is None, \
            f"backend died ({self.proc.returncode if self.proc else None}):\n{self.log_text()}"
        client = await self.qmp_client()
        try:
            stats = await asyncio.wait_for(client.execute("query-viommu-stats"), 5)
            assert isinstance(stats, dict)
        finally:
            await client.disconnect()
        if vhost:
            fe = await FakeFrontend.connect(self.viommu)
            try:
                reply = await fe.call(R.GET_FEATURES)
                assert reply.u64 & (1 << 32), "vhost-user GET_FEATURES lacks VERSION_1"
            finally:
                fe.close()
        for path in (self.blk, self.rng) if endpoints is None else endpoints:
            qemu = await FakeQemu.connect(path)
            try:
                qemu.accept_version(await qemu.version())
            finally:
                await qemu.close()
