"""Nested translation: the guest's stage 1 (a fake of the device IOTLB), the backend's
stage 2 (real VMSAv8-64 tables), the composed cache, the faults and their SMMUv3 records."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pviommu.events import EventBus, FaultRecorded
from pviommu.iommu.faults import Access, DmaFault, FaultReason, Stage
from pviommu.iommu.nested import MAX_PREFETCH, NestedFault, NestedTranslator
from pviommu.iommu.smmu_events import EventClass, SmmuEvent, SmmuEventQueue, SmmuEventRecorded
from pviommu.iommu.stage2 import Stage2, Stage2Error
from pviommu.iommu.translation import TranslationMiss
from pviommu.iommu.vsmmu import Vsmmu
from pviommu.memory import GuestMemory
from pviommu.vmsa import Granule, Perm, VmsaConfig, Walker
from pviommu.vmsa.descriptors import s2_attrs
from tests.fakes.stage1 import FakeStage1
from tests.fakes.virtio_driver import DEFAULT_GPA, memfd_memory

EP = 0x10  # StreamID of 00:02.0
IOVA = 0x8000_0000
PAGE = 0x1000
MEM = 1 << 22


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem, fd = memfd_memory(MEM)
    os.close(fd)
    yield mem
    mem.clear()


@pytest.fixture
def bus() -> tuple[EventBus, list[object]]:
    bus = EventBus()
    heard: list[object] = []
    bus.listen(heard.append)
    return bus, heard


def nested(memory: GuestMemory, bus: EventBus) -> tuple[Vsmmu, FakeStage1, NestedTranslator]:
    vsmmu = Vsmmu(bus)
    s1 = FakeStage1()
    return vsmmu, s1, vsmmu.translator(s1, EP, memory)


async def translate(tr: NestedTranslator, iova: int, length: int, access: Access
                    ) -> list[tuple[int, int]]:
    """Translate, filling stage-1 misses as a device's request task does."""
    for _ in range(16):
        try:
            return tr.translate(EP, iova, length, access)
        except TranslationMiss as miss:
            await tr.fill(miss)
    raise AssertionError("still missing")


async def test_stage1_miss_fills_then_hits_through_identity_stage2(
        memory: GuestMemory, bus: tuple[EventBus, list[object]]) -> None:
    _, s1, tr = nested(memory, bus[0])
    s1.map(IOVA, DEFAULT_GPA + 0x3000, 2 * PAGE)
    with pytest.raises(TranslationMiss) as miss:
        tr.translate(EP, IOVA + 0x10, 0x20, Access.READ)
    assert miss.value.iova == IOVA + 0x10
    await tr.fill(miss.value)
    assert s1.fills == [(IOVA, Access.READ)]
    assert tr.translate(EP, IOVA + 0x10, 0x20, Access.READ) == [(DEFAULT_GPA + 0x3010, 0x20)]
    # Across the page boundary, the second page misses, then both merge.
    pieces = await translate(tr, IOVA + PAGE - 8, 16, Access.READ)
    assert pieces == [(DEFAULT_GPA + 0x3000 + PAGE - 8, 16)]
    assert tr.stats["composed_hits"] >= 1 and tr.stats["stage1_misses"] == 2
    assert set(tr.cached()) == {IOVA, IOVA + PAGE}


async def test_stage2_remap_moves_the_output_and_a_write_needs_its_own_fill(
        memory: GuestMemory, bus: tuple[EventBus, list[object]]) -> None:
    vsmmu, s1, tr = nested(memory, bus[0])
    s1.map(IOVA, DEFAULT_GPA)
    await translate(tr, IOVA, 8, Access.READ)
    vsmmu.stage2.map(DEFAULT_GPA, DEFAULT_GPA + 0x5000, PAGE, Perm.R | Perm.W)
    assert tr.cached() == {}  # the stage-2 change dropped the composed entry
    assert tr.translate(EP, IOVA, 8, Access.READ) == [(DEFAULT_GPA + 0x5000, 8)]
    with pytest.raises(TranslationMiss):  # stage 1 holds it for reads only
        tr.translate(EP, IOVA, 8, Access.WRITE)
    assert await translate(tr, IOVA, 8, Access.WRITE) == [(DEFAULT_GPA + 0x5000, 8)]
    assert tr.cached()[IOVA] == (DEFAULT_GPA + 0x5000, int(Access.READ | Access.WRITE))


