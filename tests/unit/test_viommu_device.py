"""The virtio-iommu device model end to end: wire format through a real SplitQueue."""

from __future__ import annotations

import os
import struct

import pytest

from pviommu.devices.viommu import (
    F_BYPASS,
    F_BYPASS_CONFIG,
    F_DOMAIN_RANGE,
    F_INPUT_RANGE,
    F_MAP_UNMAP,
    F_MMIO,
    F_PROBE,
    Fault,
    VirtioIommu,
)
from pviommu.dma import Access, DmaFault, PhysicalDma
from pviommu.events import FaultRecorded
from pviommu.iommu.dma_space import DomainDma
from pviommu.iommu.faults import FaultReason
from pviommu.iommu.mappings import MAP_F_READ, MAP_F_WRITE
from pviommu.iommu.pv import IommuConfig, PvIommu, ResvRegion
from pviommu.virtio.features import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_NEEDS_RESET,
)
from pviommu.virtio.queue import DESC_F_NEXT, DESC_F_WRITE
from tests.fakes.virtio_driver import FakeDriver, RecordingTransport, memfd_memory

GPA = 0x40000000
MEM_SIZE = 1 << 20
EP, EP2 = 0x10, 0x18
RW = MAP_F_READ | MAP_F_WRITE
OK, IOERR, UNSUPP, DEVERR, INVAL, RANGE, NOENT, NOMEM = 0, 1, 2, 3, 4, 5, 6, 8
ALL_BASE = ((1 << 32) | (1 << 28) | (1 << 29) | 1 | 2 | 4 | 16)  # + BYPASS_CONFIG (64)


def attach(domain: int, endpoint: int, flags: int = 0, reserved: bytes = bytes(4),
           head_reserved: bytes = bytes(3)) -> bytes:
    return struct.pack("<B3sIII4s", 1, head_reserved, domain, endpoint, flags, reserved)


def detach(domain: int, endpoint: int, reserved: bytes = bytes(8)) -> bytes:
    return struct.pack("<B3xII8s", 2, domain, endpoint, reserved)


def map_(domain: int, vstart: int, vend: int, pstart: int, flags: int = RW) -> bytes:
    return struct.pack("<B3xIQQQI", 3, domain, vstart, vend, pstart, flags)


def unmap(domain: int, vstart: int, vend: int, reserved: bytes = bytes(4)) -> bytes:
    return struct.pack("<B3xIQQ4s", 4, domain, vstart, vend, reserved)


def probe(endpoint: int, reserved: bytes = bytes(64)) -> bytes:
    return struct.pack("<B3xI64s", 5, endpoint, reserved)


def tail(status: int) -> bytes:
    return bytes([status, 0, 0, 0])




class Rig:
    """A VirtioIommu with its request and event queues driven by FakeDrivers."""

    def __init__(self, memory, config: IommuConfig | None = None, features: int | None = None,
                 endpoints=(EP, EP2)) -> None:
        self.memory = memory
        self.iommu = PvIommu(config or IommuConfig(), endpoints)
        self.dev = VirtioIommu(self.iommu)
        self.transport = RecordingTransport()
        self.dev.transport = self.transport
        self.dev.set_driver_features(self.dev.offered_features() if features is None
                                     else features)
        dma = PhysicalDma(memory)
        self.req = FakeDriver(memory, GPA, 16, span=0x40000)
        self.evt = FakeDriver(memory, GPA + 0x40000, 8, span=0x10000)
        self.dev.start_queue(0, self.req.queue(dma, indirect=True))
        self.dev.start_queue(1, self.evt.queue(dma))

    def send(self, readable: bytes | list[bytes], writable: int | list[int] = 4,
             indirect: bool = False) -> tuple[int, bytes]:
        """Posts one request, kicks, returns (used length, writable part after the call).

        The writable part is filled with 0xff first, so untouched bytes show.
        """
        parts = [readable] if isinstance(readable, bytes) else readable
        sizes = [writable] if isinstance(writable, int) else writable
        head = self.req.add(parts, sizes, indirect=indirect)
        self.req.fill_writable(head)
        self.req.publish()
        self.dev.kick(0)
        used = self.req.used()
        assert [h for h, _ in used] == [head]
        return used[0][1], self.req.read_writable(head)

    def status(self, request: bytes) -> int:
        """Sends a request with a 4-byte tail; checks the used length; returns the status."""
        n, out = self.send(request)
        assert n == 4
        assert out[1:] == b"\0\0\0"  # tail.reserved written as zeroes
        return out[0]

    def post_event_buffer(self, size: int = 24) -> int:
        head = self.evt.add([], [size])
        self.evt.fill_writable(head)
        self.evt.publish()
        return head


