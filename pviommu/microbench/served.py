"""A real ``pviommu serve`` subprocess for the micro-benchmark, optionally under cProfile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

START_TIMEOUT = 20.0


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> int:
    """Sends ``sig`` to a running ``proc`` and waits (SIGKILL after ``timeout`` s);
    returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class ServedBackend:
    """``pviommu serve`` with ``args``; waits until every socket in ``sockets`` exists.

    With ``profile`` the process runs under ``python -m cProfile -o PROFILE`` (the
    profile is written when it stops: SIGTERM ends ``serve`` normally).
    """

    def __init__(self, args: list[str], sockets: list[Path], log: Path,
                 profile: Path | None = None) -> None:
        self.sockets = sockets
        self.log = log
        python = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else [])
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([*python, "-m", "pviommu.cli", "serve", *args],
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        """The backend's process ID."""
        return self.proc.pid

    def _wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(s.exists() for s in self.sockets):
            if self.proc.poll() is not None:
                raise RuntimeError(f"pviommu serve exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace"))
            if time.monotonic() > deadline:
                raise RuntimeError("pviommu serve did not start:\n"
                                   + self.log.read_text(errors="replace"))
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (SIGKILL if that does not end it); returns the exit status."""
        return stop_process(self.proc, signal.SIGTERM, timeout)

    def __enter__(self) -> ServedBackend:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def environment_note() -> str:
    """The load average and CPU count, for the record of a run."""
    one, five, _ = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {one:.2f} (1 min), {five:.2f} (5 min)"
