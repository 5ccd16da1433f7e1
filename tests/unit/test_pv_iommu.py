"""PvIommu: the virtio-iommu request semantics (statuses, domains, mappings, translation)."""

from __future__ import annotations

import pytest

from pviommu.dma import Access, DmaFault
from pviommu.events import EndpointAttached, EndpointDetached, EventBus
from pviommu.iommu.mappings import MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE
from pviommu.iommu.pv import (
    ATTACH_F_BYPASS,
    U64_MAX,
    IommuConfig,
    Negotiated,
    PvIommu,
    ResvRegion,
    ResvType,
    Status,
)

EP, EP2, EP3 = 0x10, 0x18, 0x20
UNKNOWN_EP = 0x99
RW = MAP_F_READ | MAP_F_WRITE
MSI = (0x08090000, 0x0809FFFF)


def _iommu(**cfg) -> tuple[PvIommu, list[object]]:
    events: list[object] = []
    bus = EventBus()
    bus.listen(events.append)
    return PvIommu(IommuConfig(**cfg), endpoints=[EP, EP2, EP3], events=bus), events


@pytest.fixture
def iommu():
    return _iommu()[0]


def _state(iommu: PvIommu):
    """Everything a request may change: attachments, domains and their mappings."""
    return (dict(iommu.attached),
            {d.id: (d.bypass, sorted(d.endpoints),
                    [(m.virt_start, m.virt_end, m.phys_start, m.flags) for m in d.mappings])
             for d in iommu.domains.values()})


# -- ATTACH --------------------------------------------------------------------------------


def test_attach_creates_the_domain(iommu):
    assert iommu.attach(1, EP, 0) == Status.OK
    assert iommu.attached[EP] == 1
    assert iommu.domains[1].bypass is False and iommu.domains[1].endpoints == {EP}
    assert iommu.attach(1, EP2, 0) == Status.OK  # several endpoints per domain
    assert iommu.domains[1].endpoints == {EP, EP2}


def test_attach_reserved_non_zero_is_inval(iommu):
    assert iommu.attach(1, EP, 0, reserved_zero=False) == Status.INVAL
    assert iommu.domains == {}
    assert EP not in iommu.attached
    # reserved is checked before the endpoint exists
    assert iommu.attach(1, UNKNOWN_EP, 0, reserved_zero=False) == Status.INVAL


@pytest.mark.parametrize("flags", [0x2, 0x4, 0x100, 0x8000_0000, ATTACH_F_BYPASS | 0x2])
def test_attach_unknown_flags_are_inval(iommu, flags):
    assert iommu.attach(1, EP, flags) == Status.INVAL
    assert iommu.domains == {}


def test_attach_bypass_flag_without_bypass_config_negotiated_is_inval(iommu):
    iommu.negotiated = Negotiated(bypass_config=False)
    assert iommu.attach(1, EP, ATTACH_F_BYPASS) == Status.INVAL
    assert iommu.domains == {}
    iommu.negotiated = Negotiated(bypass_config=True)
    assert iommu.attach(1, EP, ATTACH_F_BYPASS) == Status.OK
    assert iommu.domains[1].bypass is True


def test_attach_bypass_flag_is_refused_when_bypass_config_is_not_offered():
    iommu, _ = _iommu(bypass_config=False)  # before any negotiation
    assert iommu.attach(1, EP, ATTACH_F_BYPASS) == Status.INVAL
    assert iommu.domains == {}


@pytest.mark.parametrize("domain", [0, 101, 0xFFFF_FFFF])
def test_attach_domain_out_of_range_is_range(domain):
    iommu, _ = _iommu(domain_start=1, domain_end=100)
    assert iommu.attach(domain, EP, 0) == Status.RANGE
    assert iommu.attach(domain, UNKNOWN_EP, 0) == Status.RANGE  # before NOENT
    assert iommu.domains == {}
    assert iommu.attach(1, EP, 0) == Status.OK
    assert iommu.attach(100, EP2, 0) == Status.OK


def test_attach_unknown_endpoint_is_noent(iommu):
    assert iommu.attach(1, UNKNOWN_EP, 0) == Status.NOENT
    assert iommu.domains == {} and UNKNOWN_EP not in iommu.attached


def test_every_endpoint_exists_without_a_list():
    iommu = PvIommu(IommuConfig())
    assert iommu.attach(1, 0xABCD, 0) == Status.OK
    assert iommu.probe(0x1234)[0] == Status.OK


