"""What the guest kernel says about IOMMU faults, read from its console log."""

from __future__ import annotations

import re

from ..iommu.smmu_events import EventId, SmmuEvent

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


# drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.c, an event the driver does not handle:
# "<driver> <dev>: event 0x<id> received:", then the record's four 64-bit words,
# one "\t0x%016llx" line each (all dev_info: shown only at console level 7).
_SMMU_EVENT = re.compile(r"(?P<dev>[\w-]+ [\w.]+): event 0x(?P<id>[0-9a-fA-F]+) received:")
_SMMU_WORD = re.compile(r"(?P<dev>[\w-]+ [\w.]+):\s+0x(?P<word>[0-9a-fA-F]{16})\s*$")
_SMMU_WORDS = 4


def guest_smmu_faults(lines: list[str]) -> list[dict[str, object]]:
    """The SMMUv3 events the guest's arm-smmu-v3 logged, in the report's ``faults``
    shape with ``stage`` 1 (the guest's stage 1 refused the access).

    The record words that follow each event line decode into the StreamID
    (``endpoint``), input address, access and event name; ``record`` is the 32-byte
    record in hex. An event whose four words were not all logged keeps None there.
    """
    faults: list[dict[str, object]] = []
    pending: list[tuple[dict[str, object], str, list[int], list[str]]] = []
    for line in lines:
        if m := _SMMU_EVENT.search(line):
            fault: dict[str, object] = {
                "source": "guest", "stage": 1, "endpoint": None, "address": None,
                "access": None, "reason": _event_name(int(m["id"], 16)), "record": None}
            faults.append(fault)
            pending.append((fault, m["dev"], [], [line.strip()]))
            continue
        w = _SMMU_WORD.search(line)
        for _fault, dev, words, logged in pending:
            if w and w["dev"] == dev and len(words) < _SMMU_WORDS:
                words.append(int(w["word"], 16))
                logged.append(line.strip())
                break
    for fault, _dev, words, logged in pending:
        fault["guest_log"] = "\n".join(logged)
        if len(words) == _SMMU_WORDS:
            _decode(fault, words)
    return faults


def _event_name(event_id: int) -> str:
    try:
        return EventId(event_id).name
    except ValueError:
        return f"{event_id:#x}"


def _decode(fault: dict[str, object], words: list[int]) -> None:
    record = b"".join(w.to_bytes(8, "little") for w in words)
    try:
        event = SmmuEvent.unpack(record)
    except ValueError:  # a CLASS the architecture leaves reserved
        return
    fault.update(endpoint=event.stream_id, address=event.input_address,
                 access="read" if event.rnw else "write", reason=event.name,
                 record=record.hex())
