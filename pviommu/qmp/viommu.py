"""The backend's QMP schema for the PV-IOMMU: queries, fault injection, events.

Documented in docs/QMP.md; names follow QMP conventions (``query-*``,
kebab-case members, UPPER_SNAKE events).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..devices.viommu import VirtioIommu
from ..events import (
    DeviceNeedsReset,
    EndpointAttached,
    EndpointDetached,
    EventBus,
    EventListener,
    FaultRecorded,
    RevokedMemoryChecked,
)
from ..iommu.faults import Access, Fault, FaultReason
from ..iommu.mappings import MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE
from ..iommu.pv import PvIommu
from ..iommu.revocation import ArmedRevocation, Revocations
from .server import QmpError, QmpServer

EVENT_FAULT = "IOMMU_FAULT"
EVENT_ATTACHED = "IOMMU_ENDPOINT_ATTACHED"
EVENT_DETACHED = "IOMMU_ENDPOINT_DETACHED"
EVENT_REVOKED = "IOMMU_MAPPING_REVOKED"
EVENT_NEEDS_RESET = "DEVICE_NEEDS_RESET"

_ACCESS = {"read": Access.READ, "write": Access.WRITE, "exec": Access.EXEC}
_REASON = {"unknown": FaultReason.UNKNOWN, "domain": FaultReason.DOMAIN,
           "mapping": FaultReason.MAPPING}


def check_args(args: dict[str, Any], required: dict[str, type],
               optional: dict[str, type] | None = None) -> dict[str, Any]:
    """Checks QMP arguments like QEMU does: missing, unexpected, wrong type."""
    optional = optional or {}
    for name in args:
        if name not in required and name not in optional:
            raise QmpError("GenericError", f"Parameter '{name}' is unexpected")
    for name in required:
        if name not in args:
            raise QmpError("GenericError", f"Parameter '{name}' is missing")
    out = {}
    for name, kind in {**required, **optional}.items():
        if name not in args:
            continue
        value = args[name]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise QmpError("GenericError",
                           f"Invalid parameter type for '{name}', expected: integer")
        if kind is str and not isinstance(value, str):
            raise QmpError("GenericError",
                           f"Invalid parameter type for '{name}', expected: string")
        if kind is int and not 0 <= value < 1 << 64:
            raise QmpError("GenericError", f"Parameter '{name}' is out of range")
        out[name] = value
    return out


def _choice(name: str, value: str, choices: dict[str, Any]) -> Any:
    if value not in choices:
        raise QmpError("GenericError",
                       f"Parameter '{name}' does not accept value '{value}' "
                       f"(one of: {', '.join(choices)})")
    return choices[value]


def fault_event(fault: Fault, delivered: bool) -> dict[str, Any]:
    """The data of an IOMMU_FAULT event."""
    access = [name for name, flag in _ACCESS.items() if fault.access & flag]
    return {"endpoint": fault.endpoint, "address": fault.address,
            "access": access[0] if len(access) == 1 else access,
            "reason": fault.reason.name.lower(), "delivered": delivered}


class QmpEvents:
    """The QMP listener of an event bus: each typed event becomes the QMP event
    docs/QMP.md names, with the same data."""

    def __init__(self, server: QmpServer) -> None:
        self.server = server
        self._encoders: dict[type, Callable[[Any], tuple[str, dict[str, Any]]]] = {
            EndpointAttached: lambda e: (EVENT_ATTACHED,
                                         {"domain": e.domain, "endpoint": e.endpoint}),
            EndpointDetached: lambda e: (EVENT_DETACHED,
                                         {"domain": e.domain, "endpoint": e.endpoint}),
            FaultRecorded: lambda e: (EVENT_FAULT, fault_event(e.fault, e.delivered)),
            DeviceNeedsReset: lambda e: (EVENT_NEEDS_RESET, needs_reset_event(e)),
            RevokedMemoryChecked: lambda e: (EVENT_REVOKED, revoked_event(e)),
        }

    def listener(self) -> EventListener:
        """A listener for the events this class encodes."""
        return EventListener(self.send, *self._encoders)

    def send(self, event: object) -> None:
        """Emits ``event`` to every QMP client."""
        name, data = self._encoders[type(event)](event)
        self.server.emit(name, data)


def needs_reset_event(event: DeviceNeedsReset) -> dict[str, Any]:
    """The data of a DEVICE_NEEDS_RESET event (no ``endpoint`` for the IOMMU itself)."""
    data: dict[str, Any] = {} if event.endpoint is None else {"endpoint": event.endpoint}
    return {**data, "kind": event.kind, "queue": event.queue, "reason": event.reason}


def revoked_event(event: RevokedMemoryChecked) -> dict[str, Any]:
    """The data of an IOMMU_MAPPING_REVOKED event."""
    r, before, after = event.revoked, event.sha256_before, event.sha256_after
    return {"endpoint": r.endpoint, "domain": r.domain, "virt-start": r.virt_start,
            "virt-end": r.virt_end, "phys-start": r.phys_start, "sha256-before": before,
            "sha256-after": after,
            "memory-unchanged": None if before is None or after is None else before == after}


class ViommuCommands:
    """Registers the PV-IOMMU commands on a QMP server, and its QMP listener on
    ``events`` (by default the IOMMU's bus). ``revoke-mapping`` goes through
    ``revocations`` (by default its own, over ``iommu``)."""

    def __init__(self, server: QmpServer, iommu: PvIommu, device: VirtioIommu,
                 extra_stats: Callable[[], dict[str, Any]] | None = None,
                 events: EventBus | None = None,
                 revocations: Revocations | None = None) -> None:
        self.server = server
        self.iommu = iommu
        self.device = device
        self.extra_stats = extra_stats
        for name, handler, doc in (
            ("query-viommu-domains", self.query_domains, "Domains with endpoints and sizes"),
            ("query-viommu-mappings", self.query_mappings, "Mappings of one domain"),
            ("query-viommu-endpoints", self.query_endpoints, "Endpoints and their domains"),
            ("query-viommu-stats", self.query_stats, "Request and fault counters"),
            ("query-viommu-config", self.query_config, "What the device presents"),
            ("inject-fault", self.inject_fault, "Report a fault to the guest"),
            ("revoke-mapping", self.revoke_mapping,
             "Take a live mapping away from an endpoint's domain"),
        ):
            server.register(name, handler, doc=doc)
        self.events = events if events is not None else iommu.events
        self.revocations = (revocations if revocations is not None
                            else Revocations(iommu, self.events))
        self.events.register(QmpEvents(server).listener())

    def query_domains(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """``query-viommu-domains``: every domain."""
        check_args(args, {})
        return [{"id": d.id, "bypass": d.bypass, "endpoints": sorted(d.endpoints),
                 "mappings": len(d.mappings)} for d in sorted(self.iommu.domains.values(),
                                                              key=lambda d: d.id)]

    def query_mappings(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """``query-viommu-mappings``: a domain's mappings overlapping [start, end]."""
        a = check_args(args, {"domain": int}, {"start": int, "end": int})
        dom = self.iommu.domains.get(a["domain"])
        if dom is None:
            raise QmpError("GenericError", f"Domain {a['domain']} does not exist")
        start, end = a.get("start", 0), a.get("end", (1 << 64) - 1)
        if start > end:
            raise QmpError("GenericError", "'start' is above 'end'")
        return [{"virt-start": m.virt_start, "virt-end": m.virt_end,
                 "phys-start": m.phys_start, "read": bool(m.flags & MAP_F_READ),
                 "write": bool(m.flags & MAP_F_WRITE), "mmio": bool(m.flags & MAP_F_MMIO)}
                for m in dom.mappings.overlapping(start, end)]

    def query_endpoints(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """``query-viommu-endpoints``: declared endpoints and any the guest attached."""
        check_args(args, {})
        ids = set(self.iommu.attached) | set(self.iommu.known or ())
        out = []
        for eid in sorted(ids):
            domain = self.iommu.attached.get(eid)
            entry: dict[str, Any] = {"id": eid, "attached": domain is not None}
            if domain is not None:
                entry["domain"] = domain
                entry["bypass"] = self.iommu.domains[domain].bypass
            out.append(entry)
        return out

    def query_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        """``query-viommu-stats``: requests by type and status, faults."""
        check_args(args, {})
        requests = [{"type": t.lower(), "status": s.lower(), "count": n}
                    for (t, s), n in sorted(self.device.requests.items())]
        out: dict[str, Any] = {
            "requests": requests,
            "faults-reported": self.device.faults_reported,
            "faults-dropped": self.device.faults_dropped,
            "needs-reset": self.device.needs_reset,
        }
        if self.extra_stats is not None:
            out.update(self.extra_stats())
        return out

    def query_config(self, args: dict[str, Any]) -> dict[str, Any]:
        """``query-viommu-config``: config space, features, reserved regions."""
        check_args(args, {})
        cfg = self.iommu.config
        return {
            "page-size-mask": cfg.page_size_mask,
            "input-range": {"start": cfg.input_start, "end": cfg.input_end},
            "domain-range": {"start": cfg.domain_start, "end": cfg.domain_end},
            "probe-size": cfg.probe_size,
            "bypass": self.iommu.bypass,
            "max-domains": cfg.max_domains,
            "max-mappings": cfg.max_mappings,
            "mappings": self.iommu.mapping_count,
            "offered-features": self.device.offered_features(),
            "driver-features": self.device.driver_features,
            "reserved-regions": [{"start": r.start, "end": r.end,
                                  "subtype": r.subtype.name.lower()}
                                 for r in cfg.resv_regions()],
        }

    def inject_fault(self, args: dict[str, Any]) -> dict[str, Any]:
        """``inject-fault``: report a fault through the same path as a failed translation."""
        a = check_args(args, {"endpoint": int, "address": int},
                  {"access": str, "reason": str})
        if a["endpoint"] > 0xFFFFFFFF:
            raise QmpError("GenericError", "Parameter 'endpoint' is out of range")
        access = _choice("access", a.get("access", "read"), _ACCESS)
        reason = _choice("reason", a.get("reason", "mapping"), _REASON)
        fault = Fault(a["endpoint"], a["address"], access, reason)
        return {"delivered": self.device.report_fault(fault)}

    def revoke_mapping(self, args: dict[str, Any]) -> dict[str, Any]:
        """``revoke-mapping``: remove a mapping of ``endpoint``'s domain behind the guest's back.

        With ``address``, the mapping holding it goes now. Without, the revocation
        is armed: the endpoint's next DMA of at least ``min-size`` bytes (of kind
        ``access``, if given) loses the mapping under it and faults.
        """
        a = check_args(args, {"endpoint": int}, {"address": int, "min-size": int, "access": str})
        endpoint = a["endpoint"]
        if not self.iommu.endpoint_exists(endpoint):
            raise QmpError("GenericError", f"Endpoint {endpoint:#x} does not exist")
        if "address" in a:
            if "min-size" in a or "access" in a:
                raise QmpError("GenericError",
                               "'min-size' and 'access' only apply without 'address'")
            m = self.revocations.revoke(endpoint, a["address"])
            if m is None:
                raise QmpError("GenericError", f"Endpoint {endpoint:#x} has no mapping at "
                               f"{a['address']:#x}")
            return {"armed": False, "virt-start": m.virt_start, "virt-end": m.virt_end,
                    "phys-start": m.phys_start}
        access = _choice("access", a["access"], _ACCESS) if "access" in a else None
        self.revocations.arm(ArmedRevocation(endpoint, a.get("min-size", 512), access))
        return {"armed": True}