def test_attach_bypass_mismatch_is_inval(iommu):
    assert iommu.attach(1, EP, 0) == Status.OK
    assert iommu.attach(2, EP2, ATTACH_F_BYPASS) == Status.OK
    before = _state(iommu)
    assert iommu.attach(1, EP3, ATTACH_F_BYPASS) == Status.INVAL
    assert iommu.attach(2, EP3, 0) == Status.INVAL
    assert iommu.attach(2, EP, 0) == Status.INVAL  # also for an attached endpoint
    assert iommu.attach(1, EP, ATTACH_F_BYPASS) == Status.INVAL
    assert _state(iommu) == before
    assert iommu.attach(2, EP3, ATTACH_F_BYPASS) == Status.OK


def test_reattach_moves_the_endpoint_and_drops_the_emptied_domain(iommu):
    assert iommu.attach(1, EP, 0) == Status.OK
    assert iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, RW) == Status.OK
    assert iommu.attach(2, EP, 0) == Status.OK
    assert iommu.attached[EP] == 2
    assert 1 not in iommu.domains
    assert iommu.domains[2].endpoints == {EP}
    # domain 1 really is gone: it can be created afresh, without the old mapping
    assert iommu.map(1, 0x1000, 0x1FFF, 0, RW) == Status.NOENT
    assert iommu.attach(1, EP2, 0) == Status.OK
    assert len(iommu.domains[1].mappings) == 0
    with pytest.raises(DmaFault):
        iommu.translate(EP2, 0x1000, 4, Access.READ)


def test_reattach_keeps_the_old_domain_while_it_has_endpoints(iommu):
    iommu.attach(1, EP, 0)
    iommu.attach(1, EP2, 0)
    iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, RW)
    assert iommu.attach(2, EP, 0) == Status.OK
    assert iommu.domains[1].endpoints == {EP2}
    assert len(iommu.domains[1].mappings) == 1
    with pytest.raises(DmaFault) as info:
        iommu.translate(EP, 0x1000, 4, Access.READ)
    assert info.value.reason == "MAPPING"
    assert iommu.translate(EP2, 0x1000, 4, Access.READ) == [(0x4000_0000, 4)]


def test_reattach_to_the_same_domain_is_ok_and_changes_nothing(iommu):
    iommu.attach(1, EP, 0)
    iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, RW)
    before = _state(iommu)
    assert iommu.attach(1, EP, 0) == Status.OK
    assert _state(iommu) == before


@pytest.mark.parametrize(("domain", "endpoint", "flags", "reserved_zero"), [
    (2, EP, 0, False),             # reserved
    (2, EP, 0x2, True),            # unknown flag
    (0, EP, 0, True),              # out of domain range
    (3, EP, 0, True),              # bypass mismatch with existing bypass domain 3
])
def test_a_failed_attach_changes_nothing(domain, endpoint, flags, reserved_zero):
    iommu, events = _iommu(domain_start=1, domain_end=100)
    iommu.attach(1, EP, 0)
    iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, RW)
    iommu.attach(3, EP2, ATTACH_F_BYPASS)
    before = _state(iommu)
    events.clear()
    assert iommu.attach(domain, endpoint, flags, reserved_zero) != Status.OK
    assert _state(iommu) == before
    assert events == []
    assert iommu.translate(EP, 0x1000, 4, Access.READ) == [(0x4000_0000, 4)]


# -- DETACH --------------------------------------------------------------------------------


def test_detach_unknown_endpoint_is_noent(iommu):
    assert iommu.detach(1, UNKNOWN_EP) == Status.NOENT


def test_detach_not_attached_or_wrong_domain_is_inval(iommu):
    assert iommu.detach(1, EP) == Status.INVAL  # neither domain nor attachment
    iommu.attach(1, EP, 0)
    iommu.attach(2, EP2, 0)
    before = _state(iommu)
    assert iommu.detach(2, EP) == Status.INVAL  # attached elsewhere
    assert iommu.detach(3, EP) == Status.INVAL  # domain does not exist
    assert iommu.detach(1, EP3) == Status.INVAL  # endpoint not attached
    assert _state(iommu) == before


def test_detach_domain_out_of_range():
    iommu, _ = _iommu(domain_start=1, domain_end=100)
    assert iommu.detach(0, EP) == Status.RANGE
    assert iommu.detach(0, UNKNOWN_EP) == Status.NOENT


