"""The backend's QMP schema for the vSMMU mode: stage 2 and the host-side event queue.

Documented in docs/QMP.md (``query-stage2``, ``stage2-map``, ``stage2-unmap``,
``stage2-protect``, ``query-vsmmu-events``, event ``VSMMU_EVENT``). Every change
is made while the guest runs: it bumps stage 2's generation, so the composed
translations and ring views cached before are dropped at the next access.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ..events import EventBus
from ..iommu.revocation import ArmedRevocation, Revocations
from ..iommu.smmu_events import SmmuEventQueue, SmmuEventRecorded
from ..iommu.stage2 import Stage2, Stage2Error
from ..vmsa import Perm
from .server import QmpError, QmpServer
from .viommu import _ACCESS, _choice, check_args

EVENT_VSMMU = "VSMMU_EVENT"


def _bools(args: dict[str, Any], names: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, bool]]:
    """Splits the boolean members off ``args``, checking their type as QEMU does."""
    flags = {}
    for name in names:
        if name in args:
            if not isinstance(args[name], bool):
                raise QmpError("GenericError",
                               f"Invalid parameter type for '{name}', expected: boolean")
            flags[name] = args[name]
    return {k: v for k, v in args.items() if k not in names}, flags


def _perm(flags: dict[str, bool], default: bool | None) -> Perm:
    perm = Perm.NONE
    for name, bit in (("read", Perm.R), ("write", Perm.W)):
        value = flags.get(name, default)
        if value is None:
            raise QmpError("GenericError", f"Parameter '{name}' is missing")
        if value:
            perm |= bit
    return perm


def event_data(entry: SmmuEventRecorded) -> dict[str, Any]:
    """The data of a VSMMU_EVENT (and of one entry of ``query-vsmmu-events``)."""
    ev = entry.event
    return {"seq": entry.seq, "type": ev.name, "event-id": ev.event_id,
            "stream-id": ev.stream_id, "s2": ev.s2, "class": ev.event_class.name.lower(),
            "rnw": ev.rnw, "ind": ev.ind, "pnu": ev.pnu, "input-address": ev.input_address,
            "ipa": ev.ipa, "level": entry.level, "record": ev.pack().hex()}


class VsmmuCommands:
    """Registers the stage-2 and event-queue commands, and VSMMU_EVENT on ``events``."""

    def __init__(self, server: QmpServer, stage2: Stage2, queue: SmmuEventQueue,
                 events: EventBus, revocations: Revocations | None = None,
                 endpoints: Collection[int] = ()) -> None:
        self.server = server
        self.stage2 = stage2
        self.queue = queue
        self.revocations = revocations
        self.endpoints = endpoints
        for name, handler, doc in (
            ("query-stage2", self.query_stage2, "Stage 2: configuration and mapped IPA ranges"),
            ("stage2-map", self.map, "Map an IPA range in stage 2"),
            ("stage2-unmap", self.unmap, "Unmap an IPA range from stage 2"),
            ("stage2-protect", self.protect, "Change the permissions of an IPA range"),
            ("query-vsmmu-events", self.query_events, "The host-side SMMUv3 event queue"),
        ):
            server.register(name, handler, doc=doc)
        events.listen(self.announce, SmmuEventRecorded)

    def announce(self, entry: SmmuEventRecorded) -> None:
        """Emits VSMMU_EVENT for a record."""
        self.server.emit(EVENT_VSMMU, event_data(entry))

    def query_stage2(self, args: dict[str, Any]) -> dict[str, Any]:
        """``query-stage2``: the configuration and the ranges overlapping [start, end]."""
        a = check_args(args, {}, {"start": int, "end": int})
        start, end = a.get("start", 0), a.get("end", (1 << 64) - 1)
        if start > end:
            raise QmpError("GenericError", "'start' is above 'end'")
        s2 = self.stage2
        return {"ias": s2.ias, "oas": s2.config.oas, "granule": s2.config.granule.size,
                "start-level": s2.config.start_level, "generation": s2.generation,
                "table-bytes": s2.tables_bytes,
                "ranges": [{"ipa-start": r.ipa, "ipa-end": r.end, "pa-start": r.pa,
                            "read": bool(r.perm & Perm.R), "write": bool(r.perm & Perm.W)}
                           for r in s2.ranges(start, end)]}

    def _change(self, change: Any, *params: Any) -> dict[str, Any]:
        try:
            change(*params)
        except Stage2Error as e:
            raise QmpError("GenericError", str(e)) from None
        return {"generation": self.stage2.generation}

    def map(self, args: dict[str, Any]) -> dict[str, Any]:
        """``stage2-map``: IPA [start, start+size) -> pa (default: start), read/write
        (default: both)."""
        rest, flags = _bools(args, ("read", "write"))
        a = check_args(rest, {"start": int, "size": int}, {"pa": int})
        return self._change(self.stage2.map, a["start"], a.get("pa", a["start"]), a["size"],
                            _perm(flags, True))

    def unmap(self, args: dict[str, Any]) -> dict[str, Any]:
        """``stage2-unmap``: IPA [start, start+size) becomes a stage-2 translation fault.

        With ``endpoint`` instead, the unmap is armed: the IPA page under that
        endpoint's next DMA of at least ``min-size`` bytes (of kind ``access``, if
        given) is unmapped just before the DMA is translated, which then faults.
        """
        a = check_args(args, {}, {"start": int, "size": int, "endpoint": int,
                                  "min-size": int, "access": str})
        if "endpoint" in a:
            if "start" in a or "size" in a:
                raise QmpError("GenericError", "give 'start' and 'size', or 'endpoint'")
            if self.revocations is None or a["endpoint"] not in self.endpoints:
                raise QmpError("GenericError",
                               f"Endpoint {a['endpoint']:#x} is no vSMMU endpoint")
            access = (_choice("access", a["access"], _ACCESS) if "access" in a else None)
            self.revocations.arm(ArmedRevocation(a["endpoint"], a.get("min-size", 512),
                                                 access))
            return {"armed": True, "generation": self.stage2.generation}
        for name in ("start", "size"):
            if name not in a:
                raise QmpError("GenericError", f"Parameter '{name}' is missing")
        if "min-size" in a or "access" in a:
            raise QmpError("GenericError", "'min-size' and 'access' only apply with 'endpoint'")
        return {"armed": False, **self._change(self.stage2.unmap, a["start"], a["size"])}

    def protect(self, args: dict[str, Any]) -> dict[str, Any]:
        """``stage2-protect``: sets read/write (both required) on what is mapped in
        [start, start+size)."""
        rest, flags = _bools(args, ("read", "write"))
        a = check_args(rest, {"start": int, "size": int})
        return self._change(self.stage2.protect, a["start"], a["size"], _perm(flags, None))

    def query_events(self, args: dict[str, Any]) -> dict[str, Any]:
        """``query-vsmmu-events``: the queued records, oldest first, and the counters."""
        check_args(args, {})
        q = self.queue
        return {"depth": q.depth, "total": q.total, "dropped": q.dropped,
                "events": [event_data(e) for e in q.records]}
