"""The virtio-pci modern transport as a PCI function, driven like Linux's virtio_pci.

Numbers in test names (T1..T33, G1..) are the numbers the device requirements (the
virtio spec's PCI transport and block device sections) had in the checklist these
tests were first written against; the rest of each name says what it checks.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest

from pviommu.dma import PhysicalDma
from pviommu.pci.function import IrqIndex, PciAccessError, RegionIndex
from pviommu.virtio.features import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    bit,
)
from pviommu.virtio.pci import VirtioPciFunction
from pviommu.virtio.pci_common import NO_VECTOR, Reg
from tests.fakes.virtio_driver import FakeDriver, memfd_memory
from tests.fakes.virtio_pci_driver import (
    ACCESS_PLATFORM,
    ISR,
    NOTIFY,
    EchoDevice,
    PciDriver,
    eventfd,
    fired,
)

GPA = 0x40000000
MEM_SIZE = 1 << 20
N = EchoDevice.num_queues + 1  # MSI-X vectors
READY = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
CFG = RegionIndex.CONFIG
BAR1, BAR4 = RegionIndex.BAR1, RegionIndex.BAR4
PCI_CFG_CAP = 0x90


class Rig:
    """A function over an echo device, its driver, and a ring in memfd memory."""

    def __init__(self, extra_features: int = 0, gpa: int = GPA) -> None:
        self.memory, self.memfd = memfd_memory(MEM_SIZE, gpa=gpa)
        self.device = EchoDevice(extra_features)
        self.fn = VirtioPciFunction(self.device, PhysicalDma(self.memory))
        self.drv = PciDriver(self.fn)
        self.ring = FakeDriver(self.memory, gpa, queue_size=8)

    def close(self) -> None:
        self.fn.disconnect()
        self.drv.close()
        self.memory.clear()
        os.close(self.memfd)

    def start(self, vector: int = 1) -> None:
        """Linux's whole probe: features, vectors, queue 0, DRIVER_OK."""
        assert self.drv.probe() & STATUS_FEATURES_OK
        self.drv.setup_queue(0, self.ring, vector)
        self.drv.enable_queue(0)
        assert self.drv.driver_ok() == READY | STATUS_DRIVER_OK

    def echo(self, payload: bytes = b"ping") -> tuple[int, int]:
        head = self.ring.add([payload], [len(payload)])
        self.ring.publish()
        self.drv.kick(0)
        return head, len(payload)

    def window(self, bar: int, offset: int, length: int) -> None:
        """Points the PCI_CFG window at ``bar``+``offset`` for ``length`` bytes."""
        self.drv.cfg_write(PCI_CFG_CAP + 4, 1, bar)
        self.drv.cfg_write(PCI_CFG_CAP + 8, 4, offset)
        self.drv.cfg_write(PCI_CFG_CAP + 12, 4, length)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- config space ------------------------------------------------------------------------------

def test_t1_config_space_lint(rig):
    d = rig.drv
    assert d.cfg_read(0x0E, 1) == 0  # type 0 header
    assert d.cfg_read(0x06, 2) == 0x0010  # CAP_LIST
    assert d.cfg_read(0x3D, 1) == 0  # no INTx
    assert [d.cfg_read(0x10 + 4 * i, 4) for i in range(6)] == [0, 0, 0, 0, 0xC, 0]
    d.cfg_write(0x30, 4, 0xFFFFF800)
    assert d.cfg_read(0x30, 4) == 0
    seen, offset = [], d.cfg_read(0x34, 1)
    while offset:
        assert offset % 4 == 0 and 0x40 <= offset <= 0xFC
        assert offset not in seen
        seen.append(offset)
        offset = d.cfg_read(offset + 1, 1)
    assert seen == [0x40, 0x4C, 0x5C, 0x6C, 0x7C, 0x90]


def test_t2_t4_ids(rig):
    d = rig.drv
    assert d.cfg_read(0x00, 2) == 0x1AF4
    assert d.cfg_read(0x02, 2) == 0x1040 + EchoDevice.device_id
    assert d.cfg_read(0x08, 1) == 1
    assert d.cfg_read(0x2C, 2) == 0x1AF4
    assert d.cfg_read(0x2E, 2) == 0x1100
    assert d.cfg_read(0x08, 4) >> 8 == 0x00FF00  # "other" for an unknown device type