@pytest.fixture
def memory():
    mem, fd = memfd_memory(MEM_SIZE, GPA)
    yield mem
    mem.clear()
    os.close(fd)


@pytest.fixture
def rig(memory):
    return Rig(memory)


# -- features and config -------------------------------------------------------------------


def test_features_offered():
    dev = VirtioIommu(PvIommu(IommuConfig()))
    assert dev.offered_features() == ALL_BASE | (1 << F_BYPASS_CONFIG)
    assert not dev.has_feature_offered(F_BYPASS)  # superseded by BYPASS_CONFIG
    assert not dev.has_feature_offered(F_MMIO)
    dev = VirtioIommu(PvIommu(IommuConfig(mmio=True, bypass_config=False)))
    assert dev.offered_features() == ALL_BASE | (1 << F_MMIO)
    for f in (F_VERSION_1, F_INDIRECT_DESC, F_EVENT_IDX, F_INPUT_RANGE, F_DOMAIN_RANGE,
              F_MAP_UNMAP, F_PROBE):
        assert dev.has_feature_offered(f)
    assert dev.device_id == 23 and dev.num_queues == 2


def test_negotiation_sets_the_request_semantics():
    iommu = PvIommu(IommuConfig(mmio=True))
    dev = VirtioIommu(iommu)
    dev.set_driver_features((1 << F_VERSION_1) | (1 << F_MMIO))
    n = iommu.negotiated
    assert (n.map_unmap, n.bypass_config, n.mmio, n.domain_range, n.input_range) == (
        False, False, True, False, False)
    dev.set_driver_features(dev.offered_features())
    n = iommu.negotiated
    assert (n.map_unmap, n.bypass_config, n.mmio, n.domain_range, n.input_range) == (
        True, True, True, True, True)
    with pytest.raises(ValueError):
        dev.set_driver_features(1 << F_BYPASS)


def test_config_bytes_layout():
    cfg = IommuConfig(page_size_mask=0xFFFF_FFFF_FFFF_F000, input_start=0x1000,
                      input_end=0x0000_FFFF_FFFF_FFFF, domain_start=3, domain_end=0x1234,
                      probe_size=256, bypass=True)
    dev = VirtioIommu(PvIommu(cfg))
    raw = dev.config_bytes()
    assert len(raw) == 40
    assert raw[0:8] == bytes.fromhex("00f0ffffffffffff")
    assert raw[8:16] == (0x1000).to_bytes(8, "little")
    assert raw[16:24] == bytes.fromhex("ffffffffffff0000")
    assert raw[24:28] == bytes.fromhex("03000000")
    assert raw[28:32] == bytes.fromhex("34120000")
    assert raw[32:36] == bytes.fromhex("00010000")
    assert raw[36] == 1
    assert raw[37:40] == b"\0\0\0"
    assert dev.read_config(36, 1) == b"\x01"
    assert dev.read_config(32, 4) == (256).to_bytes(4, "little")
    for offset, size in [(40, 1), (36, 5), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError):
            dev.read_config(offset, size)
    assert VirtioIommu(PvIommu(IommuConfig())).config_bytes()[36] == 0


def test_write_config_bypass_needs_bypass_config_negotiated(memory):
    rig = Rig(memory, features=ALL_BASE)  # BYPASS_CONFIG offered, not accepted
    with pytest.raises(ValueError, match="BYPASS_CONFIG"):
        rig.dev.write_config(36, b"\x01")
    assert rig.dev.config_bytes()[36] == 0 and rig.iommu.bypass is False


