"""The backend of a lab: a ``pviommu serve`` process of its own.

It runs beside QEMU as a user would run it (the same command line the README
shows), so a lab exercises the real process boundary, and a backend that
crashes is reported, not fatal to the script driving the lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

from ..machine.qemu import die_with_parent

log = logging.getLogger(__name__)


class BackendError(Exception):
    """The backend did not start, or died; the message holds the end of its log."""


class BackendProcess:
    """``pviommu serve ARGS`` with its log in ``log_file``; ready when every socket in
    ``sockets`` exists. Stopped with SIGTERM, then SIGKILL."""

    def __init__(self, args: list[str], sockets: list[Path], log_file: Path) -> None:
        self.args = args
        self.sockets = sockets
        self.log_file = log_file
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def argv(self) -> list[str]:
        """The command line (``python -m pviommu serve ...``)."""
        return [sys.executable, "-m", "pviommu", "serve", *self.args]

    @property
    def pid(self) -> int | None:
        """The backend's PID while it runs."""
        return self.proc.pid if self.proc is not None else None

    async def start(self, timeout: float = 30, append: bool = False) -> None:
        """Starts the backend and waits until it listens on every socket; ``append``:
        its log goes after the one of the run before."""
        for s in self.sockets:
            s.unlink(missing_ok=True)
        log.info("starting %s", " ".join(self.argv))
        with open(self.log_file, "ab" if append else "wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                preexec_fn=die_with_parent, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.monotonic() + timeout
        while not all(s.exists() for s in self.sockets):
            if self.proc.returncode is not None:
                raise BackendError(f"the backend exited with status {self.proc.returncode} "
                                   f"at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BackendError(f"the backend did not listen within {timeout:g}s:\n"
                                   f"{self.log_tail()}")
            await asyncio.sleep(0.02)

    def log_tail(self, n: int = 20) -> str:
        """The last ``n`` lines of the backend's log."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:]) or "(empty log)"

    @property
    def exited(self) -> int | None:
        """The exit status if the backend has exited, else None."""
        return self.proc.returncode if self.proc is not None else None

    async def restart(self, kill: bool = True, timeout: float = 30) -> int | None:
        """Ends the backend, with SIGKILL (``kill``: nothing cleaned up, as a crash)
        or as :meth:`stop` does, and starts the same command line again, waiting until
        it listens; the exit status of the one that ended."""
        proc = self.proc
        if kill and proc is not None and proc.returncode is None:
            log.info("killing the backend (pid %s)", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        status = await self.stop()
        with open(self.log_file, "ab") as out:
            out.write(f"--- pviommu lab: backend ended ({status}), restarted ---\n".encode())
        await self.start(timeout, append=True)
        return status

    async def stop(self, timeout: float = 10) -> int | None:
        """Stops the backend (SIGTERM, then SIGKILL after ``timeout``); its exit
        status. Idempotent."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("the backend (pid %s) did not stop; killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        return proc.returncode
