"""How many MAP and UNMAP requests does a 4 KiB direct read cost the guest's
virtio-iommu driver, with strict invalidation and with lazy?"""

from pytest import approx

from pviommu.lab import Iommu, Lab, Topology

READS = 256


async def requests_per_read(lab: Lab) -> dict[str, float]:
    before = await lab.counters()
    await lab.run(f"dd if=/dev/vda of=/dev/null bs=4096 count={READS} iflag=direct",
                  check=True)
    after = await lab.counters()
    return {kind: (after.get(kind, 0) - before.get(kind, 0)) / READS
            for kind in ("map", "unmap")}


async def test_maps_per_read_strict_and_lazy(make_lab) -> None:
    strict = await requests_per_read(await make_lab(Topology(iommu=Iommu(strict=True))))
    lazy = await requests_per_read(await make_lab(Topology(iommu=Iommu(strict=False))))
    print(f"per 4 KiB read: strict {strict}, lazy {lazy}")
    # Every buffer of a request (header, data, status...) is mapped for the request
    # and unmapped after it, in both modes: lazy only defers the IOTLB flush.
    maps = round(strict["map"])
    assert maps >= 1
    for mode in (strict, lazy):
        assert mode["map"] == approx(maps, abs=0.05) and mode["unmap"] == approx(maps, abs=0.05)