def test_write_config_bypass(rig):
    rig.dev.write_config(36, b"\x01")
    assert rig.iommu.bypass is True
    assert rig.dev.read_config(36, 1) == b"\x01"
    assert rig.iommu.translate(EP, 0x1234, 4, Access.READ) == [(0x1234, 4)]
    rig.dev.write_config(36, b"\x00")
    assert rig.iommu.bypass is False
    with pytest.raises(DmaFault):
        rig.iommu.translate(EP, 0x1234, 4, Access.READ)


@pytest.mark.parametrize("value", [2, 3, 0x80, 0xFF])
def test_write_config_bypass_other_values_are_refused(rig, value):
    with pytest.raises(ValueError):
        rig.dev.write_config(36, bytes([value]))
    assert rig.dev.config_bytes()[36] == 0  # never presented


def test_write_config_whole_space_with_only_bypass_changed(rig):
    new = bytearray(rig.dev.config_bytes())
    new[36] = 1
    rig.dev.write_config(0, bytes(new))
    assert rig.iommu.bypass is True
    rig.dev.write_config(32, bytes(new[32:40]))  # an unchanged write is harmless
    assert rig.iommu.bypass is True


@pytest.mark.parametrize("index", [i for i in range(40) if i != 36])
def test_write_config_any_other_byte_is_refused(rig, index):
    before = rig.dev.config_bytes()
    new = bytearray(before)
    new[index] ^= 0x01
    new[36] = 1
    with pytest.raises(ValueError):
        rig.dev.write_config(0, bytes(new))
    assert rig.dev.config_bytes() == before  # bypass did not change either


def test_write_config_outside_the_space(rig):
    for offset, data in [(40, b"\0"), (36, bytes(5)), (-1, b"\0\0")]:
        with pytest.raises(ValueError):
            rig.dev.write_config(offset, data)


# -- requests ------------------------------------------------------------------------------


def test_attach_detach_map_unmap_on_the_wire(rig, memory):
    assert rig.status(attach(1, EP)) == OK
    assert rig.iommu.attached[EP] == 1
    assert rig.status(map_(1, 0x1000, 0x1FFF, GPA + 0x80000, MAP_F_READ)) == OK
    m = rig.iommu.domains[1].mappings.find(0x1000)
    assert (m.virt_start, m.virt_end, m.phys_start, m.flags) == (
        0x1000, 0x1FFF, GPA + 0x80000, MAP_F_READ)
    memory.write(GPA + 0x80010, b"mapped")
    dma = DomainDma(rig.iommu, EP, memory)
    assert dma.read(0x1010, 6) == b"mapped"
    assert rig.status(unmap(1, 0x1000, 0x1FFF)) == OK
    assert len(rig.iommu.domains[1].mappings) == 0
    assert rig.status(detach(1, EP)) == OK
    assert rig.iommu.domains == {}
    assert rig.transport.notified == [0] * 4
    assert rig.transport.errors == []


def test_error_statuses_on_the_wire(rig):
    assert rig.status(attach(1, 0x99)) == NOENT
    assert rig.status(attach(1, EP, reserved=b"\0\0\0\1")) == INVAL
    assert rig.status(attach(1, EP, flags=2)) == INVAL
    assert rig.status(detach(1, EP)) == INVAL
    assert rig.status(map_(1, 0x1000, 0x1FFF, 0)) == NOENT
    assert rig.status(attach(1, EP)) == OK
    assert rig.status(map_(1, 0x1001, 0x1FFF, 0)) == RANGE
    assert rig.status(map_(1, 0x0809_0000, 0x0809_0FFF, 0)) == INVAL  # the MSI doorbell
    assert rig.status(map_(1, 0x1000, 0x1FFF, 0)) == OK
    assert rig.status(map_(1, 0x1000, 0x1FFF, 0)) == INVAL  # overlap
    assert rig.status(unmap(1, 0x1000, 0x17FF)) == RANGE
    assert rig.status(unmap(2, 0x1000, 0x1FFF)) == NOENT


