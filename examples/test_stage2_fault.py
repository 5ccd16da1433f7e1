"""vSMMU mode: the host takes an IPA page out of stage 2 under a disk read.

The backend records a stage-2 event (QMP VSMMU_EVENT, an SMMUv3 event record),
the guest's read fails, and once the page is mapped back the guest reads on.
"""

import pytest

from pviommu.lab import Lab

READ = "dd if=/dev/vda of=/dev/null bs=4096 count=16 iflag=direct"


@pytest.mark.lab("topologies/vsmmu.toml")
async def test_stage2_fault_reaches_host_and_guest(lab: Lab) -> None:
    disk = lab.endpoint("blk")
    assert (await lab.run(READ)).ok
    seen = len(lab.backend_events)
    await lab.backend_qmp.execute("stage2-unmap", {
        "endpoint": disk.endpoint_id, "min-size": 4096, "access": "write"})
    assert not (await lab.run(READ)).ok
    event = await lab.wait_event("VSMMU_EVENT", since=seen)
    assert event["data"]["stream-id"] == disk.endpoint_id
    [fault] = [f for f in await lab.faults() if f.get("stage") == 2]
    assert fault["source"] == "host" and fault["io_errors"]
    await lab.backend_qmp.execute("stage2-map", {"start": event["data"]["ipa"] & ~0xFFF,
                                                 "size": 4096})
    assert (await lab.run(READ)).ok
