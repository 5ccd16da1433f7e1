"""A QEMU process: started under pexpect, driven over QMP, always cleaned up."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pexpect
from qemu.qmp import QMPClient

from .console import Console
from .topology import Topology

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    # QEMU must not outlive the Python process that launched it, even on SIGKILL.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class QemuError(Exception):
    """QEMU could not be started or did not behave."""


async def dump_dtb(qemu: Path, topology: Topology, out: Path, timeout: float = 60) -> bytes:
    """Runs QEMU with ``dumpdtb`` on the same command line and returns the DTB."""
    argv = topology.command_line(qemu, dumpdtb=out)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent)
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise QemuError(f"QEMU did not finish dumping the DTB within {timeout}s") from None
    if not out.exists():
        raise QemuError(f"QEMU did not write {out}: {output.decode(errors='replace').strip()}")
    return out.read_bytes()


class QemuMachine:
    """One running QEMU: its serial console, its QMP monitor, its clean-up.

    Use as ``async with QemuMachine(...) as vm:``; leaving the block stops QEMU
    (QMP ``quit``, then SIGKILL of its PID) whatever happened inside.
    """

    def __init__(self, qemu: Path, topology: Topology, workdir: Path,
                 log_file: Path | None = None) -> None:
        self.qemu = qemu
        self.topology = topology
        self.workdir = workdir
        self.qmp_socket = workdir / "qemu-qmp.sock"
        self.log_file = log_file
        self.child: pexpect.spawn | None = None
        self.console: Console | None = None
        self.qmp: QMPClient | None = None
        self.started_at = 0.0
        self._log_fh: Any = None

    @property
    def pid(self) -> int | None:
        """QEMU's PID while it runs."""
        return self.child.pid if self.child is not None else None

    async def start(self, qmp_timeout: float = 30) -> None:
        """Starts QEMU, its console reader, and connects to its QMP monitor."""
        argv = self.topology.command_line(self.qemu, qmp_socket=self.qmp_socket)
        log.info("starting %s", " ".join(argv))
        self.qmp_socket.unlink(missing_ok=True)
        self.started_at = time.monotonic()
        self.child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8",
                                   codec_errors="replace", echo=False,
                                   preexec_fn=die_with_parent, timeout=None)
        if self.log_file is not None:
            self._log_fh = open(self.log_file, "w")  # noqa: SIM115 (closed in stop)
            self.child.logfile_read = self._log_fh
        self.console = Console(self.child)
        self.console.start()
        self.qmp = QMPClient("pviommu-launcher")
        deadline = time.monotonic() + qmp_timeout
        while not self.qmp_socket.exists():
            if self.console.closed:
                raise QemuError(f"QEMU exited at start:\n{self.console.text()}")
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU opened no QMP socket at {self.qmp_socket} "
                                f"within {qmp_timeout}s")
            await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(self.qmp.connect(str(self.qmp_socket)),
                                   max(1.0, deadline - time.monotonic()))
        except Exception as exc:
            raise QemuError(f"cannot connect to QEMU's QMP at {self.qmp_socket}: {exc}") from exc

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = 30) -> Any:
        """Runs one QMP command on QEMU's monitor and returns its result."""
        if self.qmp is None:
            raise QemuError("QEMU is not running")
        return await asyncio.wait_for(self.qmp.execute(cmd, args), timeout)

    async def wait_exit(self, timeout: float) -> int | None:
        """Waits for QEMU to exit by itself; its exit status, None on timeout."""
        assert self.console is not None and self.child is not None
        if not await self.console.wait_closed(timeout):
            return None
        return await asyncio.to_thread(self._reap)

    def _reap(self) -> int | None:
        assert self.child is not None
        deadline = time.monotonic() + 5
        while self.child.isalive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.child.exitstatus if not self.child.isalive() else None

    async def _wait_exit(self, timeout: float) -> bool:
        """Waits for QEMU to close its console, or, if nobody reads the console any
        more (it was handed to a person), for the process to end."""
        assert self.child is not None
        if self.console is not None and self.console.reading:
            return await self.console.wait_closed(timeout)
        deadline = time.monotonic() + timeout
        while self.child.isalive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.child.isalive()

    async def stop(self, timeout: float = 10) -> None:
        """Stops QEMU: QMP quit, then SIGKILL; closes everything. Idempotent."""
        if self.child is not None and self.child.isalive() and self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), timeout)
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), timeout)
            self.qmp = None
        if self.child is not None:
            if not await self._wait_exit(timeout):
                log.warning("QEMU (pid %s) did not quit; killing it", self.child.pid)
            if self.child.isalive():
                self.child.kill(signal.SIGKILL)
            await asyncio.to_thread(self.child.close, True)
        if self.console is not None:
            await self.console.stop()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        self.qmp_socket.unlink(missing_ok=True)

    async def __aenter__(self) -> QemuMachine:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