def test_reserved_fields_that_the_device_ignores(rig):
    assert rig.status(attach(1, EP, head_reserved=b"\xff\xff\xff")) == OK  # head.reserved
    assert rig.status(map_(1, 0x1000, 0x1FFF, 0)) == OK
    assert rig.status(unmap(1, 0x1000, 0x1FFF, reserved=b"\xff" * 4)) == OK
    assert len(rig.iommu.domains[1].mappings) == 0
    assert rig.status(detach(1, EP, reserved=b"\xff" * 8)) == OK
    n, out = rig.send(probe(EP, reserved=b"\xff" * 64), 516)
    assert (n, out[512]) == (516, OK)


def test_map_unmap_not_negotiated_is_unsupp(memory):
    rig = Rig(memory, features=ALL_BASE & ~(1 << F_MAP_UNMAP))
    assert rig.status(attach(1, EP)) == OK
    assert rig.status(map_(1, 0x1000, 0x1FFF, 0)) == UNSUPP
    assert rig.status(unmap(1, 0x1000, 0x1FFF)) == UNSUPP


def test_request_split_over_descriptors_and_indirect(rig):
    body = attach(1, EP)
    n, out = rig.send([body[:1], body[1:7], body[7:]], [1, 3])
    assert (n, out) == (4, tail(OK))
    n, out = rig.send(map_(1, 0x1000, 0x1FFF, 0), 4, indirect=True)
    assert (n, out) == (4, tail(OK))
    assert len(rig.iommu.domains[1].mappings) == 1


def test_longer_readable_part_is_fine(rig):
    assert rig.status(attach(1, EP) + b"\xaa" * 12) == OK


def test_writable_part_larger_than_expected_is_inval_tail_at_the_end(rig):
    n, out = rig.send(attach(1, EP), 8)
    assert n == 8
    assert out == bytes(4) + tail(INVAL)
    assert rig.iommu.domains == {}  # not executed


def test_readable_part_too_short_is_inval(rig):
    for req in (attach(1, EP)[:16], detach(1, EP)[:19], map_(1, 0, 0xFFF, 0)[:35],
                unmap(1, 0, 0xFFF)[:27], probe(EP)[:71]):
        writable = 516 if req[0] == 5 else 4
        n, out = rig.send(req, writable)
        assert n == writable
        assert out[-4:] == tail(INVAL)
        assert out[:-4] == bytes(writable - 4)
    assert rig.iommu.domains == {} and rig.iommu.attached == {}
    assert rig.dev.requests[("ATTACH", "INVAL")] == 1
    assert rig.dev.requests[("PROBE", "INVAL")] == 1


@pytest.mark.parametrize(("readable", "writable"), [
    (attach(1, EP), 3),          # no room for a tail
    (attach(1, EP), 0),          # no writable part at all
    (attach(1, EP), [1, 2]),     # 3 bytes over two descriptors
    (b"\x01\0\0", 4),            # readable part shorter than the head
    (bytes(20), 4),              # type 0
    (b"\x06" + bytes(19), 4),    # type 6
    (b"\xff" + bytes(19), 4),    # type 255
])
def test_unparseable_requests_are_returned_unwritten(rig, readable, writable):
    n, out = rig.send(readable, writable)
    assert n == 0
    assert out == b"\xff" * len(out)
    assert rig.iommu.domains == {}
    assert rig.transport.errors == [] and not rig.dev.needs_reset


def test_unparseable_requests_are_counted(rig):
    rig.send(bytes(20), 4)
    rig.send(b"\x09" + bytes(19), 4)
    rig.send(attach(1, EP), 2)
    assert rig.dev.requests == {("TYPE_0", "NONE"): 1, ("TYPE_9", "NONE"): 1,
                                ("MALFORMED", "NONE"): 1}


# -- PROBE ---------------------------------------------------------------------------------


def _resv_mem(subtype: int, start: int, end: int) -> bytes:
    return (b"\x01\x00" + b"\x14\x00" + bytes([subtype]) + b"\0\0\0"
            + start.to_bytes(8, "little") + end.to_bytes(8, "little"))


