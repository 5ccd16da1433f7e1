"""What the guest kernel says about IOMMU faults, read from its console log."""

from __future__ import annotations

import re

# drivers/iommu/virtio-iommu.c: "<reason> fault from EP <id>[ at <addr> [RWX]]"
_VIOMMU_FAULT = re.compile(
    r"(?P<reason>\w+) fault from EP (?P<ep>\d+)"
    r"(?: at (?P<addr>0x[0-9a-fA-F]+) \[(?P<acc>[RWX]*)\])?")

_ACCESS = {"R": "read", "W": "write", "X": "exec"}


def guest_faults(lines: list[str]) -> list[dict[str, object]]:
    """The IOMMU faults the guest logged, in the report's ``faults`` shape."""
    faults = []
    for line in lines:
        m = _VIOMMU_FAULT.search(line)
        if not m:
            continue
        faults.append({
            "source": "guest",
            "endpoint": int(m["ep"]),
            "address": int(m["addr"], 16) if m["addr"] else None,
            "access": ",".join(_ACCESS[c] for c in (m["acc"] or "")) or None,
            "reason": m["reason"],
            "guest_log": line.strip(),
        })
    return faults
