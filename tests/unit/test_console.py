"""Markers and guest fault lines."""

from pviommu.machine.console import parse_marker
from pviommu.machine.guestlog import attach_io_errors, guest_faults, guest_io_errors


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


def test_io_errors_follow_the_fault_they_come_from():
    lines = [
        "[    2.39] virtio_iommu virtio0: page fault from EP 16 at 0xfff37000 [W]",
        "[    2.40] I/O error, dev vda, sector 0 op 0x0:(READ) flags 0x800 phys_seg 16 prio "
        "class 2",
        "[    2.41] Buffer I/O error on dev vda, logical block 0, async page read",
        "[    3.00] virtio_iommu virtio0: page fault from EP 24 at 0x1000 [R]",
        "unrelated",
    ]
    assert guest_io_errors(lines) == [lines[1].strip(), lines[2].strip()]
    faults = guest_faults(lines)
    attach_io_errors(faults, lines)
    assert faults[0]["io_errors"] == [lines[1].strip(), lines[2].strip()]
    assert faults[0]["guest_log"] == "\n".join(line.strip() for line in lines[:3])
    assert faults[1]["io_errors"] == [] and faults[1]["guest_log"] == lines[3].strip()
