"""Interrupt fds a frontend hands over (vhost-user call/err fds, vfio-user MSI-X eventfds).

The backend writes to them from its one event loop, so a write must never
block: a blocking eventfd whose counter is at its maximum, or a full pipe,
would stop every socket the process serves. Each fd is made non-blocking
when it is received (QEMU creates its eventfds non-blocking anyway; the flag
belongs to the open file, which the frontend shares). A write that would
block is dropped: on an eventfd that means its counter is already at its
maximum, i.e. already signalled; on anything else the interrupt is lost and
that is logged, at most once every :data:`LOG_INTERVAL` seconds per fd's
purpose.
"""

from __future__ import annotations

import logging
import os
import stat
import time

log = logging.getLogger(__name__)

LOG_INTERVAL = 10.0
"""Seconds between two log lines about the same interrupt's failed writes."""

_ONE = (1).to_bytes(8, "little")
_last_logged: dict[str, float] = {}
_suppressed: dict[str, int] = {}


def adopt(fd: int) -> int:
    """Makes a received interrupt fd non-blocking and returns it.

    Raises OSError if ``fd`` is not usable (the caller refuses the message).
    """
    os.set_blocking(fd, False)
    return fd


def signal(fd: int, what: str) -> bool:
    """Adds one to the eventfd ``fd`` (``what`` names it in log lines) without blocking.

    Returns whether the interrupt was delivered (or already pending).
    """
    try:
        os.write(fd, _ONE)
    except BlockingIOError:
        if _is_eventfd(fd):
            return True  # counter at its maximum: the reader has an event pending
        _log_limited(what, "interrupt dropped: its fd is full (not an eventfd, never read)")
        return False
    except OSError as e:
        _log_limited(what, f"interrupt dropped: writing its fd failed: {e}")
        return False
    return True


def _is_eventfd(fd: int) -> bool:
    try:
        # eventfds are anonymous inodes: no file type bits
        return stat.S_IFMT(os.fstat(fd).st_mode) == 0
    except OSError:
        return False


def _log_limited(what: str, message: str) -> None:
    now = time.monotonic()
    last = _last_logged.get(what)
    if last is not None and now - last < LOG_INTERVAL:
        _suppressed[what] = _suppressed.get(what, 0) + 1
        return
    _last_logged[what] = now
    skipped = _suppressed.pop(what, 0)
    log.warning("%s: %s%s", what, message,
                f" ({skipped} more since the last report)" if skipped else "")
