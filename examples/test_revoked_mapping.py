"""PV mode: the host takes a live mapping away while the guest reads its disk.

The guest's virtio_iommu driver logs the fault the PV-IOMMU reports, the read
fails with an I/O error, and the next read, through fresh mappings, works.
"""

import pytest

from pviommu.lab import Lab

READ = "dd if=/dev/vda of=/dev/null bs=4096 count=16 iflag=direct"


@pytest.mark.lab("topologies/pv.toml")
async def test_a_revoked_mapping_faults_and_the_guest_recovers(lab: Lab) -> None:
    disk = lab.endpoint("blk")
    assert (await lab.run(READ)).ok
    # The next DMA of the disk that writes guest memory (a read) loses its mapping.
    await lab.backend_qmp.execute("revoke-mapping", {
        "endpoint": disk.endpoint_id, "min-size": 4096, "access": "write"})
    assert not (await lab.run(READ)).ok
    [fault] = await lab.faults()
    # virtio_iommu logs "page fault from EP 16 at 0x... [W]".
    assert fault["endpoint"] == disk.endpoint_id and fault["reason"] == "page"
    assert fault["qmp_event"] is not None and fault["io_errors"]
    assert (await lab.run(READ)).ok
