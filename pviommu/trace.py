"""The backend's IOMMU traffic as a Trace Event Format timeline (Perfetto, chrome://tracing).

:class:`TraceWriter` streams events to a file in the JSON Array Format of the
Trace Event Format, one event a line: ``[`` on the first line, each event after
the first starts with its separating comma, and ``]`` is written at close. The
format lets the closing ``]`` be missing, so the trace of a backend that was
killed still opens (at most the unflushed buffer, :data:`FLUSH_BYTES` or
:data:`FLUSH_SECONDS` of events, is lost; the file holds whole lines only).
Nothing is kept in memory but that buffer.

:class:`TraceRecorder` is an :class:`~pviommu.events.EventBus` listener that
turns the backend's events into trace events on named tracks (docs/TRACING.md):

- ``PV-IOMMU request queue``: each virtio-iommu request as a complete ("X")
  event named by its type, and the ``mappings`` counter;
- ``PV-IOMMU domains``: attach and detach instants;
- per endpoint, ``<kind> <id>``: its device's requests as complete events, its
  faults, revocations and NEEDS_RESET as instants; requests in flight at the
  same time go to extra lanes (``<kind> <id> #2``...), as one track's
  complete events must nest;
- per vSMMU endpoint, ``IOTLB <id>``: each MISS round trip as a complete event,
  each UPDATE and INVALIDATE from QEMU as an instant.

Times are ``time.monotonic_ns()`` converted to microseconds since the trace was
opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .events import (
    DeviceNeedsReset,
    EndpointAttached,
    EndpointDetached,
    EndpointRequestDone,
    EventBus,
    EventListener,
    FaultRecorded,
    IommuRequestDone,
    IotlbMessage,
    IotlbMissDone,
    MappingRevoked,
    RevokedMemoryChecked,
)

log = logging.getLogger(__name__)

FLUSH_BYTES = 1 << 16
FLUSH_SECONDS = 1.0
PROCESS_NAME = "pviommu backend"

TID_IOMMU = 1
TID_DOMAINS = 2
_FIRST_DYNAMIC_TID = 16
# One encoder for every line (json.dumps with options builds a new one per call).
_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


def _us(ns: int) -> float:
    """Nanoseconds as microseconds, to the nanosecond."""
    return round(ns / 1000, 3)


class TraceWriter:
    """Streams Trace Event Format events to ``path`` (JSON Array Format).

    ``origin_ns`` (a ``time.monotonic_ns()`` value, now by default) is the trace's
    time 0. Writes are buffered and flushed as whole lines every ``flush_bytes``
    and, inside an event loop, ``flush_seconds`` after the first line buffered;
    :meth:`close` writes the closing ``]``. An OSError while
    writing is logged once and stops the trace: the backend goes on.
    """

    def __init__(self, path: Path | str, *, pid: int | None = None,
                 origin_ns: int | None = None, flush_bytes: int = FLUSH_BYTES,
                 flush_seconds: float = FLUSH_SECONDS) -> None:
        self.path = Path(path)
        self.pid = os.getpid() if pid is None else pid
        self.origin_ns = time.monotonic_ns() if origin_ns is None else origin_ns
        self.flush_bytes = flush_bytes
        self.flush_seconds = flush_seconds
        self.events = 0
        self.failed = False
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                                       | os.O_CLOEXEC, 0o644)
        self._lines: list[str] = ["[\n"]
        self._size = 2
        self._timer: asyncio.TimerHandle | None = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or writing failed)."""
        return self._fd is None

    def ts(self, ns: int) -> float:
        """The trace time (µs) of monotonic time ``ns`` (never before the start)."""
        return _us(max(ns - self.origin_ns, 0))

    def write(self, event: Mapping[str, Any]) -> None:
        """Appends one event (a JSON object of the format) to the trace."""
        if self._fd is None:
            return
        line = _encode(event)
        line = f"{line}\n" if self.events == 0 else f",{line}\n"
        self.events += 1
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.flush_bytes:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop: the buffer waits for the size limit or close
            self._timer = loop.call_later(self.flush_seconds, self.flush)

    def complete(self, name: str, cat: str, tid: int, start_ns: int, end_ns: int,
                 args: Mapping[str, Any] | None = None) -> None:
        """A complete ("X") event from ``start_ns`` to ``end_ns`` on track ``tid``."""
        ts = self.ts(start_ns)
        event: dict[str, Any] = {"name": name, "cat": cat, "ph": "X", "ts": ts,
                                 "dur": max(round(self.ts(end_ns) - ts, 3), 0.0),
                                 "pid": self.pid, "tid": tid}
        if args:
            event["args"] = dict(args)
        self.write(event)

    def instant(self, name: str, cat: str, tid: int, at_ns: int,
                args: Mapping[str, Any] | None = None, scope: str = "t") -> None:
        """An instant ("i") event on track ``tid`` (scope t), the process (p) or all (g)."""
        event: dict[str, Any] = {"name": name, "cat": cat, "ph": "i", "ts": self.ts(at_ns),
                                 "pid": self.pid, "tid": tid, "s": scope}
        if args:
            event["args"] = dict(args)
        self.write(event)

    def counter(self, name: str, at_ns: int, values: Mapping[str, int | float]) -> None:
        """A counter ("C") event: each of ``values`` is one series of counter ``name``."""
        self.write({"name": name, "ph": "C", "ts": self.ts(at_ns), "pid": self.pid,
                    "tid": 0, "args": dict(values)})

    def metadata(self, name: str, tid: int, args: Mapping[str, Any]) -> None:
        """A metadata ("M") event: process_name, thread_name, *_sort_index."""
        self.write({"name": name, "ph": "M", "ts": 0, "pid": self.pid, "tid": tid,
                    "args": dict(args)})

    def flush(self) -> None:
        """Writes the buffered lines to the file."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fd is None or not self._lines:
            return
        data = "".join(self._lines).encode()
        self._lines.clear()
        self._size = 0
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            log.error("trace %s: cannot write (%s); tracing stops here", self.path, e)
            self.failed = True
            self._close_fd()

    def close(self) -> None:
        """Writes the closing ``]`` and what is buffered, and closes the file."""
        if self._fd is None:
            return
        self._lines.append("]\n")
        self.flush()
        self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _hex(value: int | None) -> str | None:
    return None if value is None else f"{value:#x}"


def _args(**values: Any) -> dict[str, Any]:
    """The arguments that have a value."""
    return {k: v for k, v in values.items() if v is not None}


@dataclass
class _Lanes:
    """The tracks of one source: complete events that overlap in time go to
    different lanes (a track's complete events must nest)."""

    name: str
    sort_base: int
    tids: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)


