"""The backend micro-benchmark: a real ``pviommu serve`` driven by minimal blocking
clients (a vhost-user front-end, a vfio-user client), one request in flight at a
time, against the machine's wake-up floor (an eventfd ping-pong between two
processes, measured in the same run).

Cases: MAP/UNMAP on the PV-IOMMU's request queue; a 4 KiB virtio-blk read over
vfio-user, doorbell (a posted REGION_WRITE) to the MSI-X interrupt; in vSMMU mode
a 4 KiB read over vhost-user with the IOTLB warm, INVALIDATE round trips, and a
strict read whose IOTLB MISS/UPDATE round trips are timed one by one. Each is
run unpinned, with client and backend on two CPUs, and on one.

    result = run_micro(requests=20000)
    print(markdown(result))

``python -m pviommu.microbench`` does that (``--help`` for its options).
"""

from .run import CASES, markdown, run_micro

__all__ = ["CASES", "markdown", "run_micro"]