async def test_guest_invalidation_drops_composed_entries(
        memory: GuestMemory, bus: tuple[EventBus, list[object]]) -> None:
    _, s1, tr = nested(memory, bus[0])
    s1.map(IOVA, DEFAULT_GPA, 2 * PAGE)
    await translate(tr, IOVA, 2 * PAGE, Access.READ)
    gen = tr.generation
    s1.unmap(IOVA + PAGE)
    assert tr.generation != gen
    assert tr.translate(EP, IOVA, 8, Access.READ)  # still in the IOTLB: recomposed
    with pytest.raises(TranslationMiss):
        tr.translate(EP, IOVA + PAGE, 8, Access.READ)
    assert IOVA + PAGE not in tr.cached()


async def test_stage1_refusal_is_a_stage1_fault_the_guest_was_told_of(
        memory: GuestMemory, bus: tuple[EventBus, list[object]]) -> None:
    vsmmu, s1, tr = nested(memory, bus[0])
    dma = vsmmu.dma(s1, EP, memory)
    with pytest.raises(TranslationMiss) as miss:
        dma.read(IOVA, 16)
    await dma.fill(miss.value)
    with pytest.raises(DmaFault) as fault:
        dma.read(IOVA, 16)
    f = fault.value.fault
    assert (f.stage, f.reason, f.address, f.access) == (Stage.S1, FaultReason.F_TRANSLATION,
                                                         IOVA, Access.READ)
    assert isinstance(f, NestedFault) and f.guest_notified
    assert [e for e in bus[1] if isinstance(e, FaultRecorded)] == [FaultRecorded(f, True)]
    assert not vsmmu.queue.records  # the guest's own fault: no host record


async def test_an_unavailable_frontend_faults_without_telling_the_guest(
        memory: GuestMemory, bus: tuple[EventBus, list[object]]) -> None:
    vsmmu, s1, _ = nested(memory, bus[0])
    s1.unavailable = True
    dma = vsmmu.dma(s1, EP, memory)
    with pytest.raises(TranslationMiss) as miss:
        dma.read(IOVA, 16)
    await dma.fill(miss.value)
    with pytest.raises(DmaFault):
        dma.read(IOVA, 16)
    recorded = [e for e in bus[1] if isinstance(e, FaultRecorded)]
    assert len(recorded) == 1 and not recorded[0].delivered


async def test_a_miss_fills_every_page_of_its_range_at_once(
        memory: GuestMemory, bus: tuple[EventBus, list[object]]) -> None:
    _, s1, tr = nested(memory, bus[0])
    s1.map(IOVA, DEFAULT_GPA, 64 * PAGE)
    with pytest.raises(TranslationMiss) as miss:
        tr.translate(EP, IOVA + 8, 64 * PAGE - 8, Access.WRITE)
    assert miss.value.length == 64 * PAGE - 8
    assert await tr.fill(miss.value) == []
    assert sorted(s1.fills) == [(IOVA + i * PAGE, int(Access.WRITE)) for i in range(64)]
    assert tr.translate(EP, IOVA + 8, 64 * PAGE - 8, Access.WRITE) == [
        (DEFAULT_GPA + 8, 64 * PAGE - 8)]
    assert (tr.stats["stage1_misses"], tr.stats["stage1_prefetches"]) == (1, 63)


async def test_a_widened_miss_fetches_the_request_s_other_buffers_and_keeps_their_faults(
        memory: GuestMemory, bus: tuple[EventBus, list[object]]) -> None:
    vsmmu, s1, _ = nested(memory, bus[0])
    s1.map(IOVA, DEFAULT_GPA, 2 * PAGE)  # IOVA + 2 pages: not mapped by the guest
    dma = vsmmu.dma(s1, EP, memory)
    ranges = [(IOVA, 16, Access.READ), (IOVA + PAGE, PAGE, Access.WRITE),
              (IOVA + 2 * PAGE + 4, 4, Access.WRITE)]
    with pytest.raises(TranslationMiss) as miss:
        dma.read(IOVA, 16)
    wide = dma.widen(miss.value, ranges)
    assert wide.also == ((IOVA + PAGE, PAGE, Access.WRITE), (IOVA + 2 * PAGE + 4, 4, Access.WRITE))
    await dma.fill(wide)
    assert len(s1.fills) == 3
    assert dma.read(IOVA, 16) == bytes(16)
    dma.write(IOVA + PAGE, bytes(PAGE))
    with pytest.raises(DmaFault) as fault:  # found ahead: raised without asking again
        dma.write(IOVA + 2 * PAGE + 4, b"abcd")
    assert len(s1.fills) == 3
    f = fault.value.fault
    assert (f.address, f.access, f.stage) == (IOVA + 2 * PAGE + 4, Access.WRITE, Stage.S1)
    assert len([e for e in bus[1] if isinstance(e, FaultRecorded)]) == 1


