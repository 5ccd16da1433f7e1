"""The one fault vocabulary: typed reasons and stages, the record a translator raises."""

import pytest

from pviommu.devices.viommu import fault_record
from pviommu.dma import Access as DmaAccess
from pviommu.dma import DmaFault as DmaDmaFault
from pviommu.iommu.faults import Access, DmaFault, Fault, FaultReason, Stage
from pviommu.iommu.pv import PvIommu


def test_the_pv_iommu_raises_a_typed_fault():
    iommu = PvIommu(endpoints=[0x10])
    with pytest.raises(DmaFault) as info:
        iommu.translate(0x10, 0x1234, 4, Access.WRITE)
    assert info.value.fault == Fault(0x10, 0x1234, Access.WRITE, FaultReason.DOMAIN)
    assert type(info.value.reason) is FaultReason and info.value.stage is None
    assert str(info.value) == "DOMAIN fault endpoint 0x10 at 0x1234 (WRITE)"
    with pytest.raises(DmaFault) as info:
        iommu.translate(0x99, 0, 1, Access.READ)
    assert info.value.reason is FaultReason.UNKNOWN


def test_the_dma_layer_reexports_the_same_types():
    assert DmaAccess is Access and DmaDmaFault is DmaFault


def test_a_nested_fault_names_its_stage():
    fault = Fault(0x10, 0x8000, Access.READ, FaultReason.F_PERMISSION, Stage.S2)
    assert str(fault) == "F_PERMISSION fault endpoint 0x10 at 0x8000 (READ) at stage 2"
    assert FaultReason("F_TRANSLATION") is FaultReason.F_TRANSLATION


@pytest.mark.parametrize(("reason", "code"), [
    (FaultReason.UNKNOWN, 0), (FaultReason.DOMAIN, 1), (FaultReason.MAPPING, 2),
    (FaultReason.F_TRANSLATION, 0)])
def test_the_virtio_iommu_record_encodes_the_reason(reason, code):
    record = fault_record(Fault(0x18, 0x1000, Access.READ | Access.WRITE, reason))
    assert record[0] == code
    assert record[4:8] == (0x103).to_bytes(4, "little")  # READ | WRITE | ADDRESS
