"""Markers and guest fault lines."""

from pviommu.machine.console import parse_marker
from pviommu.machine.guestlog import guest_faults


def test_marker_with_fields():
    assert parse_marker("@@PVIOMMU READ bytes=8 sha256=ab") == ("READ", {"bytes": "8",
                                                                          "sha256": "ab"})
    assert parse_marker("noise @@PVIOMMU DONE rc=0") == ("DONE", {"rc": "0"})
    assert parse_marker("[ 1.0] virtio_blk virtio1: [vda]") is None


def test_virtio_iommu_fault_lines():
    lines = [
        "[   12.3] virtio_iommu virtio0: page fault from EP 16 at 0xdead000 [W]",
        "[   12.4] virtio_iommu virtio0: domain fault from EP 8",
        "unrelated",
    ]
    faults = guest_faults(lines)
    assert faults[0] == {"source": "guest", "endpoint": 16, "address": 0xDEAD000,
                         "access": "write", "reason": "page", "guest_log": lines[0].strip()}
    assert faults[1]["endpoint"] == 8 and faults[1]["address"] is None
    assert len(faults) == 2