def test_probe_reports_the_msi_region(rig):
    n, out = rig.send(probe(EP), 512 + 4)
    assert n == 516
    assert out[:24] == _resv_mem(1, 0x08090000, 0x0809FFFF)
    assert out[:8] == bytes.fromhex("0100140001000000")
    assert out[24:512] == bytes(488)  # zero-filled: a NONE header ends the list
    assert out[512:] == tail(OK)


def test_probe_with_user_regions_and_split_buffers(memory):
    rig = Rig(memory, IommuConfig(probe_size=64, reserved=[ResvRegion(0x1000_0000, 0x1000_FFFF)]))
    n, out = rig.send(probe(EP2), [30, 38])
    assert n == 68
    assert out[:24] == _resv_mem(1, 0x08090000, 0x0809FFFF)
    assert out[24:48] == _resv_mem(0, 0x1000_0000, 0x1000_FFFF)
    assert out[48:64] == bytes(16)
    assert out[64:] == tail(OK)


def test_probe_unknown_endpoint(rig):
    n, out = rig.send(probe(0x99), 516)
    assert n == 516
    assert out == bytes(512) + tail(NOENT)


@pytest.mark.parametrize("writable", [4, 100, 515])
def test_probe_buffer_smaller_than_probe_size_is_inval(rig, writable):
    n, out = rig.send(probe(EP), writable)
    assert n == writable
    assert out == bytes(writable - 4) + tail(INVAL)


def test_probe_buffer_larger_than_probe_size_is_inval(rig):
    n, out = rig.send(probe(EP), 520)
    assert (n, out) == (520, bytes(516) + tail(INVAL))


def test_probe_without_f_probe_negotiated_is_not_answered(memory):
    rig = Rig(memory, features=ALL_BASE & ~(1 << F_PROBE))
    n, out = rig.send(probe(EP), 516)
    assert n == 0 and out == b"\xff" * 516
    assert rig.dev.requests == {("PROBE", "NONE"): 1}


# -- counters, ring errors, reset -----------------------------------------------------------


def test_requests_counter(rig):
    rig.status(attach(1, EP))
    rig.status(attach(1, EP2))
    rig.status(attach(1, 0x99))
    rig.status(map_(1, 0x1000, 0x1FFF, 0))
    rig.status(map_(1, 0x1000, 0x1FFF, 0))
    rig.send(probe(EP), 516)
    assert rig.dev.requests == {("ATTACH", "OK"): 2, ("ATTACH", "NOENT"): 1, ("MAP", "OK"): 1,
                                ("MAP", "INVAL"): 1, ("PROBE", "OK"): 1}


def test_several_requests_in_one_kick_one_interrupt(rig):
    heads = [rig.req.add([r], [4]) for r in (attach(1, EP), map_(1, 0, 0xFFF, GPA),
                                             map_(1, 0, 0xFFF, GPA))]
    rig.req.publish()
    rig.dev.kick(0)
    assert rig.req.used() == [(h, 4) for h in heads]
    assert [rig.req.read_writable(h)[0] for h in heads] == [OK, OK, INVAL]
    assert rig.transport.notified == [0]


def test_a_broken_request_ring_needs_reset(rig):
    rig.req.add_raw_descriptors([(GPA, 4, DESC_F_NEXT, 0)])  # a loop
    rig.req.make_available(0)
    rig.req.publish()
    rig.dev.kick(0)
    assert rig.dev.status & STATUS_NEEDS_RESET
    assert rig.transport.errors and rig.transport.errors[0][0] == 0
    assert rig.req.used() == []
    # broken: faults are no longer delivered either
    rig.post_event_buffer()
    assert rig.dev.report_fault(Fault(EP, 0x1000, Access.READ, FaultReason.DOMAIN)) is False
    assert rig.dev.faults_dropped == 1 and rig.evt.used() == []