@pytest.mark.parametrize(("device_id", "dword"), [(2, 0x01000001), (4, 0x00FF0001)])
def test_t3_blk_and_rng_ids_and_class(rig, device_id, dword):
    device = type("Dev", (EchoDevice,), {"device_id": device_id})()
    fn = VirtioPciFunction(device, PhysicalDma(rig.memory))
    drv = PciDriver(fn)
    assert drv.cfg_read(0x02, 2) == 0x1040 + device_id
    assert drv.cfg_read(0x08, 4) == dword


@pytest.mark.parametrize("attrs", [{"num_queues": 0}, {"num_queues": 128},
                                   {"queue_max_size": 0}, {"queue_max_size": 24},
                                   {"queue_max_size": 65536}])
def test_layout_limits(rig, attrs):
    with pytest.raises(ValueError):
        VirtioPciFunction(type("Dev", (EchoDevice,), attrs)(), PhysicalDma(rig.memory))


def test_class_code_override(rig):
    fn = VirtioPciFunction(EchoDevice(), PhysicalDma(rig.memory), class_code=0x078000)
    assert PciDriver(fn).cfg_read(0x08, 4) >> 8 == 0x078000


def test_t6_t8_t18_t20_t24_t25_t28_capabilities(rig):
    cfg = rig.fn.region_read(CFG, 0, 256)
    assert struct.unpack_from("<BBHII", cfg, 0x40) == (0x11, 0x4C, N - 1, 0x1, 0x801)
    caps = {}
    for off in (0x4C, 0x5C, 0x6C, 0x7C, 0x90):
        vndr, _nxt, cap_len, cfg_type, bar, _id, offset, length = \
            struct.unpack_from("<BBBBBBxxII", cfg, off)
        assert vndr == 0x09
        caps[cfg_type] = (cap_len, bar, offset, length)
    assert caps[1] == (16, 4, 0x0000, 0x1000)  # COMMON
    assert caps[3] == (16, 4, 0x1000, 0x1000)  # ISR
    assert caps[4] == (16, 4, 0x2000, 0x1000)  # DEVICE
    assert caps[2] == (20, 4, 0x3000, 0x1000)  # NOTIFY
    assert caps[5] == (20, 0, 0, 0)  # PCI_CFG
    assert struct.unpack_from("<I", cfg, 0x7C + 16) == (4,)  # notify_off_multiplier
    for _cap_len, _bar, offset, _length in caps.values():
        assert offset % 4 == 0  # T7, T24


def test_regions(rig):
    regions = rig.fn.regions()
    assert [r.index for r in regions] == list(range(9))
    assert [r.size for r in regions] == [0, 0x1000, 0, 0, 0x4000, 0, 0, 256, 0]
    for r in regions:
        assert r.size & (r.size - 1) == 0
        assert r.readable == r.writable == (r.size > 0)
    assert regions[7].memory is False and regions[1].memory and regions[4].memory


def test_whole_config_read_matches_small_reads(rig):
    whole = rig.fn.region_read(CFG, 0, 256)
    assert len(whole) == 256
    assert whole == b"".join(rig.fn.region_read(CFG, o, 4) for o in range(0, 256, 4))


@pytest.mark.parametrize(("index", "offset", "size"), [
    (0, 0, 4), (2, 0, 4), (3, 0, 4), (5, 0, 4), (6, 0, 4), (8, 0, 4), (9, 0, 4), (-1, 0, 4),
    (1000, 0, 4),
    (4, 0x4000, 1), (4, 0x3FFE, 4), (4, -4, 4), (1, 0x1000, 4), (7, 256, 1), (7, 254, 4),
    (4, 0, 0), (4, 0, 3), (4, 0, 5), (4, 0, 16), (7, 0, 16), (7, 4, 252), (7, 0, 257),
])
def test_malformed_accesses_raise_pci_access_error(rig, index, offset, size):
    with pytest.raises(PciAccessError):
        rig.fn.region_read(index, offset, size)
    with pytest.raises(PciAccessError):
        rig.fn.region_write(index, offset, bytes(size))


