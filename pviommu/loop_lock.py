"""A lock an asyncio event loop holds except while it waits for I/O.

A thread that serves a hot virtqueue (see :mod:`pviommu.transport.kick_thread`)
takes this lock for each batch of requests. The loop holds it whenever it runs
callbacks and tasks, and lets go only inside its selector's ``select``, so a
batch on the thread never interleaves with anything the loop does (QMP
commands, endpoint DMA translations, vhost-user messages that stop or reset a
queue, revocations): the device model and the IOMMU state see one thread at a
time, and a compound update on one side is never seen half done by the other.
The thread runs while the loop is idle, which is exactly when it helps.

The lock is installed by wrapping the loop's selector (asyncio's selector event
loops keep it in ``_selector``); a loop without one (another event loop
implementation) gets none, and its queues are served on the loop.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
import weakref
from typing import Any

_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, threading.Lock] = (
    weakref.WeakKeyDictionary())


class _LockingSelector:
    """The loop's selector, releasing ``lock`` while it waits in ``select``.

    Installed from a callback, so the loop holds the lock from the start. When the
    loop closes it keeps the lock for good: no batch runs on a thread once the
    loop that owns the device is gone.
    """

    def __init__(self, selector: selectors.BaseSelector, lock: threading.Lock) -> None:
        self._selector = selector
        self._lock = lock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """The wrapped ``select``, with the lock released while it waits."""
        self._lock.release()
        try:
            return self._selector.select(timeout)
        finally:
            self._lock.acquire()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._selector, name)


def install(loop: asyncio.AbstractEventLoop) -> threading.Lock | None:
    """The lock of ``loop`` (installed on first use; call it from the loop's thread, in
    a callback or task), or None if the loop's selector cannot be wrapped."""
    lock = _locks.get(loop)
    if lock is not None:
        return lock
    selector = getattr(loop, "_selector", None)
    if not isinstance(selector, selectors.BaseSelector) or loop.is_closed():
        return None
    lock = threading.Lock()
    lock.acquire()
    loop._selector = _LockingSelector(selector, lock)  # type: ignore[attr-defined]
    _locks[loop] = lock
    return lock