def test_domain_disappears_with_its_mappings_after_the_last_detach(iommu):
    iommu.attach(1, EP, 0)
    iommu.attach(1, EP2, 0)
    iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, RW)
    assert iommu.detach(1, EP) == Status.OK
    assert iommu.domains[1].endpoints == {EP2}
    assert len(iommu.domains[1].mappings) == 1
    assert EP not in iommu.attached  # unattached endpoints leave no record
    assert iommu.detach(1, EP2) == Status.OK
    assert iommu.domains == {}
    assert iommu.mapping_count == 0
    assert iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, RW) == Status.NOENT
    assert iommu.unmap(1, 0x1000, 0x1FFF) == Status.NOENT
    assert iommu.attach(1, EP, 0) == Status.OK
    assert list(iommu.domains[1].mappings) == []
    # the detached endpoint still exists (it can attach again), unattached
    assert iommu.endpoint_exists(EP2) and EP2 not in iommu.attached


def test_a_detached_endpoint_cannot_use_the_domains_mappings(iommu):
    iommu.attach(1, EP, 0)
    iommu.attach(1, EP2, 0)
    iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, RW)
    iommu.detach(1, EP)
    with pytest.raises(DmaFault) as info:
        iommu.translate(EP, 0x1000, 4, Access.READ)
    assert info.value.reason == "DOMAIN"


# -- MAP -----------------------------------------------------------------------------------


def test_map_and_unmap_need_map_unmap_negotiated(iommu):
    iommu.attach(1, EP, 0)
    iommu.negotiated = Negotiated(map_unmap=False)
    assert iommu.map(1, 0x1000, 0x1FFF, 0, RW) == Status.UNSUPP
    assert iommu.unmap(1, 0x1000, 0x1FFF) == Status.UNSUPP
    assert len(iommu.domains[1].mappings) == 0


@pytest.mark.parametrize("flags", [0x8, 0x10, 0x8000_0000, MAP_F_MMIO, RW | MAP_F_MMIO])
def test_map_unknown_flags_are_inval(iommu, flags):
    iommu.attach(1, EP, 0)
    assert iommu.map(1, 0x1000, 0x1FFF, 0, flags) == Status.INVAL
    assert len(iommu.domains[1].mappings) == 0


def test_map_mmio_with_f_mmio():
    iommu, _ = _iommu(mmio=True)
    assert iommu.negotiated.mmio
    iommu.attach(1, EP, 0)
    assert iommu.map(1, 0x1000, 0x1FFF, 0x0900_0000, RW | MAP_F_MMIO) == Status.OK
    assert iommu.map(1, 0x2000, 0x2FFF, 0x0900_0000, 0x8) == Status.INVAL
    iommu.negotiated = Negotiated(mmio=False)  # offered but not accepted
    assert iommu.map(1, 0x3000, 0x3FFF, 0x0900_0000, MAP_F_MMIO) == Status.INVAL


def test_map_flags_without_permissions_are_allowed(iommu):
    iommu.attach(1, EP, 0)
    assert iommu.map(1, 0x1000, 0x1FFF, 0, 0) == Status.OK
    with pytest.raises(DmaFault):
        iommu.translate(EP, 0x1000, 1, Access.READ)


def test_map_unknown_domain_is_noent(iommu):
    assert iommu.map(7, 0x1000, 0x1FFF, 0, RW) == Status.NOENT


def test_map_domain_out_of_range():
    iommu, _ = _iommu(domain_start=1, domain_end=100)
    assert iommu.map(200, 0x1000, 0x1FFF, 0, RW) == Status.RANGE


def test_map_bypass_domain_is_inval(iommu):
    iommu.attach(1, EP, ATTACH_F_BYPASS)
    assert iommu.map(1, 0x1000, 0x1FFF, 0, RW) == Status.INVAL
    assert len(iommu.domains[1].mappings) == 0


@pytest.mark.parametrize(("vs", "ve", "ps"), [
    (0x1800, 0x1FFF, 0x4000_0000),     # virt_start
    (0x1000, 0x1FFF, 0x4000_0800),     # phys_start
    (0x1000, 0x1FFE, 0x4000_0000),     # virt_end + 1
    (0x1000, 0x2000, 0x4000_0000),     # virt_end + 1
    (0x1001, 0x1001, 0x4000_0001),     # one byte
])
def test_map_misaligned_is_range(iommu, vs, ve, ps):
    iommu.attach(1, EP, 0)
    assert iommu.map(1, vs, ve, ps, RW) == Status.RANGE
    assert len(iommu.domains[1].mappings) == 0


def test_map_alignment_follows_the_smallest_page_size():
    iommu, _ = _iommu(page_size_mask=0x0020_1000 | 0x10000)  # 4K, 64K, 2M: granule 4K
    iommu.attach(1, EP, 0)
    assert iommu.map(1, 0x1000, 0x1FFF, 0x3000, RW) == Status.OK
    iommu, _ = _iommu(page_size_mask=0x10000)  # 64K only
    iommu.attach(1, EP, 0)
    assert iommu.map(1, 0x1000, 0x1FFF, 0x3000, RW) == Status.RANGE
    assert iommu.map(1, 0x10000, 0x1FFFF, 0x30000, RW) == Status.OK