def test_whole_config_write_refused(rig):
    with pytest.raises(PciAccessError):
        rig.fn.region_write(CFG, 0, bytes(256))


def test_command_register_stored_bar_writes_ignored(rig):
    d = rig.drv
    d.cfg_write(0x04, 2, 0x0406)
    assert d.cfg_read(0x04, 2) == 0x0406
    for off in range(0x10, 0x28, 4):
        d.cfg_write(off, 4, 0)
    assert d.cfg_read(0x20, 4) == 0xC
    d.cfg_write(0x00, 4, 0)  # read-only IDs
    assert d.cfg_read(0x00, 2) == 0x1AF4


def test_msix_bar_reads_zero_writes_ignored(rig):
    assert rig.fn.region_read(BAR1, 0x800, 8) == bytes(8)  # PBA
    assert rig.fn.region_read(BAR1, 0, 4) == bytes(4)
    rig.fn.region_write(BAR1, 0x800, b"\xff" * 4)
    assert rig.fn.region_read(BAR1, 0x800, 4) == bytes(4)


# -- the probe and the data path ---------------------------------------------------------------

def test_linux_probe_echo_and_interrupt(rig):
    rig.start(vector=1)
    head, n = rig.echo(b"hello")
    assert rig.ring.used() == [(head, n)]
    assert rig.ring.read_writable(head) == b"hello"
    assert fired(rig.drv.vectors[1]) == 1
    assert fired(rig.drv.vectors[0]) == 0
    assert rig.drv.bar_read(ISR, 1) == 0x1  # T23: the read returns and clears
    assert rig.drv.bar_read(ISR, 1) == 0


def test_t32_no_vector_no_interrupt(rig):
    rig.start(vector=NO_VECTOR)
    head, n = rig.echo()
    assert rig.ring.used() == [(head, n)]
    assert [fired(fd) for fd in rig.drv.vectors] == [0, 0]
    assert rig.drv.bar_read(ISR, 1) == 0x1


def test_vector_without_eventfd_is_silent(rig):
    rig.start(vector=1)
    rig.fn.set_irq_eventfds(IrqIndex.MSIX, 1, [None])
    head, n = rig.echo()
    assert rig.ring.used() == [(head, n)]
    assert fired(rig.drv.vectors[1]) == 0


def test_g1_nothing_before_driver_ok_then_scan(rig):
    rig.drv.probe()
    rig.drv.setup_queue(0, rig.ring, 1)
    rig.drv.enable_queue(0)
    head = rig.ring.add([b"early"], [5])
    rig.ring.publish()
    rig.drv.kick(0)  # status 0x0B: ignored
    assert rig.ring.used() == []
    rig.drv.driver_ok()  # the queue is scanned once
    assert rig.ring.used() == [(head, 5)]
    assert fired(rig.drv.vectors[1]) == 1


def test_kicks_ignored_for_nonexistent_queue_and_after_failed(rig):
    rig.start()
    rig.ring.add([b"x"], [1])
    rig.ring.publish()
    for q in (1, 2, 1023):
        rig.drv.bar_write(NOTIFY + 4 * q, 2, q)
    rig.drv.bar_write(NOTIFY + 2, 2, 0)  # not a queue slot
    assert rig.ring.used() == []
    rig.drv.add_status(STATUS_FAILED)
    rig.drv.bar_write(NOTIFY, 2, 0)
    assert rig.ring.used() == []
    assert rig.device.queues == {}


def test_queue_starts_only_with_bus_master(rig):
    rig.drv.probe()
    rig.drv.cfg_write(0x04, 2, 0x0002)  # memory on, master off
    rig.drv.setup_queue(0, rig.ring, 1)
    rig.drv.enable_queue(0)
    head = rig.ring.add([b"m"], [1])
    rig.ring.publish()
    rig.drv.driver_ok()
    rig.drv.kick(0)
    assert rig.ring.used() == []
    assert rig.device.queues == {}
    rig.drv.cfg_write(0x04, 2, 0x0006)
    assert rig.ring.used() == [(head, 1)]


