"""The guest's serial console: a pexpect child read in the background, a log,
and the markers the guest init prints."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import pexpect

MARKER = re.compile(r"@@PVIOMMU (\w+)((?: \w+=\S*)*)")
_KV = re.compile(r"(\w+)=(\S*)")

_T = TypeVar("_T")


class GuestTimeout(Exception):
    """The guest did not print what the host waited for in time."""


class GuestFailed(Exception):
    """The guest's scenario reported a failure or the machine exited early."""


@dataclass(frozen=True)
class Marker:
    """One "@@PVIOMMU NAME k=v..." line printed by the guest init."""

    name: str
    fields: dict[str, str]
    time: float


def parse_marker(line: str) -> tuple[str, dict[str, str]] | None:
    """Parses a marker line; None if the line holds no marker."""
    m = MARKER.search(line)
    if not m:
        return None
    return m.group(1), dict(_KV.findall(m.group(2)))


class Console:
    """Reads the serial console of a QEMU child continuously, keeping every line.

    Reading never stops while the child lives, so QEMU is never blocked on a
    full console. ``lines`` holds the log, ``markers`` the init's markers.
    """

    def __init__(self, child: pexpect.spawn) -> None:
        self.child = child
        self.lines: list[str] = []
        self.markers: list[Marker] = []
        self.closed = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def reading(self) -> bool:
        """Whether the background reader runs."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Starts the background reader."""
        self._task = asyncio.create_task(self._reader())

    async def _reader(self) -> None:
        while True:
            try:
                idx = await self.child.expect([r"\n", pexpect.EOF], timeout=None, async_=True)
            except pexpect.TIMEOUT:
                continue
            except Exception:  # the pty vanished under us: treat as closed
                idx = 1
            before = self.child.before if isinstance(self.child.before, str) else ""
            if before or idx == 0:
                self._add_line(before.replace("\r", ""))
            if idx == 1:
                self.closed = True
            self._changed.set()
            if self.closed:
                return

    def _add_line(self, line: str) -> None:
        self.lines.append(line)
        parsed = parse_marker(line)
        if parsed:
            self.markers.append(Marker(parsed[0], parsed[1], time.monotonic()))

    async def stop(self) -> None:
        """Stops the background reader."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def send(self, text: str) -> None:
        """Types ``text`` on the guest's console (its init reads it as standard input)."""
        self.child.send(text)

    def find(self, name: str) -> Marker | None:
        """The first marker called ``name`` seen so far."""
        return next((m for m in self.markers if m.name == name), None)

    async def wait_until(self, ready: Callable[[], _T | None], what: str, timeout: float) -> _T:
        """Waits until ``ready()`` returns something true and returns it.

        Raises GuestTimeout after ``timeout`` seconds, GuestFailed when the
        guest reports FAIL or QEMU closes the console first.
        """
        deadline = time.monotonic() + timeout
        while True:
            if result := ready():
                return result
            if (f := self.find("FAIL")) is not None:
                raise GuestFailed(f"guest scenario failed: {f.fields.get('reason', '?')}")
            await self._changes(deadline, what, timeout)

    async def wait_marker(self, name: str, timeout: float) -> Marker:
        """Waits for the marker ``name``."""
        return await self.wait_until(lambda: self.find(name), f"{name} marker", timeout)

    async def wait_line(self, pattern: str, timeout: float) -> str:
        """Waits for a console line matching the regular expression ``pattern``."""
        rx = re.compile(pattern)
        return await self.wait_until(
            lambda: next((line for line in self.lines if rx.search(line)), None),
            f"line matching {pattern!r}", timeout)

    async def wait_match(self, start: int, pattern: re.Pattern[str], what: str,
                         timeout: float) -> tuple[int, re.Match[str]]:
        """Waits for a line from index ``start`` on that ``pattern`` matches (searched
        anywhere in the line); returns its index and the match. Raises GuestTimeout
        after ``timeout`` seconds and GuestFailed if QEMU closes the console first.
        Unlike :meth:`wait_until` it ignores the scenario markers (FAIL)."""
        deadline = time.monotonic() + timeout
        index = start
        while True:
            while index < len(self.lines):
                if m := pattern.search(self.lines[index]):
                    return index, m
                index += 1
            await self._changes(deadline, what, timeout)

    async def _changes(self, deadline: float, what: str, timeout: float) -> None:
        """Waits until the console changes; GuestFailed if QEMU closed it, GuestTimeout
        past ``deadline`` (the wait for ``what`` took ``timeout`` seconds)."""
        if self.closed:
            raise GuestFailed(f"QEMU exited before the guest printed {what}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise GuestTimeout(f"no {what} from the guest within {timeout:g}s")
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), left)

    def tail(self, n: int = 20) -> str:
        """The last ``n`` lines of the console."""
        return "\n".join(self.lines[-n:])

    def release(self) -> None:
        """Hands the console over to someone else (after :meth:`stop`): pexpect's
        asyncio reader stops taking the child's output into its buffer."""
        waiter = getattr(self.child, "async_pw_transport", None)
        if waiter is not None:
            waiter[1].pause_reading()

    async def wait_closed(self, timeout: float) -> bool:
        """Waits until QEMU closes the console; False on timeout."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    def text(self) -> str:
        """The whole console log so far."""
        return "\n".join(self.lines)