def test_map_end_below_start_is_inval(iommu):
    iommu.attach(1, EP, 0)
    assert iommu.map(1, 0x2000, 0x0FFF, 0x4000_0000, RW) == Status.INVAL


@pytest.mark.parametrize(("vs", "ve"), [
    (0x0, 0xFFF),                   # below
    (0x0, 0x1FFF),                  # straddles the start
    (0xFFFF_F000, 0x1_0000_0FFF),   # straddles the end
    (0x1_0000_0000, 0x1_0000_0FFF),  # above
])
def test_map_outside_the_input_range_is_range(vs, ve):
    iommu, _ = _iommu(input_start=0x1000, input_end=0xFFFF_FFFF)
    iommu.attach(1, EP, 0)
    assert iommu.map(1, vs, ve, 0, RW) == Status.RANGE
    assert iommu.map(1, 0x1000, 0x1FFF, 0, RW) == Status.OK
    assert iommu.map(1, 0xFFFF_F000, 0xFFFF_FFFF, 0, RW) == Status.OK


def test_map_phys_overflow_is_range(iommu):
    iommu.attach(1, EP, 0)
    top = U64_MAX - 0xFFF
    assert iommu.map(1, 0x1000, 0x2FFF, top, RW) == Status.RANGE
    assert iommu.map(1, 0x1000, 0x1FFF, top, RW) == Status.OK  # ends exactly at 2^64 - 1


def test_map_at_the_top_of_the_address_space(iommu):
    iommu.attach(1, EP, 0)
    assert iommu.map(1, U64_MAX - 0xFFF, U64_MAX, 0x4000_0000, RW) == Status.OK
    assert iommu.translate(EP, U64_MAX, 1, Access.READ) == [(0x4000_0FFF, 1)]


@pytest.mark.parametrize(("vs", "ve"), [
    (0x1000, 0x1FFF), (0x0, 0x1FFF), (0x1000, 0x3FFF), (0x0, 0xFFFF), (0x2000, 0x3FFF)])
def test_map_overlapping_an_existing_mapping_is_inval(iommu, vs, ve):
    iommu.attach(1, EP, 0)
    assert iommu.map(1, 0x1000, 0x2FFF, 0x4000_0000, RW) == Status.OK
    assert iommu.map(1, vs, ve, 0x5000_0000, RW) == Status.INVAL
    assert [(m.virt_start, m.virt_end, m.phys_start) for m in iommu.domains[1].mappings] == [
        (0x1000, 0x2FFF, 0x4000_0000)]


def test_map_in_another_domain_does_not_overlap(iommu):
    iommu.attach(1, EP, 0)
    iommu.attach(2, EP2, 0)
    assert iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, RW) == Status.OK
    assert iommu.map(2, 0x1000, 0x1FFF, 0x5000_0000, RW) == Status.OK
    assert iommu.translate(EP2, 0x1000, 1, Access.READ) == [(0x5000_0000, 1)]


@pytest.mark.parametrize(("vs", "ve"), [
    (0x0808_0000, 0x0809_0FFF),  # over the start of the MSI doorbell
    (0x0809_F000, 0x080A_0FFF),  # over its end
    (0x0809_4000, 0x0809_4FFF),  # inside it
    (0x1000_0000, 0x1000_0FFF),  # the user's reserved region
    (0x0000_0000, 0x1FFF_FFFF),  # around both
])
def test_map_overlapping_a_reserved_region_is_inval(vs, ve):
    iommu, _ = _iommu(reserved=[ResvRegion(0x1000_0000, 0x1000_0FFF)])
    iommu.attach(1, EP, 0)
    assert iommu.map(1, vs, ve, 0x4000_0000, RW) == Status.INVAL
    assert len(iommu.domains[1].mappings) == 0
    # right next to them is fine
    assert iommu.map(1, 0x0808_F000, 0x0808_FFFF, 0x4000_0000, RW) == Status.OK
    assert iommu.map(1, 0x080A_0000, 0x080A_0FFF, 0x4000_0000, RW) == Status.OK
    assert iommu.map(1, 0x1000_1000, 0x1000_1FFF, 0x4000_0000, RW) == Status.OK