def test_no_kick_without_bus_master(rig):
    rig.start()
    rig.drv.write(Reg.STATUS, 1, READY)  # DRIVER_OK dropped (no reset): master may go
    rig.drv.cfg_write(0x04, 2, 0x0002)
    rig.drv.driver_ok()
    rig.ring.add([b"k"], [1])
    rig.ring.publish()
    rig.drv.kick(0)
    assert rig.ring.used() == []
    rig.drv.cfg_write(0x04, 2, 0x0006)
    rig.drv.kick(0)
    assert len(rig.ring.used()) == 1


def test_bus_master_off_while_running_resets(rig):
    rig.start()
    resets = rig.device.resets
    rig.drv.cfg_write(0x04, 2, 0x0002)
    assert rig.device.resets == resets + 1
    assert rig.drv.status == 0
    rig.drv.write(Reg.Q_SELECT, 2, 0)
    assert rig.drv.read(Reg.Q_ENABLE, 2) == 0


def test_t5_independent_address_halves():
    high = 0x1_2000_0000
    r = Rig(gpa=high)
    try:
        d = r.drv
        d.probe()
        d.write(Reg.Q_SELECT, 2, 0)
        d.write(Reg.Q_DESC_HI, 4, r.ring.desc >> 32)  # high half first
        d.write(Reg.Q_DESC_LO, 4, r.ring.desc & 0xFFFFFFFF)
        d.write(Reg.Q_DRIVER_LO, 4, r.ring.avail & 0xFFFFFFFF)  # low half first
        d.write(Reg.Q_DRIVER_HI, 4, r.ring.avail >> 32)
        d.fn.region_write(BAR4, Reg.Q_DEVICE_LO, struct.pack("<Q", r.ring.used_ring))  # 8 bytes
        assert d.read(Reg.Q_DESC_HI, 4) == 1 and d.read(Reg.Q_DESC_LO, 4) == 0x2000_0000
        assert d.read(Reg.Q_DRIVER_LO, 4) == r.ring.avail & 0xFFFFFFFF
        assert d.fn.region_read(BAR4, Reg.Q_DEVICE_LO, 8) == struct.pack("<Q", r.ring.used_ring)
        d.write(Reg.Q_SIZE, 2, 8)
        d.write(Reg.Q_MSIX, 2, 1)
        d.enable_queue(0)
        d.driver_ok()
        head, n = r.echo()
        assert r.ring.used() == [(head, n)]
    finally:
        r.close()


def test_event_idx_and_indirect_reach_the_queue():
    r = Rig(extra_features=bit(F_EVENT_IDX))
    try:
        r.start()
        q = r.device.queues[0]
        assert q.event_idx and q.indirect and q.size == 8
    finally:
        r.close()


# -- feature negotiation -----------------------------------------------------------------------

def test_t9_t10_feature_windows(rig):
    d = rig.drv
    offered = rig.device.offered_features()
    assert d.device_features() == offered
    for select in (2, 7, 0xFFFFFFFF):
        d.write(Reg.DFSELECT, 4, select)
        assert d.read(Reg.DFSELECT, 4) == select
        assert d.read(Reg.DF, 4) == 0
    d.write_features(bit(F_VERSION_1) | bit(F_INDIRECT_DESC))
    d.write(Reg.GFSELECT, 4, 0)
    assert d.read(Reg.GF, 4) == bit(F_INDIRECT_DESC)
    d.write(Reg.GFSELECT, 4, 1)
    assert d.read(Reg.GF, 4) == 1
    d.write(Reg.GFSELECT, 4, 2)
    d.write(Reg.GF, 4, 0xFFFFFFFF)
    assert d.read(Reg.GF, 4) == 0


