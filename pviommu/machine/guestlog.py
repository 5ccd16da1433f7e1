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


# block/blk-mq.c blk_print_req_error: "<status> error, dev <disk>, sector <n> op 0x<op>:(<OP>) ..."
_IO_ERROR = re.compile(r"(?P<status>[\w /]+?) error, dev (?P<dev>\w+), sector (?P<sector>\d+) "
                       r"op 0x[0-9a-f]+:\((?P<op>\w+)\)")
# fs/buffer.c buffer_io_error
_BUFFER_ERROR = re.compile(r"Buffer I/O error on dev (?P<dev>\w+), logical block (?P<block>\d+)")


def _is_io_error(line: str) -> bool:
    return bool(_IO_ERROR.search(line) or _BUFFER_ERROR.search(line))


def guest_io_errors(lines: list[str]) -> list[str]:
    """The guest's block-layer I/O error lines, stripped."""
    return [line.strip() for line in lines if _is_io_error(line)]


def attach_io_errors(faults: list[dict[str, object]], lines: list[str]) -> None:
    """Appends to each fault's ``guest_log`` the I/O errors the guest logged after it
    (and before the next fault): what the driver made of the failed DMA.

    ``faults`` are :func:`guest_faults` of the same ``lines``, in order.
    """
    errors: list[list[str]] = []
    for line in lines:
        if _VIOMMU_FAULT.search(line):
            errors.append([])
        elif errors and _is_io_error(line):
            errors[-1].append(line.strip())
    for fault, found in zip(faults, errors, strict=True):
        fault["io_errors"] = found
        if found:
            fault["guest_log"] = "\n".join([str(fault["guest_log"]), *found])