def test_map_check_order(iommu):
    """Flags before NOENT, NOENT before alignment, alignment before the end check."""
    assert iommu.map(9, 0x1000, 0x1FFF, 0, 0x8) == Status.INVAL
    assert iommu.map(9, 0x1001, 0x1FFF, 0, RW) == Status.NOENT
    iommu.attach(1, EP, ATTACH_F_BYPASS)
    assert iommu.map(1, 0x1001, 0x1FFF, 0, RW) == Status.INVAL  # bypass before alignment
    iommu.attach(2, EP2, 0)
    assert iommu.map(2, 0x1001, 0x0FFF, 0, RW) == Status.RANGE
    assert iommu.map(2, 0x2000, 0x0FFF, 0, RW) == Status.INVAL


# -- UNMAP ---------------------------------------------------------------------------------


@pytest.fixture
def byte_iommu():
    """1-byte granularity, one non-bypass domain 1 with EP attached (spec UNMAP examples)."""
    iommu, _ = _iommu(page_size_mask=U64_MAX)
    assert iommu.attach(1, EP, 0) == Status.OK
    return iommu


def _mapped(iommu, domain=1):
    return [(m.virt_start, m.virt_end) for m in iommu.domains[domain].mappings]


# (maps, unmap, status, what remains); the spec's seven examples and the derived cases
UNMAP_CASES = {
    "1-nothing-mapped": ([], (0, 4), Status.OK, []),
    "2-exact": ([(0, 9)], (0, 9), Status.OK, []),
    "3-two-exact": ([(0, 4), (5, 9)], (0, 9), Status.OK, []),
    "4-split-fails": ([(0, 9)], (0, 4), Status.RANGE, [(0, 9)]),
    "5-first-of-two": ([(0, 4), (5, 9)], (0, 4), Status.OK, [(5, 9)]),
    "6-over-unmapped-space": ([(0, 4)], (0, 9), Status.OK, []),
    "7-over-a-gap": ([(0, 4), (10, 14)], (0, 14), Status.OK, []),
    "4b-second-split-removes-nothing": ([(0, 4), (5, 9)], (0, 7), Status.RANGE,
                                        [(0, 4), (5, 9)]),
    "4c-starts-inside": ([(0, 9)], (5, 14), Status.RANGE, [(0, 9)]),
    "4d-ends-inside": ([(5, 9)], (0, 7), Status.RANGE, [(5, 9)]),
}


@pytest.mark.parametrize(("maps", "rng", "status", "remains"), list(UNMAP_CASES.values()),
                         ids=list(UNMAP_CASES))
def test_unmap_spec_examples(byte_iommu, maps, rng, status, remains):
    for s, e in maps:
        assert byte_iommu.map(1, s, e, 0x4000_0000 + s, RW) == Status.OK
    assert byte_iommu.unmap(1, *rng) == status
    assert _mapped(byte_iommu) == remains


def test_unmap_then_translate_faults(byte_iommu):
    byte_iommu.map(1, 0, 4, 0x4000_0000, RW)
    byte_iommu.map(1, 5, 9, 0x5000_0000, RW)
    assert byte_iommu.unmap(1, 0, 4) == Status.OK
    with pytest.raises(DmaFault):
        byte_iommu.translate(EP, 0, 1, Access.READ)
    assert byte_iommu.translate(EP, 5, 1, Access.READ) == [(0x5000_0000, 1)]


def test_unmap_noent_bypass_and_bad_range(iommu):
    assert iommu.unmap(1, 0x1000, 0x1FFF) == Status.NOENT
    iommu.attach(1, EP, ATTACH_F_BYPASS)
    assert iommu.unmap(1, 0x1000, 0x1FFF) == Status.INVAL
    iommu.attach(2, EP2, 0)
    iommu.map(2, 0x1000, 0x1FFF, 0, RW)
    assert iommu.unmap(2, 0x2000, 0x0FFF) == Status.INVAL
    assert _mapped(iommu, 2) == [(0x1000, 0x1FFF)]


def test_unmap_domain_out_of_range():
    iommu, _ = _iommu(domain_start=1, domain_end=100)
    assert iommu.unmap(101, 0, 0xFFF) == Status.RANGE


def test_unmap_everything(iommu):
    iommu.attach(1, EP, 0)
    for i in range(10):
        iommu.map(1, i * 0x10000, i * 0x10000 + 0xFFF, 0, RW)
    assert iommu.unmap(1, 0, U64_MAX) == Status.OK
    assert _mapped(iommu) == []


# -- PROBE ---------------------------------------------------------------------------------


def test_probe_unknown_endpoint_is_noent(iommu):
    assert iommu.probe(UNKNOWN_EP) == (Status.NOENT, [])