@pytest.mark.parametrize(("extra", "accepted"), [
    (0, bit(F_INDIRECT_DESC)),                                  # VERSION_1 missing
    (0, bit(F_VERSION_1) | bit(5)),                              # never offered
    (ACCESS_PLATFORM, bit(F_VERSION_1)),                         # ACCESS_PLATFORM refused
])
def test_features_ok_refused(extra, accepted):
    r = Rig(extra_features=extra)
    try:
        status = r.drv.probe(features=accepted)
        assert status == STATUS_ACKNOWLEDGE | STATUS_DRIVER
        assert r.device.status & STATUS_FEATURES_OK == 0
    finally:
        r.close()


def test_g4_g6_valid_subset_accepted_and_renegotiated():
    r = Rig(extra_features=ACCESS_PLATFORM)
    try:
        features = bit(F_VERSION_1) | ACCESS_PLATFORM
        assert r.drv.probe(features=features) == READY
        assert r.device.driver_features == features
        r.drv.write_features(bit(F_VERSION_1) | bit(F_INDIRECT_DESC) | ACCESS_PLATFORM)
        assert r.device.driver_features == features  # ignored after FEATURES_OK
        r.drv.write(Reg.GFSELECT, 4, 0)
        assert r.drv.read(Reg.GF, 4) == 0
        assert r.drv.probe(features=features) == READY  # reset, the same set again
    finally:
        r.close()


# -- status, reset -----------------------------------------------------------------------------

def test_t12_t13_t30_reset_values(rig):
    rig.start(vector=1)
    d = rig.drv
    d.write(Reg.DFSELECT, 4, 1)
    d.write(Reg.GFSELECT, 4, 1)
    rig.echo()
    resets = rig.device.resets
    d.write(Reg.STATUS, 1, 0)
    assert d.status == 0  # synchronous
    assert rig.device.resets == resets + 1
    assert rig.device.queues == {}
    assert d.read(Reg.DFSELECT, 4) == 0 and d.read(Reg.GFSELECT, 4) == 0
    assert d.read(Reg.GF, 4) == 0
    assert d.read(Reg.MSIX_CONFIG, 2) == NO_VECTOR
    assert d.read(Reg.Q_SELECT, 2) == 0
    assert d.read(Reg.Q_SIZE, 2) == EchoDevice.queue_max_size
    assert d.read(Reg.Q_MSIX, 2) == NO_VECTOR
    assert d.read(Reg.Q_ENABLE, 2) == 0
    for reg in (Reg.Q_DESC_LO, Reg.Q_DESC_HI, Reg.Q_DRIVER_LO, Reg.Q_DRIVER_HI,
                Reg.Q_DEVICE_LO, Reg.Q_DEVICE_HI):
        assert d.read(reg, 4) == 0
    assert d.bar_read(ISR, 1) == 0
    assert d.cfg_read(0x04, 2) == 0x0006  # PCI config is not the virtio reset's
    assert all(is_open(fd) for fd in rig.fn._vectors)  # nor are the eventfds


def test_status_stored_and_needs_reset_sticky(rig):
    rig.drv.write(Reg.STATUS, 1, STATUS_ACKNOWLEDGE | STATUS_NEEDS_RESET)
    assert rig.drv.status == STATUS_ACKNOWLEDGE  # the driver cannot set the device's bit
    rig.start(vector=1)
    rig.device.fail(0, "test")
    assert rig.drv.status & STATUS_NEEDS_RESET
    assert fired(rig.drv.vectors[0]) == 1  # config notification (MUST with DRIVER_OK)
    assert rig.drv.bar_read(ISR, 1) == 0x2
    rig.drv.write(Reg.STATUS, 1, READY | STATUS_DRIVER_OK)
    assert rig.drv.status & STATUS_NEEDS_RESET
    rig.drv.write(Reg.STATUS, 1, 0)
    assert rig.drv.status == 0


def test_bad_ring_at_driver_ok_breaks_device(rig):
    d = rig.drv
    d.probe()
    d.write(Reg.Q_SELECT, 2, 0)
    d.write(Reg.Q_DESC_LO, 4, GPA + 8)  # not 16-byte aligned
    d.write(Reg.Q_SIZE, 2, 8)
    d.enable_queue(0)
    assert d.driver_ok() & STATUS_NEEDS_RESET
    assert fired(d.vectors[0]) == 1


