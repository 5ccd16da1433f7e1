"""The wiring's adapter of the vhost-user device IOTLB to the nested translator's stage 1:
the transport's errors become the IOMMU layer's."""

from __future__ import annotations

import re

import pytest

from pviommu.endpoints import IotlbStage1
from pviommu.iommu.faults import Access
from pviommu.iommu.nested import Stage1Refused, Stage1Unavailable
from pviommu.transport.vhost_user.iotlb import (
    IotlbError,
    IotlbMissRefused,
    IotlbProtocolError,
    IotlbTimeout,
)


class _Iotlb:
    def __init__(self, error: IotlbError | None) -> None:
        self.generation = 7
        self.error = error
        self.asked: list[tuple[int, int]] = []

    def lookup(self, iova: int, length: int, access: Access | int
               ) -> list[tuple[int, int]] | None:
        return [(0x4000_0000 + iova, length)]

    async def fill(self, iova: int, access: Access | int) -> None:
        self.asked.append((iova, int(access)))
        if self.error is not None:
            raise self.error


async def test_lookup_generation_and_a_fill_go_to_the_iotlb() -> None:
    iotlb = _Iotlb(None)
    stage1 = IotlbStage1(iotlb)  # type: ignore[arg-type]
    assert stage1.lookup(0x1000, 8, Access.READ) == [(0x4000_1000, 8)]
    await stage1.fill(0x2000, Access.WRITE)
    assert iotlb.asked == [(0x2000, int(Access.WRITE))]
    iotlb.generation = 8
    assert stage1.generation == 8


@pytest.mark.parametrize(("error", "expected"), [
    (IotlbMissRefused(0x3000, Access.READ), Stage1Refused),
    (IotlbTimeout("no answer"), Stage1Unavailable),
    (IotlbProtocolError("acked without an UPDATE"), Stage1Unavailable),
])
async def test_iotlb_errors_become_stage1_errors(error: IotlbError, expected: type) -> None:
    stage1 = IotlbStage1(_Iotlb(error))  # type: ignore[arg-type]
    with pytest.raises(expected, match=re.escape(str(error))):
        await stage1.fill(0x3000, Access.READ)