def test_probe_reports_the_msi_doorbell_then_the_users_regions():
    iommu, _ = _iommu(reserved=[ResvRegion(0x1000_0000, 0x1000_FFFF),
                                ResvRegion(0x2000, 0x2FFF, ResvType.RESERVED)])
    status, regions = iommu.probe(EP)
    assert status == Status.OK
    assert regions == [ResvRegion(*MSI, ResvType.MSI),
                       ResvRegion(0x1000_0000, 0x1000_FFFF, ResvType.RESERVED),
                       ResvRegion(0x2000, 0x2FFF, ResvType.RESERVED)]


def test_probe_without_msi_region():
    iommu, _ = _iommu(msi_doorbell=None)
    assert iommu.probe(EP) == (Status.OK, [])
    iommu.attach(1, EP, 0)
    assert iommu.map(1, 0x0809_0000, 0x0809_0FFF, 0x0809_0000, RW) == Status.OK


# -- translation ---------------------------------------------------------------------------


def test_translate_unknown_endpoint_is_unknown_fault(iommu):
    with pytest.raises(DmaFault) as info:
        iommu.translate(UNKNOWN_EP, 0x1000, 4, Access.READ)
    assert (info.value.reason, info.value.endpoint, info.value.address) == (
        "UNKNOWN", UNKNOWN_EP, 0x1000)


def test_translate_unattached_endpoint_is_domain_fault(iommu):
    with pytest.raises(DmaFault) as info:
        iommu.translate(EP, 0x1234, 4, Access.WRITE)
    assert (info.value.reason, info.value.endpoint, info.value.address, info.value.access) == (
        "DOMAIN", EP, 0x1234, Access.WRITE)


def test_translate_global_bypass():
    iommu, _ = _iommu(bypass=True)
    assert iommu.translate(EP, 0x1234, 16, Access.WRITE) == [(0x1234, 16)]
    iommu.attach(1, EP, 0)  # attached: translated, no bypass
    with pytest.raises(DmaFault) as info:
        iommu.translate(EP, 0x1234, 16, Access.WRITE)
    assert info.value.reason == "MAPPING"
    iommu.detach(1, EP)  # back to bypass
    assert iommu.translate(EP, 0x1234, 16, Access.WRITE) == [(0x1234, 16)]
    iommu.bypass = False  # the driver cleared it
    with pytest.raises(DmaFault):
        iommu.translate(EP, 0x1234, 16, Access.WRITE)


def test_global_bypass_holds_when_offered_even_if_not_negotiated():
    """Spec: BYPASS_CONFIG offered, bypass = 1, not attached -> bypass mode, even if the
    driver did not accept BYPASS_CONFIG."""
    iommu, _ = _iommu(bypass=True, bypass_config=True)
    iommu.negotiated = Negotiated(bypass_config=False)
    assert iommu.translate(EP, 0x1234, 16, Access.READ) == [(0x1234, 16)]


def test_global_bypass_needs_bypass_config_offered():
    iommu, _ = _iommu(bypass=True, bypass_config=False)
    with pytest.raises(DmaFault) as info:
        iommu.translate(EP, 0x1234, 16, Access.READ)
    assert info.value.reason == "DOMAIN"


def test_translate_bypass_domain_is_identity(iommu):
    iommu.attach(1, EP, ATTACH_F_BYPASS)
    assert iommu.translate(EP, 0xDEAD_0000, 0x10, Access.WRITE) == [(0xDEAD_0000, 0x10)]


def test_translate_through_mappings(iommu):
    iommu.attach(1, EP, 0)
    iommu.map(1, 0x1000, 0x1FFF, 0x4000_5000, RW)
    assert iommu.translate(EP, 0x1000, 0x1000, Access.READ) == [(0x4000_5000, 0x1000)]
    assert iommu.translate(EP, 0x1FFC, 4, Access.WRITE) == [(0x4000_5FFC, 4)]
    assert iommu.translate(EP, 0x1800, 0, Access.READ) == []


def test_translate_missing_mapping_is_mapping_fault_at_the_first_bad_byte(iommu):
    iommu.attach(1, EP, 0)
    iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, RW)
    with pytest.raises(DmaFault) as info:
        iommu.translate(EP, 0x1F00, 0x200, Access.READ)
    assert (info.value.reason, info.value.address, info.value.endpoint) == (
        "MAPPING", 0x2000, EP)
    with pytest.raises(DmaFault) as info:
        iommu.translate(EP, 0x800, 4, Access.READ)
    assert info.value.address == 0x800