def test_an_unreadable_request_is_ioerr(rig):
    tail_at = GPA + 0x30000
    rig.req.add_raw_descriptors([(GPA + MEM_SIZE, 20, DESC_F_NEXT, 1),
                                 (tail_at, 4, DESC_F_WRITE, 0)])
    rig.req.make_available(0)
    rig.req.publish()
    rig.dev.kick(0)
    assert not rig.dev.needs_reset
    assert rig.req.used() == [(0, 4)]
    assert rig.memory.read(tail_at, 4) == bytes([IOERR, 0, 0, 0])
    assert rig.dev.requests[("UNREADABLE", "IOERR")] == 1


def test_an_unreadable_request_body_is_ioerr(rig):
    head = rig.req.buffer(bytes([3]))  # MAP, then a body outside guest memory
    tail_at = GPA + 0x30000
    rig.req.add_raw_descriptors([(head, 1, DESC_F_NEXT, 1),
                                 (GPA + MEM_SIZE - 8, 40, DESC_F_NEXT, 2),
                                 (tail_at, 4, DESC_F_WRITE, 0)])
    rig.req.make_available(0)
    rig.req.publish()
    rig.dev.kick(0)
    assert rig.memory.read(tail_at, 1) == bytes([IOERR])
    assert rig.dev.requests[("MAP", "IOERR")] == 1


def test_probe_properties_that_cannot_be_written_are_ioerr(rig):
    body = rig.req.buffer(probe(EP))
    tail_at = GPA + 0x30000
    # 512 bytes of properties straddling the end of guest memory, then the tail.
    rig.req.add_raw_descriptors([(body, 68, DESC_F_NEXT, 1),
                                 (GPA + MEM_SIZE - 256, 512, DESC_F_WRITE | DESC_F_NEXT, 2),
                                 (tail_at, 4, DESC_F_WRITE, 0)])
    rig.req.make_available(0)
    rig.req.publish()
    rig.dev.kick(0)
    assert not rig.dev.needs_reset
    assert rig.memory.read(tail_at, 1) == bytes([IOERR])
    assert rig.dev.requests[("PROBE", "IOERR")] == 1


def test_a_tail_outside_memory_needs_reset(rig):
    rig.req.add_raw_descriptors([(rig.req.buffer(attach(1, EP)), 20, DESC_F_NEXT, 1),
                                 (GPA + MEM_SIZE, 4, DESC_F_WRITE, 0)])
    rig.req.make_available(0)
    rig.req.publish()
    rig.dev.kick(0)
    assert rig.dev.needs_reset
    assert "outside guest memory" in rig.dev.broken_reason