def test_config_generation_and_config_interrupt(rig):
    d = rig.drv
    gen = d.read(Reg.CFG_GENERATION, 1)
    assert d.bar_read(0x2000, 4) == 0x11223344
    rig.device.value = 0x55
    rig.fn.config_changed()  # before DRIVER_OK: no notification, new generation
    assert d.read(Reg.CFG_GENERATION, 1) != gen  # T11
    assert d.bar_read(0x2000, 4) == 0x55
    rig.start(vector=1)
    gen = d.read(Reg.CFG_GENERATION, 1)
    rig.fn.config_changed()  # T21
    assert d.read(Reg.CFG_GENERATION, 1) == (gen + 1) & 0xFF
    assert d.bar_read(ISR, 1) == 0x2
    assert fired(d.vectors[0]) == 1
    d.write(Reg.MSIX_CONFIG, 2, NO_VECTOR)  # T33
    rig.fn.config_changed()
    assert fired(d.vectors[0]) == 0
    assert d.bar_read(ISR, 1) == 0x2


# -- queue registers ---------------------------------------------------------------------------

def test_t15_nonexistent_queue_registers(rig):
    d = rig.drv
    for select in (1, 100, 0xFFFF):
        d.write(Reg.Q_SELECT, 2, select)
        assert d.read(Reg.Q_SIZE, 2) == 0
        assert d.read(Reg.Q_ENABLE, 2) == 0
        assert d.read(Reg.Q_MSIX, 2) == NO_VECTOR
        d.write(Reg.Q_SIZE, 2, 8)
        d.write(Reg.Q_MSIX, 2, 0)
        d.write(Reg.Q_ENABLE, 2, 1)
        d.write(Reg.Q_DESC_LO, 4, 0x1000)
        assert (d.read(Reg.Q_SIZE, 2), d.read(Reg.Q_ENABLE, 2)) == (0, 0)
        assert d.read(Reg.Q_DESC_LO, 4) == 0
    assert d.read(Reg.NUM_QUEUES, 2) == 1


def test_t16_queue_size_powers_of_two(rig):
    d = rig.drv
    d.write(Reg.Q_SELECT, 2, 0)
    assert d.read(Reg.Q_SIZE, 2) == 16
    for bad in (0, 3, 12, 32, 0xFFFF):
        d.write(Reg.Q_SIZE, 2, bad)
        assert d.read(Reg.Q_SIZE, 2) == 16
    d.write(Reg.Q_SIZE, 2, 4)
    assert d.read(Reg.Q_SIZE, 2) == 4
    d.write(Reg.Q_ENABLE, 2, 1)
    d.write(Reg.Q_SIZE, 2, 8)  # latched at enable
    d.write(Reg.Q_DESC_LO, 4, 0x1000)
    assert d.read(Reg.Q_SIZE, 2) == 4
    assert d.read(Reg.Q_DESC_LO, 4) == 0


def test_queue_enable_zero_is_ignored(rig):
    d = rig.drv
    d.write(Reg.Q_SELECT, 2, 0)
    d.write(Reg.Q_ENABLE, 2, 0)
    d.write(Reg.Q_ENABLE, 2, 2)
    assert d.read(Reg.Q_ENABLE, 2) == 0
    d.write(Reg.Q_ENABLE, 2, 1)
    d.write(Reg.Q_ENABLE, 2, 0)
    assert d.read(Reg.Q_ENABLE, 2) == 1


def test_t19_notify_offsets_fit(rig):
    cfg = rig.fn.region_read(CFG, 0, 256)
    offset, length, mult = struct.unpack_from("<III", cfg, 0x7C + 8)
    assert offset % 2 == 0 and mult == 4
    for q in range(rig.drv.read(Reg.NUM_QUEUES, 2)):
        rig.drv.write(Reg.Q_SELECT, 2, q)
        assert rig.drv.read(Reg.Q_NOTIFY_OFF, 2) * mult + 2 <= length