async def test_prefetching_is_bounded(memory: GuestMemory,
                                      bus: tuple[EventBus, list[object]]) -> None:
    _, s1, tr = nested(memory, bus[0])
    s1.map(IOVA, DEFAULT_GPA, 1024 * PAGE)
    with pytest.raises(TranslationMiss) as miss:
        tr.translate(EP, IOVA, 1024 * PAGE, Access.READ)
    await tr.fill(miss.value)
    assert len(s1.fills) == 1 + MAX_PREFETCH


class RangedStage1(FakeStage1):
    """A stage 1 that says which ranges an invalidation took (as the device IOTLB does)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[int, int, int]] = []

    def invalidate(self, iova: int = 0, size: int = 0) -> None:
        super().invalidate(iova, size)
        self.log.append((self.generation, iova, iova + size) if size else (-1, 0, 0))

    def invalidated_since(self, generation: int) -> list[tuple[int, int]] | None:
        newer = [entry for entry in self.log if entry[0] > generation or entry[0] < 0]
        if any(g < 0 for g, _, _ in newer):
            return None
        return [(iova, end) for _, iova, end in newer]


async def test_an_invalidation_drops_only_the_composed_pages_it_covers(
        memory: GuestMemory, bus: tuple[EventBus, list[object]]) -> None:
    vsmmu = Vsmmu(bus[0])
    s1 = RangedStage1()
    tr = vsmmu.translator(s1, EP, memory)
    s1.map(IOVA, DEFAULT_GPA, 4 * PAGE)
    await translate(tr, IOVA, 4 * PAGE, Access.READ)
    s1.unmap(IOVA + PAGE)
    assert set(tr.cached()) == {IOVA, IOVA + 2 * PAGE, IOVA + 3 * PAGE}
    with pytest.raises(TranslationMiss):
        tr.translate(EP, IOVA + PAGE, 8, Access.READ)
    vsmmu.stage2.map(DEFAULT_GPA, DEFAULT_GPA + 0x5000, PAGE, Perm.R | Perm.W)
    assert tr.cached() == {}  # a stage-2 change: everything
    await translate(tr, IOVA + 2 * PAGE, 8, Access.READ)
    s1.log.append((-1, 0, 0))  # a change stage 1 cannot describe: everything goes
    s1.generation += 1
    assert tr.cached() == {}


def record_hex(*words: int) -> str:
    return b"".join(w.to_bytes(8, "little") for w in words).hex()


# Hand-made records: word 0 = event | StreamID << 32; word 1 = RnW << 35 | S2 << 39 |
# CLASS IN (0b10) << 40; word 2 = IOVA; word 3 = IPA[51:12].
S2_READ = (1 << 35) | (1 << 39) | (2 << 40)
S2_WRITE = (1 << 39) | (2 << 40)


def test_a_record_is_the_architecture_s_32_bytes() -> None:
    ev = SmmuEvent.stage2_fault(FaultReason.F_TRANSLATION, EP, IOVA + 0x234,
                                DEFAULT_GPA + 0x201234, Access.READ)
    assert ev.pack().hex() == ("10000000" "10000000" "00000000" "88020000"
                               "3402008000000000" "0010204000000000")
    assert SmmuEvent.unpack(ev.pack()) == SmmuEvent(
        0x10, EP, True, EventClass.IN, True, False, False, IOVA + 0x234, DEFAULT_GPA + 0x201000)


@settings(max_examples=200, deadline=None)
@given(st.builds(SmmuEvent, st.integers(0, 255), st.integers(0, 2**32 - 1), st.booleans(),
                 st.sampled_from(EventClass), st.booleans(), st.booleans(), st.booleans(),
                 st.integers(0, 2**64 - 1), st.integers(0, 2**40 - 1).map(lambda p: p << 12),
                 st.booleans(), st.integers(0, 2**20 - 1), st.integers(0, 2**16 - 1),
                 st.booleans()))
def test_records_round_trip(ev: SmmuEvent) -> None:
    assert len(ev.pack()) == 32
    assert SmmuEvent.unpack(ev.pack()) == ev


async def stage2_fault(memory: GuestMemory, bus: tuple[EventBus, list[object]],
                       change: object, access: Access) -> tuple[NestedFault, SmmuEventRecorded]:
    vsmmu, s1, tr = nested(memory, bus[0])
    s1.map(IOVA, DEFAULT_GPA + 0x201000)
    await translate(tr, IOVA, 8, access)  # adopts the RAM, fills stage 1
    change(vsmmu.stage2)  # type: ignore[operator]
    dma = vsmmu.dma(s1, EP, memory)
    with pytest.raises(DmaFault) as fault:
        if access & Access.WRITE:
            dma.write(IOVA + 0x234, b"x" * 8)
        else:
            dma.read(IOVA + 0x234, 8)
    f = fault.value.fault
    assert isinstance(f, NestedFault) and f.stage is Stage.S2
    assert f.ipa == DEFAULT_GPA + 0x201234 and f.address == IOVA + 0x234
    (entry,) = vsmmu.queue.records
    assert [e for e in bus[1] if isinstance(e, SmmuEventRecorded)] == [entry]
    assert FaultRecorded(f, False) in bus[1]
    return f, entry


async def test_stage2_translation_fault(memory: GuestMemory,
                                        bus: tuple[EventBus, list[object]]) -> None:
    f, entry = await stage2_fault(
        memory, bus, lambda s2: s2.unmap(DEFAULT_GPA + 0x201000, PAGE), Access.READ)
    assert f.reason is FaultReason.F_TRANSLATION and f.level == 3
    assert entry.event.pack().hex() == record_hex(0x10 | EP << 32, S2_READ, IOVA + 0x234,
                                                  DEFAULT_GPA + 0x201000)


async def test_stage2_permission_fault_on_a_write(memory: GuestMemory,
                                                  bus: tuple[EventBus, list[object]]) -> None:
    f, entry = await stage2_fault(
        memory, bus, lambda s2: s2.protect(DEFAULT_GPA, MEM, Perm.R), Access.WRITE)
    assert f.reason is FaultReason.F_PERMISSION and f.access is Access.WRITE
    assert entry.event.pack().hex() == record_hex(0x13 | EP << 32, S2_WRITE, IOVA + 0x234,
                                                  DEFAULT_GPA + 0x201000)


async def test_stage2_access_flag_fault(memory: GuestMemory,
                                        bus: tuple[EventBus, list[object]]) -> None:
    def clear_af(s2: Stage2) -> None:
        s2.builder.map(DEFAULT_GPA + 0x201000, DEFAULT_GPA + 0x201000, PAGE,
                       s2_attrs(Perm.R | Perm.W, af=False))
        s2.generation += 1
    f, entry = await stage2_fault(memory, bus, clear_af, Access.READ)
    assert f.reason is FaultReason.F_ACCESS
    assert entry.event.pack().hex() == record_hex(0x12 | EP << 32, S2_READ, IOVA + 0x234,
                                                  DEFAULT_GPA + 0x201000)


async def test_stage2_address_size_fault(memory: GuestMemory,
                                         bus: tuple[EventBus, list[object]]) -> None:
    def beyond_ps(s2: Stage2) -> None:
        s2.map(DEFAULT_GPA + 0x201000, 1 << 44, PAGE, Perm.R | Perm.W)
        # The same tables read under a 40-bit PS: that output is beyond it.
        s2.walker = Walker(VmsaConfig.stage2(Granule.G4K, s2.ias, 40), s2.memory,
                           s2.builder.root)
    f, entry = await stage2_fault(memory, bus, beyond_ps, Access.READ)
    assert f.reason is FaultReason.F_ADDR_SIZE
    assert entry.event.pack().hex() == record_hex(0x11 | EP << 32, S2_READ, IOVA + 0x234,
                                                  DEFAULT_GPA + 0x201000)


async def test_nothing_moves_when_stage2_refuses(memory: GuestMemory,
                                                 bus: tuple[EventBus, list[object]]) -> None:
    vsmmu, s1, tr = nested(memory, bus[0])
    s1.map(IOVA, DEFAULT_GPA, 2 * PAGE)
    dma = vsmmu.dma(s1, EP, memory)
    await translate(tr, IOVA, 2 * PAGE, Access.WRITE)
    vsmmu.stage2.protect(DEFAULT_GPA + PAGE, PAGE, Perm.R)
    with pytest.raises(DmaFault):
        dma.write(IOVA + PAGE - 4, b"abcdefgh")  # the first page is writable, the next not
    assert memory.read(DEFAULT_GPA + PAGE - 4, 8) == bytes(8)


def test_stage2_adopts_guest_ram_once_and_keeps_the_host_s_changes() -> None:
    s2 = Stage2()
    assert s2.adopt([(DEFAULT_GPA, 1 << 30)]) == 1
    [r] = s2.ranges()
    assert (r.ipa, r.pa, r.size, r.perm) == (DEFAULT_GPA, DEFAULT_GPA, 1 << 30, Perm.R | Perm.W)
    s2.unmap(DEFAULT_GPA + 0x200000, 0x200000)
    assert s2.adopt([(DEFAULT_GPA, 1 << 30)]) == 0  # another endpoint's memory table
    assert [(r.ipa, r.size) for r in s2.ranges()] == [
        (DEFAULT_GPA, 0x200000), (DEFAULT_GPA + 0x400000, (1 << 30) - 0x400000)]
    assert [(r.ipa, r.size) for r in s2.ranges(DEFAULT_GPA + 0x500000, DEFAULT_GPA + 0x500000)
            ] == [(DEFAULT_GPA + 0x400000, (1 << 30) - 0x400000)]
    assert s2.adopt([(1 << 41, PAGE)]) == 0  # beyond the 40-bit IPA space


def test_stage2_refuses_bad_ranges_and_bumps_its_generation() -> None:
    s2 = Stage2()
    for bad in ((0x1001, PAGE), (0, 0), (1 << 40, PAGE)):
        with pytest.raises(Stage2Error):
            s2.unmap(*bad)
    with pytest.raises(Stage2Error):
        s2.map(0, 0x123, PAGE, Perm.R)
    gen = s2.generation
    s2.protect(0, PAGE, Perm.R)
    assert s2.generation == gen + 1


def test_the_event_queue_is_bounded_and_counts_what_it_dropped() -> None:
    q = SmmuEventQueue(depth=2)
    for i in range(5):
        q.record(SmmuEvent.stage2_fault(FaultReason.F_TRANSLATION, EP, i, 0, Access.READ))
    assert [e.seq for e in q.records] == [3, 4] and q.dropped == 3 and q.total == 5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["unmap", "ro", "rw", "remap"]),
                          st.integers(0, 15), st.integers(1, 4)), max_size=6),
       st.lists(st.tuples(st.integers(0, 15), st.booleans()), min_size=1, max_size=8))
def test_composition_matches_a_reference_model(
        ops: list[tuple[str, int, int]], accesses: list[tuple[int, bool]]) -> None:
    """Stage 1 maps 16 IOVA pages to IPA pages in reverse; stage 2 is edited at random;
    every translation is the model's composition or the model's fault."""
    import asyncio
    mem = GuestMemory()
    vsmmu = Vsmmu(EventBus())
    s2 = vsmmu.stage2
    s2.adopt([(DEFAULT_GPA, 32 * PAGE)])
    s1 = FakeStage1()
    tr = vsmmu.translator(s1, EP, mem)
    model = {DEFAULT_GPA + p * PAGE: (DEFAULT_GPA + p * PAGE, Perm.R | Perm.W) for p in range(32)}
    for p in range(16):
        s1.map(IOVA + p * PAGE, DEFAULT_GPA + (15 - p) * PAGE)

    async def run() -> None:
        for i, (page, write) in enumerate(accesses):
            access = Access.WRITE if write else Access.READ
            if i < len(ops):
                op, start, n = ops[i]
                ipa = DEFAULT_GPA + start * PAGE
                if op == "unmap":
                    s2.unmap(ipa, n * PAGE)
                elif op in ("ro", "rw"):
                    s2.protect(ipa, n * PAGE, Perm.R if op == "ro" else Perm.R | Perm.W)
                else:
                    s2.map(ipa, DEFAULT_GPA + 16 * PAGE, n * PAGE, Perm.R | Perm.W)
                for k in range(n):
                    a = ipa + k * PAGE
                    if op == "unmap":
                        model.pop(a, None)
                    elif op == "remap":
                        model[a] = (DEFAULT_GPA + 16 * PAGE + k * PAGE, Perm.R | Perm.W)
                    elif a in model:
                        model[a] = (model[a][0], Perm.R if op == "ro" else Perm.R | Perm.W)
            ipa = DEFAULT_GPA + (15 - page) * PAGE
            want = model.get(ipa)
            try:
                got = await translate(tr, IOVA + page * PAGE + 8, 8, access)
            except DmaFault as e:
                reason = (FaultReason.F_TRANSLATION if want is None
                          else FaultReason.F_PERMISSION)
                assert want is None or not want[1] & Perm(int(access))
                assert (e.fault.stage, e.fault.reason) == (Stage.S2, reason)
                continue
            assert want is not None and want[1] & Perm(int(access))
            assert got == [(want[0] + 8, 8)]
    asyncio.run(run())
