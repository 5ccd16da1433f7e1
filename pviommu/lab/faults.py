"""Faults as a report shows them: what the guest logged joined with what the backend
said on QMP, one list per IOMMU mode.

Every entry is a dict with at least ``source`` ("guest" or "host"), ``endpoint``,
``address``, ``access``, ``reason``, ``guest_log`` and ``qmp_event`` (the data of
the backend's QMP event about the same fault, or None). The demo reports and
:meth:`pviommu.lab.Lab.faults` use these functions.
"""

from __future__ import annotations

from typing import Any

from ..machine.guestlog import (
    attach_io_errors,
    guest_faults,
    guest_io_errors,
    guest_smmu_faults,
)
from ..qmp.viommu import EVENT_FAULT
from ..qmp.vsmmu import EVENT_VSMMU


def _qmp(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e.get("data", {}) for e in events if e.get("event") == name]


def pv_faults(lines: list[str], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The faults the guest's virtio_iommu logged, each with the block-layer I/O errors
    that followed it and the ``IOMMU_FAULT`` of the same endpoint and address."""
    qmp_faults = _qmp(events, EVENT_FAULT)
    faults: list[dict[str, Any]] = guest_faults(lines)
    attach_io_errors(faults, lines)
    for f in faults:
        f["qmp_event"] = next((d for d in qmp_faults if d["endpoint"] == f["endpoint"]
                               and d["address"] == f["address"]), None)
    return faults


def vsmmu_faults(lines: list[str], events: list[dict[str, Any]],
                 injected: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The faults in vSMMU mode, each with its ``stage``.

    Stage 1: what the guest's arm-smmu-v3 logged, joined with ``injected`` (an
    ``inject-dma`` answer) and the ``IOMMU_FAULT`` of the same endpoint and
    address. Stage 2: each ``VSMMU_EVENT`` (the host's record), joined with the
    guest's block-layer I/O errors, in order (the last one takes any left over).
    """
    qmp_faults = _qmp(events, EVENT_FAULT)
    faults: list[dict[str, Any]] = []
    for f in guest_smmu_faults(lines):
        f["qmp_event"] = next((d for d in qmp_faults if d["endpoint"] == f["endpoint"]
                               and d["address"] == f["address"]), None)
        fault = (injected or {}).get("fault") or {}
        f["injected"] = injected if (fault.get("address"), fault.get("stage")) == (
            f["address"], 1) else None
        faults.append(f)
    records = _qmp(events, EVENT_VSMMU)
    errors = guest_io_errors(lines)
    for i, data in enumerate(records):
        mine = errors[i:i + 1] if i < len(records) - 1 else errors[i:]
        faults.append({
            "source": "host", "stage": 2, "endpoint": data["stream-id"],
            "address": data["input-address"], "ipa": data["ipa"],
            "access": "read" if data["rnw"] else "write", "reason": data["type"],
            "record": data["record"], "qmp_event": data, "io_errors": mine,
            "guest_log": "\n".join(mine)})
    return faults


def lab_faults(kind: str, lines: list[str], events: list[dict[str, Any]]
               ) -> list[dict[str, Any]]:
    """The faults of a lab whose IOMMU is ``kind``, from the guest's kernel log
    ``lines`` and the backend's QMP ``events``."""
    if kind == "pv":
        return pv_faults(lines, events)
    if kind == "vsmmu":
        return vsmmu_faults(lines, events)
    if kind == "builtin":
        faults: list[dict[str, Any]] = guest_faults(lines)
        attach_io_errors(faults, lines)
        for f in faults:
            f["qmp_event"] = None
        return faults
    return []