TRACED_EVENTS: tuple[type, ...] = (
    IommuRequestDone, EndpointRequestDone, IotlbMissDone, IotlbMessage, FaultRecorded,
    EndpointAttached, EndpointDetached, MappingRevoked, RevokedMemoryChecked,
    DeviceNeedsReset)
"""The events a :class:`TraceRecorder` listens to."""


class TraceRecorder:
    """Listens to ``events`` and writes the backend's IOMMU traffic through ``writer``.

    ``names`` gives an endpoint's track its device's name (e.g. ``{0x10: "blk"}``);
    an endpoint without one is named ``endpoint``. Use :meth:`open` to start one,
    :meth:`close` to stop it and finish the file.
    """

    def __init__(self, writer: TraceWriter, events: EventBus,
                 names: Mapping[int, str] | None = None) -> None:
        self.writer = writer
        self.events = events
        self.names = dict(names or {})
        self._lanes: dict[tuple[str, int], _Lanes] = {}
        self._next_tid = _FIRST_DYNAMIC_TID
        self._mappings: int | None = None
        w = writer
        w.metadata("process_name", 0, {"name": PROCESS_NAME})
        w.metadata("process_sort_index", 0, {"sort_index": 0})
        for tid, name in ((TID_IOMMU, "PV-IOMMU request queue"),
                          (TID_DOMAINS, "PV-IOMMU domains")):
            w.metadata("thread_name", tid, {"name": name})
            w.metadata("thread_sort_index", tid, {"sort_index": tid})
        self.listener = events.register(EventListener(self._on_event, *TRACED_EVENTS))

    @classmethod
    def open(cls, path: Path | str, events: EventBus,
             names: Mapping[int, str] | None = None) -> TraceRecorder:
        """Starts a trace of ``events`` in ``path`` (created or truncated)."""
        return cls(TraceWriter(path), events, names)

    def close(self) -> None:
        """Stops listening and finishes the file (the closing ``]``)."""
        with contextlib.suppress(ValueError):  # already removed
            self.events.remove(self.listener)
        self.writer.close()

    # -- tracks ---------------------------------------------------------------------------

    def _group(self, kind: str, endpoint: int) -> _Lanes:
        lanes = self._lanes.get((kind, endpoint))
        if lanes is None:
            label = self.names.get(endpoint, "endpoint") if kind == "device" else "IOTLB"
            # An endpoint's device tracks, then its IOTLB tracks, after the IOMMU's.
            sort_base = 1000 + (endpoint & 0xFFFFFF) * 256 + (128 if kind == "iotlb" else 0)
            lanes = _Lanes(f"{label} {endpoint:#x}", sort_base)
            self._lanes[(kind, endpoint)] = lanes
        return lanes

    def _lane(self, lanes: _Lanes, index: int) -> int:
        while len(lanes.tids) <= index:
            tid = self._next_tid
            self._next_tid += 1
            n = len(lanes.tids)
            lanes.tids.append(tid)
            lanes.ends.append(0)
            name = lanes.name if n == 0 else f"{lanes.name} #{n + 1}"
            self.writer.metadata("thread_name", tid, {"name": name})
            self.writer.metadata("thread_sort_index", tid, {"sort_index": lanes.sort_base + n})
        return lanes.tids[index]

    def _span_tid(self, lanes: _Lanes, start_ns: int, end_ns: int) -> int:
        """The first lane free at ``start_ns`` (events arrive as they complete, so every
        span already placed ended before this one does: only its end matters)."""
        for i, end in enumerate(lanes.ends):
            if end <= start_ns:
                lanes.ends[i] = end_ns
                return lanes.tids[i]
        tid = self._lane(lanes, len(lanes.tids))
        lanes.ends[-1] = end_ns
        return tid

    def _endpoint_tid(self, endpoint: int | None) -> int:
        if endpoint is None:
            return TID_IOMMU
        return self._lane(self._group("device", endpoint), 0)

    # -- events ---------------------------------------------------------------------------

    def _on_event(self, event: object) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)

    def _iommu_request(self, e: IommuRequestDone) -> None:
        self.writer.complete(e.kind, "viommu", TID_IOMMU, e.start_ns, e.end_ns, _args(
            status=e.status, domain=e.domain, endpoint=_hex(e.endpoint),
            virt_start=_hex(e.virt_start), virt_end=_hex(e.virt_end),
            phys_start=_hex(e.phys_start), flags=e.flags))
        if e.mappings != self._mappings:
            self._mappings = e.mappings
            self.writer.counter("mappings", e.end_ns, {"mappings": e.mappings})

    def _endpoint_request(self, e: EndpointRequestDone) -> None:
        tid = self._span_tid(self._group("device", e.endpoint), e.start_ns, e.end_ns)
        cat = e.device.removeprefix("virtio-")
        self.writer.complete(e.kind, cat, tid, e.start_ns, e.end_ns, _args(
            endpoint=_hex(e.endpoint), status=e.status, sector=e.sector, length=e.length))

    def _iotlb_miss(self, e: IotlbMissDone) -> None:
        tid = self._span_tid(self._group("iotlb", e.endpoint), e.start_ns, e.end_ns)
        self.writer.complete("MISS", "iotlb", tid, e.start_ns, e.end_ns, _args(
            endpoint=_hex(e.endpoint), iova=_hex(e.iova), access=e.access, result=e.result))

    def _iotlb_message(self, e: IotlbMessage) -> None:
        tid = self._lane(self._group("iotlb", e.endpoint), 0)
        self.writer.instant(e.kind, "iotlb", tid, e.at_ns, _args(
            endpoint=_hex(e.endpoint), iova=_hex(e.iova), size=_hex(e.size),
            gpa=_hex(e.gpa)))

    def _fault(self, e: FaultRecorded) -> None:
        f = e.fault
        self.writer.instant("fault", "fault", self._endpoint_tid(f.endpoint),
                            time.monotonic_ns(), _args(
                                endpoint=_hex(f.endpoint), address=_hex(f.address),
                                access=f.access.name, reason=str(f.reason),
                                stage=None if f.stage is None else int(f.stage),
                                delivered=e.delivered))

    def _attached(self, e: EndpointAttached | EndpointDetached) -> None:
        name = "attach" if isinstance(e, EndpointAttached) else "detach"
        self.writer.instant(name, "viommu", TID_DOMAINS, time.monotonic_ns(),
                            {"domain": e.domain, "endpoint": _hex(e.endpoint)})

    def _revoked(self, e: MappingRevoked) -> None:
        r = e.revoked
        self.writer.instant("revoked", "revocation", self._endpoint_tid(r.endpoint),
                            time.monotonic_ns(), {
                                "endpoint": _hex(r.endpoint), "domain": r.domain,
                                "virt_start": _hex(r.virt_start),
                                "virt_end": _hex(r.virt_end),
                                "phys_start": _hex(r.phys_start)})

    def _revoked_checked(self, e: RevokedMemoryChecked) -> None:
        r = e.revoked
        unchanged = (None if e.sha256_before is None or e.sha256_after is None
                     else e.sha256_before == e.sha256_after)
        self.writer.instant("revoked memory checked", "revocation",
                            self._endpoint_tid(r.endpoint), time.monotonic_ns(), _args(
                                endpoint=_hex(r.endpoint), virt_start=_hex(r.virt_start),
                                sha256_before=e.sha256_before, sha256_after=e.sha256_after,
                                unchanged=unchanged))

    def _needs_reset(self, e: DeviceNeedsReset) -> None:
        self.writer.instant("NEEDS_RESET", "device", self._endpoint_tid(e.endpoint),
                            time.monotonic_ns(), _args(
                                kind=e.kind, endpoint=_hex(e.endpoint), queue=e.queue,
                                reason=e.reason))


_HANDLERS: dict[type, Any] = {
    IommuRequestDone: TraceRecorder._iommu_request,
    EndpointRequestDone: TraceRecorder._endpoint_request,
    IotlbMissDone: TraceRecorder._iotlb_miss,
    IotlbMessage: TraceRecorder._iotlb_message,
    FaultRecorded: TraceRecorder._fault,
    EndpointAttached: TraceRecorder._attached,
    EndpointDetached: TraceRecorder._attached,
    MappingRevoked: TraceRecorder._revoked,
    RevokedMemoryChecked: TraceRecorder._revoked_checked,
    DeviceNeedsReset: TraceRecorder._needs_reset,
}