@pytest.mark.parametrize(("flags", "access", "ok"), [
    (MAP_F_READ, Access.READ, True),
    (MAP_F_READ, Access.WRITE, False),       # write through read-only
    (MAP_F_WRITE, Access.READ, False),       # read through write-only
    (MAP_F_WRITE, Access.WRITE, True),
    (MAP_F_WRITE, Access.EXEC, False),
    (MAP_F_READ, Access.EXEC, True),
    (MAP_F_READ, Access.READ | Access.WRITE, False),
    (RW, Access.READ | Access.WRITE, True),
])
def test_translate_permissions(iommu, flags, access, ok):
    iommu.attach(1, EP, 0)
    iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, flags)
    if ok:
        assert iommu.translate(EP, 0x1010, 8, access) == [(0x4000_0010, 8)]
    else:
        with pytest.raises(DmaFault) as info:
            iommu.translate(EP, 0x1010, 8, access)
        assert (info.value.reason, info.value.access, info.value.address) == (
            "MAPPING", access, 0x1010)


def test_translate_across_several_mappings(iommu):
    iommu.attach(1, EP, 0)
    iommu.map(1, 0x1000, 0x1FFF, 0x4000_5000, RW)
    iommu.map(1, 0x2000, 0x3FFF, 0x4000_1000, RW)
    iommu.map(1, 0x4000, 0x4FFF, 0x4000_9000, MAP_F_READ)
    assert iommu.translate(EP, 0x1800, 0x3000, Access.READ) == [
        (0x4000_5800, 0x800), (0x4000_1000, 0x2000), (0x4000_9000, 0x800)]
    with pytest.raises(DmaFault) as info:
        iommu.translate(EP, 0x1800, 0x3000, Access.WRITE)  # the last page is read-only
    assert info.value.address == 0x4000
    iommu.unmap(1, 0x2000, 0x3FFF)
    with pytest.raises(DmaFault) as info:
        iommu.translate(EP, 0x1800, 0x1000, Access.READ)  # a hole in the middle
    assert info.value.address == 0x2000


# -- events and reset ----------------------------------------------------------------------


def test_attach_and_detach_events():
    iommu, events = _iommu()
    iommu.attach(1, EP, 0)
    iommu.attach(1, EP2, 0)
    iommu.attach(2, EP, 0)  # a move: detached from 1, attached to 2
    iommu.detach(2, EP)
    iommu.attach(1, UNKNOWN_EP, 0)  # failed: no event
    iommu.detach(2, EP)  # failed: no event
    assert events == [EndpointAttached(1, EP), EndpointAttached(1, EP2),
                      EndpointDetached(1, EP), EndpointAttached(2, EP), EndpointDetached(2, EP)]


def test_device_reset_drops_domains_and_keeps_bypass():
    iommu, events = _iommu(bypass=False)
    iommu.attach(1, EP, 0)
    iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, RW)
    iommu.attach(2, EP2, ATTACH_F_BYPASS)
    iommu.bypass = True  # the driver wrote bypass = 1
    events.clear()
    iommu.reset()
    assert iommu.domains == {}
    assert iommu.attached == {}
    assert sorted(events, key=lambda e: e.domain) == [EndpointDetached(1, EP),
                                                      EndpointDetached(2, EP2)]
    assert iommu.bypass is True  # unchanged by a device reset
    assert iommu.translate(EP, 0x1000, 4, Access.READ) == [(0x1000, 4)]
    assert iommu.map(1, 0x1000, 0x1FFF, 0, RW) == Status.NOENT


def test_system_reset_restores_the_initial_bypass():
    for initial in (False, True):
        iommu, _ = _iommu(bypass=initial)
        iommu.attach(1, EP, 0)
        iommu.bypass = not initial
        iommu.reset(system=True)
        assert iommu.bypass is initial
        assert iommu.domains == {}


# -- configuration -------------------------------------------------------------------------


def test_config_defaults():
    cfg = IommuConfig()
    assert cfg.page_size_mask == 0xFFFF_FFFF_FFFF_F000
    assert cfg.granule == 0x1000
    assert (cfg.input_start, cfg.input_end) == (0, U64_MAX)
    assert (cfg.domain_start, cfg.domain_end) == (0, 0xFFFF_FFFF)
    assert cfg.probe_size == 512
    assert cfg.resv_regions() == [ResvRegion(*MSI, ResvType.MSI)]
    assert IommuConfig(page_size_mask=0x20_0000 | 0x1_0000).granule == 0x1_0000
    assert IommuConfig(page_size_mask=U64_MAX).granule == 1


