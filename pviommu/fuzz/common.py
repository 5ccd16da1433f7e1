"""What every fuzz target shares: an input reader, findings, guest memory, one loop.

A target reports what breaks the spec by raising :class:`Finding`. Errors the code
catches and logs as its own bugs (``log.exception``: "internal error ...") are
findings too: :class:`InternalErrors` collects them from the logging records, and
:func:`run_input` raises them after the input.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..memory import GuestMemory, RegionSpec
from ..microbench.guest import sealed_memfd

T = TypeVar("T")

ASYNC_TIMEOUT = 2.0
"""Seconds one input's asynchronous part may take: longer is a hang (a finding)."""


PENDING_ISSUES: frozenset[str] = frozenset()
"""Findings whose fix waits (tests/fuzz/crashes/PENDING.json). None today: the one
found, an E2BIG answer to a posted vfio-user write, is fixed."""
KNOWN_ISSUES: set[str] = set() if os.environ.get("PVIOMMU_FUZZ_STRICT") else set(PENDING_ISSUES)
"""The findings the targets tolerate: a check names its issue, and passes if the issue
is in this set. The regression tests empty it, so that they fail until the fix lands;
PVIOMMU_FUZZ_STRICT=1 empties it for a whole run."""


def known(issue: str) -> bool:
    """Whether ``issue`` is a known finding tolerated for now."""
    return issue in KNOWN_ISSUES


class Finding(AssertionError):
    """The code under test did something the spec does not allow for this input."""


def check(condition: object, message: str) -> None:
    """Raises :class:`Finding` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise Finding(message)


class Bytes:
    """Reads typed fields off the fuzzer's bytes; past the end every read gives zeros,
    so any input decodes (libFuzzer mutates lengths freely)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        """Bytes not read yet."""
        return max(len(self.data) - self.pos, 0)

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes, zero-padded past the end."""
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk + bytes(n - len(chunk))

    def rest(self) -> bytes:
        """Everything not read yet."""
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk

    def uint(self, n: int) -> int:
        """An ``n``-byte little-endian unsigned integer."""
        return int.from_bytes(self.take(n), "little")

    def u8(self) -> int:
        """One byte."""
        return self.uint(1)

    def u16(self) -> int:
        """A little-endian u16."""
        return self.uint(2)

    def u32(self) -> int:
        """A little-endian u32."""
        return self.uint(4)

    def u64(self) -> int:
        """A little-endian u64."""
        return self.uint(8)

    def pick(self, choices: list[T] | tuple[T, ...]) -> T:
        """One of ``choices``, by the next byte."""
        return choices[self.u8() % len(choices)]


class InternalErrors(logging.Handler):
    """Collects the log records that mark a bug of ours: an exception logged with its
    traceback (``log.exception``), and asyncio's errors (an exception in a callback,
    a task's exception never retrieved)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.name == "asyncio":
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                text += f": {type(exc).__name__}: {exc}"
            self.records.append(text)


_errors = InternalErrors()
_loop: asyncio.AbstractEventLoop | None = None


def quiet_logging() -> None:
    """Routes the records to :data:`_errors` only: a fuzzer logs nothing else (the
    thousands of refusals per second would cost more than the inputs)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_errors)
    root.setLevel(logging.ERROR)


def loop() -> asyncio.AbstractEventLoop:
    """The event loop every input runs on (one per process)."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop


def run_async(factory: Callable[[], Coroutine[Any, Any, T]],
              timeout: float = ASYNC_TIMEOUT) -> T:
    """Runs ``factory()`` on :func:`loop`; a hang past ``timeout`` is a finding. Tasks
    it leaves behind are cancelled, so that no input leaks into the next."""
    lp = loop()

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(factory(), timeout)
        except TimeoutError:
            raise Finding(f"hang: the input's work took over {timeout} s") from None

    try:
        return lp.run_until_complete(bounded())
    finally:
        left = [t for t in asyncio.all_tasks(lp) if not t.done()]
        for task in left:
            task.cancel()
        if left:
            lp.run_until_complete(asyncio.gather(*left, return_exceptions=True))


def run_input(one_input: Callable[[bytes], None], data: bytes) -> None:
    """Runs ``one_input(data)``, then raises a :class:`Finding` for any internal error
    it logged."""
    _errors.records.clear()
    one_input(data)
    if _errors.records:
        raise Finding("internal error logged: " + "; ".join(_errors.records[:3]))


class Ram:
    """``size`` bytes of guest RAM at ``gpa``: a memfd sealed as QEMU seals it, mapped
    here once, and a :class:`GuestMemory` over it (the code under test's view)."""

    def __init__(self, size: int, gpa: int, uaddr: int = 0x7F0000000000) -> None:
        self.size, self.gpa, self.uaddr = size, gpa, uaddr
        self.fd = sealed_memfd(size, "fuzz-guest")
        self.memory = GuestMemory()
        self.memory.set_regions([RegionSpec(gpa, size, uaddr, 0)], [os.dup(self.fd)])
        view = self.memory.view(gpa, size)
        self.view = view

    def fill(self, data: bytes, offset: int = 0) -> None:
        """Writes ``data`` at ``offset`` bytes into the RAM (clipped to it)."""
        data = data[:max(self.size - offset, 0)]
        self.view[offset:offset + len(data)] = data

    def clear(self) -> None:
        """Zeroes the RAM."""
        self.view[:] = bytes(self.size)

    def contains(self, gpa: int, length: int) -> bool:
        """Whether ``[gpa, gpa+length)`` is inside this RAM."""
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size