def test_t29_t31_vector_mapping(rig):
    d = rig.drv
    d.write(Reg.Q_SELECT, 2, 0)
    for reg in (Reg.MSIX_CONFIG, Reg.Q_MSIX):
        for v in range(N):
            d.write(reg, 2, v)
            assert d.read(reg, 2) == v
        d.write(reg, 2, NO_VECTOR)
        assert d.read(reg, 2) == NO_VECTOR
        for bad in (N, 0x7FF, 0xFFFE):
            d.write(reg, 2, bad)
            assert d.read(reg, 2) == NO_VECTOR


def test_read_only_and_unused_fields(rig):
    d = rig.drv
    for reg, size in ((Reg.NUM_QUEUES, 2), (Reg.CFG_GENERATION, 1), (Reg.Q_NOTIFY_OFF, 2),
                      (Reg.DF, 4)):
        before = d.read(reg, size)
        d.write(reg, size, 0x5A)
        assert d.read(reg, size) == before
    for reg in (Reg.Q_NOTIFY_DATA, Reg.Q_RESET, Reg.ADMIN_Q_INDEX, Reg.ADMIN_Q_NUM):
        d.write(reg, 2, 1)
        assert d.read(reg, 2) == 0


def test_non_natural_common_accesses(rig):
    d = rig.drv
    d.write(Reg.Q_SELECT, 2, 0)
    assert d.bar_read(Reg.Q_SELECT, 4) == 0  # wrong width
    assert d.bar_read(Reg.DF + 1, 1) == 0  # not a field start
    d.bar_write(Reg.DFSELECT, 2, 1)  # ignored
    assert d.read(Reg.DFSELECT, 4) == 0
    d.bar_write(Reg.STATUS, 2, 0x0101)  # status+generation as one write: ignored
    assert d.status == 0
    assert d.bar_read(0x40, 4) == 0 and d.bar_read(0xFFC, 4) == 0  # past the structure
    assert rig.fn.region_read(BAR4, 0xFFE, 4) == bytes(4)  # straddles common and ISR


# -- ISR, device config, notify ----------------------------------------------------------------

def test_isr_writes_ignored_read_anywhere(rig):
    rig.start(vector=1)
    rig.echo()
    rig.drv.bar_write(ISR, 1, 0)
    assert rig.drv.bar_read(ISR + 0x10, 4) == 0x1
    assert rig.drv.bar_read(ISR, 1) == 0


def test_device_config_window(rig):
    d = rig.drv
    assert d.bar_read(0x2000, 4) == 0x11223344
    assert d.bar_read(0x2001, 2) == 0x2233
    assert rig.fn.region_read(BAR4, 0x2002, 4) == b"\x22\x11\0\0"  # padded past the end
    assert d.bar_read(0x2100, 4) == 0
    assert d.bar_read(0x2FFC, 4) == 0
    d.bar_write(0x2000, 4, 0xCAFE)
    assert rig.device.value == 0xCAFE
    d.bar_write(0x2000, 2, 0xBEEF)  # the device refuses: ignored
    assert rig.device.value == 0xCAFE


def test_notify_reads_zero(rig):
    rig.start()
    assert rig.drv.bar_read(NOTIFY, 2) == 0


# -- the PCI_CFG window (T26, T27) -------------------------------------------------------------

def test_t26_pci_cfg_window_write(rig):
    rig.window(4, Reg.Q_SELECT, 2)
    rig.drv.cfg_write(PCI_CFG_CAP + 16, 2, 1)
    assert rig.drv.read(Reg.Q_SELECT, 2) == 1


def test_t27_pci_cfg_window_read(rig):
    rig.window(4, Reg.NUM_QUEUES, 2)
    assert rig.drv.cfg_read(PCI_CFG_CAP + 16, 2) == 1
    rig.window(4, 0x2000, 4)
    assert rig.drv.cfg_read(PCI_CFG_CAP + 16, 4) == 0x11223344


def test_pci_cfg_window_isr_read_clears_and_kick(rig):
    rig.start(vector=1)
    rig.ring.add([b"w"], [1])
    rig.ring.publish()
    rig.window(4, NOTIFY, 2)  # kick queue 0 through the window
    rig.drv.cfg_write(PCI_CFG_CAP + 16, 2, 0)
    assert len(rig.ring.used()) == 1
    rig.window(4, ISR, 1)
    assert rig.drv.cfg_read(PCI_CFG_CAP + 16, 1) == 0x1
    assert rig.drv.bar_read(ISR, 1) == 0