@pytest.mark.parametrize("kwargs", [
    {"page_size_mask": 0},
    {"page_size_mask": 1 << 64},
    {"page_size_mask": (1 << 64) | 0x1000},  # does not fit in le64
    {"page_size_mask": -0x1000},
    {"input_start": 0x2000, "input_end": 0x1000},
    {"input_start": -1},
    {"input_end": 1 << 64},
    {"domain_start": 5, "domain_end": 4},
    {"domain_end": 1 << 32},
    {"domain_start": -1},
    {"probe_size": 12},
    {"probe_size": -8},
    {"probe_size": 1 << 32},  # does not fit in le32
    {"probe_size": 16},  # the MSI region (24 bytes) does not fit
    {"probe_size": 48, "reserved": [ResvRegion(0, 0xFFF), ResvRegion(0x2000, 0x2FFF)]},
    {"reserved": [ResvRegion(0x2000, 0x1FFF)]},
    {"reserved": [ResvRegion(0x0809_FFFF, 0x080A_0FFF)]},  # overlaps the MSI doorbell
    {"reserved": [ResvRegion(0, 0xFFF), ResvRegion(0xFFF, 0x1FFF)]},
    {"reserved": [ResvRegion(-0x1000, 0xFFF)]},
    {"reserved": [ResvRegion(U64_MAX - 0xFFF, 1 << 64)]},
    {"msi_doorbell": (0x2000, 0x1000)},
])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        IommuConfig(**kwargs)


def test_config_limits_that_are_valid():
    IommuConfig(probe_size=24)
    IommuConfig(probe_size=0, msi_doorbell=None)
    IommuConfig(probe_size=72, reserved=[ResvRegion(0, 0xFFF), ResvRegion(0x1000, 0x1FFF)])
    IommuConfig(reserved=[ResvRegion(U64_MAX - 0xFFF, U64_MAX)])
    IommuConfig(page_size_mask=U64_MAX, input_start=5, input_end=5, domain_start=7,
                domain_end=7)


# -- resource limits (S_NOMEM) ----------------------------------------------------------------


def test_map_beyond_max_mappings_is_nomem_and_unmap_frees_room():
    iommu, _ = _iommu(max_mappings=2)
    iommu.attach(1, EP, 0)
    iommu.attach(2, EP2, 0)
    assert iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, RW) == Status.OK
    assert iommu.map(2, 0x1000, 0x1FFF, 0x4000_0000, RW) == Status.OK
    before = _state(iommu)
    assert iommu.map(1, 0x2000, 0x2FFF, 0x4000_1000, RW) == Status.NOMEM  # over all domains
    assert _state(iommu) == before
    assert iommu.unmap(2, 0, U64_MAX) == Status.OK
    assert iommu.map(1, 0x2000, 0x2FFF, 0x4000_1000, RW) == Status.OK
    assert iommu.mapping_count == 2


def test_a_dropped_domain_returns_its_mappings_to_the_budget():
    iommu, _ = _iommu(max_mappings=1)
    iommu.attach(1, EP, 0)
    assert iommu.map(1, 0x1000, 0x1FFF, 0x4000_0000, RW) == Status.OK
    iommu.attach(2, EP, 0)  # domain 1 loses its last endpoint and goes away
    assert iommu.map(2, 0x1000, 0x1FFF, 0x4000_0000, RW) == Status.OK
    iommu.reset()
    assert iommu.mapping_count == 0


def test_attach_beyond_max_domains_is_nomem():
    iommu, events = _iommu(max_domains=1)
    assert iommu.attach(1, EP, 0) == Status.OK
    assert iommu.attach(2, EP2, 0) == Status.NOMEM
    assert EP2 not in iommu.attached
    assert iommu.attach(1, EP2, 0) == Status.OK  # an existing domain costs nothing
    assert iommu.attach(2, EP, 0) == Status.NOMEM  # EP stays where it was
    assert iommu.attached[EP] == 1
    assert [type(e) for e in events] == [EndpointAttached, EndpointAttached]


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        IommuConfig(max_mappings=0)
    with pytest.raises(ValueError):
        IommuConfig(max_domains=0)


def test_any_endpoint_mode_keeps_no_record_of_detached_endpoints():
    iommu = PvIommu(IommuConfig())  # every endpoint ID exists
    for ep in range(1000):
        assert iommu.attach(7, ep, 0) == Status.OK
        assert iommu.detach(7, ep) == Status.OK
    assert iommu.attached == {} and iommu.domains == {}
    iommu = PvIommu(IommuConfig(max_domains=1))
    assert iommu.attach(1, 0, 0) == Status.OK
    for ep in range(1, 1000):  # refused attaches leave nothing behind either
        assert iommu.attach(1 + ep, ep, 0) == Status.NOMEM
    assert list(iommu.attached) == [0]
