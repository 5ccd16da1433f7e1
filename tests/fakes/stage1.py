"""A guest stage 1 as the nested translator sees it through the device IOTLB.

:class:`FakeStage1` behaves like :class:`~pviommu.transport.vhost_user.iotlb.DeviceIotlb`
behind QEMU's SMMUv3: ``tables`` is the guest's stage 1 (iova page -> IPA page);
nothing is at hand until a fill fetches it (as an IOTLB MISS would), a fill of a
page the tables lack raises ``Stage1Refused`` (QEMU acks the MISS with 1), and
:meth:`invalidate` is the guest's TLB invalidation arriving from QEMU.
"""

from __future__ import annotations

from pviommu.iommu.faults import Access
from pviommu.iommu.nested import Stage1Refused, Stage1Unavailable

PAGE = 0x1000


class FakeStage1:
    """The guest's stage-1 tables and the IOTLB entries fetched from them."""

    def __init__(self) -> None:
        self.tables: dict[int, int] = {}
        self.present: dict[int, tuple[int, int]] = {}  # iova page -> (ipa page, access)
        self.generation = 0
        self.fills: list[tuple[int, int]] = []
        self.unavailable = False

    def map(self, iova: int, ipa: int, size: int = PAGE) -> None:
        """The guest maps ``[iova, iova+size)`` to IPA ``ipa`` in its stage 1."""
        for off in range(0, size, PAGE):
            self.tables[iova + off] = ipa + off

    def unmap(self, iova: int, size: int = PAGE) -> None:
        """The guest unmaps and invalidates (QEMU sends INVALIDATE)."""
        for off in range(0, size, PAGE):
            self.tables.pop(iova + off, None)
        self.invalidate(iova, size)

    def invalidate(self, iova: int = 0, size: int = 0) -> None:
        """INVALIDATE: size 0 drops everything."""
        if size == 0:
            self.present.clear()
        else:
            for page in [p for p in self.present if iova <= p < iova + size]:
                del self.present[page]
        self.generation += 1

    def lookup(self, iova: int, length: int, access: Access | int
               ) -> list[tuple[int, int]] | None:
        out: list[tuple[int, int]] = []
        addr, end = iova, iova + length
        while addr < end:
            page = addr & ~(PAGE - 1)
            entry = self.present.get(page)
            if entry is None or entry[1] & int(access) != int(access):
                return None
            n = min(end, page + PAGE) - addr
            out.append((entry[0] + addr - page, n))
            addr += n
        return out

    async def fill(self, iova: int, access: Access | int) -> None:
        page = iova & ~(PAGE - 1)
        self.fills.append((page, int(access)))
        if self.unavailable:
            raise Stage1Unavailable(f"cannot fill IOVA {iova:#x}: no backend channel")
        ipa = self.tables.get(page)
        if ipa is None:
            raise Stage1Refused(f"the guest's stage 1 refuses IOVA {iova:#x} "
                                f"({Access(int(access)).name})")
        old = self.present.get(page)
        bits = int(access) | (old[1] if old is not None and old[0] == ipa else 0)
        self.present[page] = (ipa, bits)