def test_an_internal_error_is_deverr_and_the_device_goes_on(rig, monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(rig.iommu, "map", broken)
    rig.status(attach(1, EP))
    assert rig.status(map_(1, 0x1000, 0x1FFF, 0x4000_0000)) == DEVERR
    monkeypatch.undo()
    assert rig.status(map_(1, 0x1000, 0x1FFF, 0x4000_0000)) == OK
    assert not rig.dev.needs_reset


def test_nomem_on_the_wire(memory):
    rig = Rig(memory, IommuConfig(max_mappings=1))
    rig.status(attach(1, EP))
    assert rig.status(map_(1, 0x1000, 0x1FFF, 0x4000_0000)) == OK
    assert rig.status(map_(1, 0x2000, 0x2FFF, 0x4000_1000)) == NOMEM


def test_device_reset(rig):
    rig.status(attach(1, EP))
    rig.dev.write_config(36, b"\x01")
    rig.dev.reset()
    assert rig.iommu.domains == {} and rig.dev.queues == {}
    assert rig.dev.driver_features == 0
    assert rig.iommu.bypass is True  # a device reset keeps bypass
    assert rig.iommu.negotiated.bypass_config is True
    rig.dev.reset(system=True)
    assert rig.iommu.bypass is False


def test_reset_without_bypass_config_offered_forgets_the_bypass_flag(memory):
    rig = Rig(memory, IommuConfig(bypass_config=False))
    rig.dev.reset()
    assert rig.iommu.negotiated.bypass_config is False
    assert rig.iommu.attach(1, EP, 1).name == "INVAL"


# -- faults ----------------------------------------------------------------------------------


def test_report_fault_writes_the_record_and_interrupts(rig):
    head = rig.post_event_buffer(24)
    seen = []
    rig.dev.events.listen(lambda e: seen.append((e.fault, e.delivered)), FaultRecorded)
    fault = Fault(EP, 0x0123_4567_89AB_CDEF, Access.WRITE, FaultReason.MAPPING)
    assert rig.dev.report_fault(fault) is True
    assert rig.evt.used() == [(head, 24)]
    assert rig.evt.read_writable(head) == (
        b"\x02\0\0\0"                  # reason MAPPING, reserved
        + b"\x02\x01\0\0"              # flags WRITE | ADDRESS
        + b"\x10\0\0\0"                # endpoint
        + b"\0\0\0\0"                  # reserved1
        + bytes.fromhex("efcdab8967452301"))
    assert rig.transport.notified == [1]
    assert (rig.dev.faults_reported, rig.dev.faults_dropped) == (1, 0)
    assert seen == [(fault, True)]


def test_report_fault_into_a_larger_buffer_writes_24_bytes(rig):
    head = rig.post_event_buffer(64)
    assert rig.dev.report_fault(Fault(EP2, 0x1000, Access.READ, FaultReason.DOMAIN))
    assert rig.evt.used() == [(head, 24)]
    out = rig.evt.read_writable(head)
    assert out[:24] == (b"\x01\0\0\0" + b"\x01\x01\0\0" + b"\x18\0\0\0" + bytes(4)
                        + (0x1000).to_bytes(8, "little"))
    assert out[24:] == b"\xff" * 40


def test_fault_from_a_failed_translation(rig, memory):
    head = rig.post_event_buffer()
    dma = DomainDma(rig.iommu, EP, memory, rig.dev.report_fault)
    with pytest.raises(DmaFault):
        dma.write(0x5000, b"x")
    assert rig.evt.used() == [(head, 24)]
    rec = rig.evt.read_writable(head)
    assert rec[0] == 1  # DOMAIN: EP is not attached
    assert struct.unpack_from("<IIIQ", rec, 4) == (0x102, EP, 0, 0x5000)


def test_fault_without_an_event_buffer_is_dropped(rig):
    fault = Fault(EP, 0x1000, Access.READ, FaultReason.DOMAIN)
    assert rig.dev.report_fault(fault) is False
    assert rig.dev.report_fault(fault) is False
    assert (rig.dev.faults_reported, rig.dev.faults_dropped) == (0, 2)
    assert rig.transport.notified == []
    # a buffer posted later gets the next fault only
    head = rig.post_event_buffer()
    assert rig.dev.report_fault(fault) is True
    assert rig.evt.used() == [(head, 24)]
    assert (rig.dev.faults_reported, rig.dev.faults_dropped) == (1, 2)


def test_fault_into_a_too_small_buffer_is_dropped(rig):
    seen = []
    rig.dev.events.listen(lambda e: seen.append(e.delivered), FaultRecorded)
    head = rig.post_event_buffer(16)
    assert rig.dev.report_fault(Fault(EP, 0x1000, Access.READ, FaultReason.DOMAIN)) is False
    assert rig.evt.used() == [(head, 0)]  # returned unwritten
    assert rig.evt.read_writable(head) == b"\xff" * 16
    assert rig.dev.faults_dropped == 1 and rig.dev.faults_reported == 0
    assert seen == [False]
    assert not rig.dev.needs_reset


def test_fault_without_an_event_queue_is_dropped(memory):
    rig = Rig(memory)
    rig.dev.stop_queue(1)
    assert rig.dev.report_fault(Fault(EP, 0, Access.READ, FaultReason.UNKNOWN)) is False
    assert rig.dev.faults_dropped == 1


def test_kicking_the_event_queue_consumes_nothing(rig):
    rig.post_event_buffer()
    rig.dev.kick(1)
    assert rig.evt.used() == []
    assert rig.dev.report_fault(Fault(EP, 0, Access.READ, FaultReason.UNKNOWN)) is True