@pytest.mark.parametrize(("bar", "offset", "length"), [
    (1, 0x800, 4), (0, 0, 4), (4, 0x14, 3), (4, 0x14, 0), (4, 0x15, 2), (4, 0x4000, 4),
    (4, 0xFFFFFFFC, 4),
])
def test_pci_cfg_window_invalid_does_nothing(rig, bar, offset, length):
    rig.start(vector=1)
    rig.echo()  # ISR bit 0 set
    rig.window(bar, offset, length)
    rig.drv.cfg_write(PCI_CFG_CAP + 16, 4, 0x12345678)
    assert rig.drv.cfg_read(PCI_CFG_CAP + 16, 4) == 0x12345678
    assert rig.drv.status == READY | STATUS_DRIVER_OK
    assert rig.drv.bar_read(ISR, 1) == 0x1


# -- interrupts, function reset, disconnect ----------------------------------------------------

def test_irq_counts(rig):
    assert rig.fn.irq_count(IrqIndex.MSIX) == N
    for index in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.ERR, IrqIndex.REQ, 9):
        assert rig.fn.irq_count(index) == 0


@pytest.mark.parametrize(("index", "start", "count"), [
    (IrqIndex.MSIX, 0, N + 1), (IrqIndex.MSIX, N, 1), (IrqIndex.MSIX, -1, 1),
    (IrqIndex.ERR, 0, 1), (IrqIndex.INTX, 0, 1),
])
def test_set_irq_eventfds_out_of_range_closes_fds(rig, index, start, count):
    fds = [eventfd() for _ in range(count)]
    with pytest.raises(ValueError):
        rig.fn.set_irq_eventfds(index, start, fds)
    assert not any(is_open(fd) for fd in fds)


def test_eventfds_replaced_deassigned_and_closed(rig):
    rig.start(vector=1)
    owned = list(rig.fn._vectors)
    fresh = eventfd()
    rig.fn.set_irq_eventfds(IrqIndex.MSIX, 1, [os.dup(fresh)])
    assert not is_open(owned[1]) and is_open(owned[0])
    rig.echo()
    assert fired(fresh) == 1 and fired(rig.drv.vectors[1]) == 0
    rig.fn.set_irq_eventfds(IrqIndex.MSIX, 0, [None])  # QEMU: MSI-X on, vector 0 unassigned
    assert not is_open(owned[0])
    rig.fn.disable_irqs(IrqIndex.MSIX)
    assert rig.fn._vectors == [None] * N
    rig.fn.disable_irqs(IrqIndex.INTX)  # nothing to drop
    with pytest.raises(ValueError):
        rig.fn.disable_irqs(7)
    os.close(fresh)


def test_function_reset(rig):
    rig.start(vector=1)
    rig.window(4, Reg.Q_SELECT, 2)
    rig.drv.cfg_write(0x42, 2, 0x8000 | (N - 1))  # MSI-X enable, as forwarded by QEMU
    owned = list(rig.fn._vectors)
    rig.fn.reset()
    d = rig.drv
    assert d.cfg_read(0x04, 2) == 0
    assert d.cfg_read(0x42, 2) == N - 1
    assert [d.cfg_read(PCI_CFG_CAP + o, 4) for o in (4, 8, 12, 16)] == [0, 0, 0, 0]
    assert d.status == 0
    assert d.read(Reg.MSIX_CONFIG, 2) == NO_VECTOR
    assert not any(is_open(fd) for fd in owned)
    assert rig.ring.used() == [] and rig.memory.read(GPA, 4) is not None  # memory untouched
    assert rig.drv.probe() == READY  # QEMU re-sends the eventfds; the driver starts over


def test_disconnect_closes_everything(rig):
    rig.start(vector=1)
    owned = list(rig.fn._vectors)
    rig.fn.disconnect()
    assert not any(is_open(fd) for fd in owned)
    assert rig.device.status == 0 and rig.device.queues == {}
