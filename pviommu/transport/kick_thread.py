"""A thread that serves one virtqueue's kicks without the event loop.

Waking the asyncio loop for a kick and dispatching it costs more than a
virtio-iommu MAP or UNMAP: the thread blocks in ``poll`` on the kick eventfd
(a duplicate of it, so that the transport may close or replace its own at any
time) and runs ``serve`` for each kick, holding the loop's lock
(:mod:`pviommu.loop_lock`): the batch runs only while the loop waits for I/O,
never beside it.

``poll_us`` > 0 makes the thread spin that long after a batch, watching
``pending`` (the ring has unprocessed buffers), before it blocks again: it
saves the wake-up of a request that follows closely, at the cost of a core
spinning; worth it only with a core to spare.

:meth:`KickThread.stop` is safe from the loop at any time (it never waits for
the thread): once it returns, ``serve`` is never called again; the thread
closes its descriptors and ends on its own soon after.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

LOCK_POLL = 0.05
"""Seconds between two checks of the stop flag while the thread waits for the lock
(a loop that stopped without closing keeps it)."""


class KickThread:
    """Serves the kicks of ``kick_fd`` on a thread of its own (see the module doc).

    ``serve`` runs with ``lock`` held, once per wake-up (it processes everything
    available). ``kick_fd`` is duplicated; the caller keeps and closes its own.
    """

    def __init__(self, kick_fd: int, lock: threading.Lock, serve: Callable[[], None],
                 name: str, poll_us: int = 0,
                 pending: Callable[[], bool] | None = None) -> None:
        self._lock = lock
        self._serve = serve
        self._poll_ns = poll_us * 1000 if pending is not None else 0
        self._pending = pending
        self._stop = threading.Event()
        self._fds_lock = threading.Lock()
        self._fds_closed = False
        self._kick = os.dup(kick_fd)
        try:
            self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            os.close(self._kick)
            raise
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        try:
            self._thread.start()
        except RuntimeError:  # no thread to be had: the caller serves the fd otherwise
            os.close(self._kick)
            os.close(self._wake)
            raise

    @property
    def alive(self) -> bool:
        """Whether the thread still runs (it ends soon after :meth:`stop`)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """No ``serve`` after this returns; wakes the thread so that it ends.

        Call it with the lock held (from the loop), or when the thread cannot be
        inside ``serve``.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        with self._fds_lock:
            if not self._fds_closed:  # else the thread has ended: its fd numbers are free
                os.eventfd_write(self._wake, 1)

    def join(self, timeout: float | None = None) -> None:
        """Waits for the thread to end (after :meth:`stop`); never with the lock held."""
        self._thread.join(timeout)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._kick, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        try:
            while not self._stop.is_set():
                events = poller.poll()
                if self._stop.is_set():
                    return
                if any(ev & (select.POLLERR | select.POLLNVAL) for _, ev in events):
                    log.error("%s: kick fd failed; its kicks go unserved",
                              self._thread.name)
                    return
                try:
                    os.read(self._kick, 8)
                except BlockingIOError:
                    continue
                if not self._locked_serve():
                    return
                if self._poll_ns:
                    self._spin()
        except Exception:  # a bug of ours: log it, the loop serves nothing of this fd
            log.exception("%s: kick thread failed", self._thread.name)
        finally:
            with self._fds_lock:
                self._fds_closed = True
                os.close(self._kick)
                os.close(self._wake)

    def _locked_serve(self) -> bool:
        """Runs ``serve`` with the lock; False once stopped."""
        lock = self._lock
        while not lock.acquire(timeout=LOCK_POLL):
            if self._stop.is_set():
                return False
        try:
            if self._stop.is_set():
                return False
            self._serve()
        finally:
            lock.release()
        return True

    def _spin(self) -> None:
        """Polls ``pending`` for up to ``poll_us``, serving what shows up."""
        assert self._pending is not None
        pending, lock = self._pending, self._lock
        deadline = time.monotonic_ns() + self._poll_ns
        while time.monotonic_ns() < deadline and not self._stop.is_set():
            os.sched_yield()  # lets the loop's thread have the GIL if it wants it
            if not lock.acquire(blocking=False):
                continue
            try:
                if self._stop.is_set():
                    return
                found = pending()
                if found:
                    self._serve()
            finally:
                lock.release()
            if found:
                deadline = time.monotonic_ns() + self._poll_ns
