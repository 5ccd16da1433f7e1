"""PV mode: MAP/UNMAP round trips on the PV-IOMMU's request queue (vhost-user), and a
4 KiB virtio-blk read over vfio-user, doorbell to completion interrupt.

One ``pviommu serve`` with the PV-IOMMU and a blk endpoint (00:02.0). The client
plays QEMU and the guest: it shares guest RAM over both transports, attaches the
endpoint to a domain that maps all of guest RAM to itself (so the blk requests
translate through the PV-IOMMU), and then times one request in flight at a time.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

from ..devices.viommu import RequestType
from ..iommu.mappings import MAP_F_READ, MAP_F_WRITE
from .guest import GuestRam, Ring
from .served import ServedBackend
from .timing import timed
from .vfio_user import VfioUserClient
from .vhost_user import VhostUserClient

ENDPOINT = 0x10  # 00:02.0
DOMAIN = 1
RAM_SIZE = 4 << 20
BENCH_IOVA = 0x1_0000_0000  # outside the identity map of guest RAM
MAP = struct.Struct("<B3xIQQQI")
UNMAP = struct.Struct("<B3xIQQ4x")
ATTACH = struct.Struct("<B3xIII4x")
BLK_HEADER = struct.Struct("<IIQ")  # type (IN = 0), reserved, sector
BLK_IN = 0


class PvGuest:
    """Guest RAM shared with the PV-IOMMU and the blk endpoint, and the driver side of
    the IOMMU's request queue and the blk queue."""

    def __init__(self, viommu: Path, blk: Path) -> None:
        self.ram = GuestRam(RAM_SIZE)
        gpa = self.ram.gpa
        self.iommu = VhostUserClient(viommu)
        self.iommu.negotiate()
        self.iommu.set_mem_table(self.ram)
        to_uaddr = self.ram.uaddr - gpa
        self.req = Ring(self.ram, gpa, 16)
        self.evt = Ring(self.ram, gpa + 0x1000, 8)
        self.req_fds = self.iommu.start_vring(0, self.req, to_uaddr)
        self.iommu.start_vring(1, self.evt, to_uaddr)
        self.status = gpa + 0x2000  # one 4-byte tail per chain, 16 bytes apart
        self.heads: dict[str, int] = {}
        self._chain("attach", ATTACH.pack(RequestType.ATTACH, DOMAIN, ENDPOINT, 0), 0)
        self._chain("identity", MAP.pack(RequestType.MAP, DOMAIN, gpa, gpa + RAM_SIZE - 1,
                                         gpa, MAP_F_READ | MAP_F_WRITE), 1)
        self._chain("map", MAP.pack(RequestType.MAP, DOMAIN, BENCH_IOVA, BENCH_IOVA + 0xFFF,
                                    gpa + 0x100000, MAP_F_READ | MAP_F_WRITE), 2)
        self._chain("unmap", UNMAP.pack(RequestType.UNMAP, DOMAIN, BENCH_IOVA,
                                        BENCH_IOVA + 0xFFF), 3)
        self.iommu_request("attach")
        self.iommu_request("identity")
        self.blk = VfioUserClient(blk)
        self.blk.version()
        self.blk.dma_map(self.ram)
        self.blk_ring = Ring(self.ram, gpa + 0x4000, 16)
        self.blk.probe(self.blk_ring)
        self.blk_status = gpa + 0x6000
        self.ram.write(gpa + 0x5000, BLK_HEADER.pack(BLK_IN, 0, 0))
        self.blk_head = self.blk_ring.chain([(gpa + 0x5000, BLK_HEADER.size, False),
                                             (gpa + 0x10000, 4096, True),
                                             (self.blk_status, 1, True)])

    def _chain(self, name: str, request: bytes, slot: int) -> None:
        at = self.ram.gpa + 0x3000 + 64 * slot
        self.ram.write(at, request)
        self.heads[name] = self.req.chain([(at, len(request), False),
                                           (self.status + 16 * slot, 4, True)])

    def iommu_request(self, name: str) -> int:
        """One request on the PV-IOMMU's request queue; returns its round trip (ns)."""
        head = self.heads[name]
        self.req.post(head)
        t0 = time.perf_counter_ns()
        self.req_fds.kick_ring()
        self.req_fds.wait_call()
        rtt = time.perf_counter_ns() - t0
        done = self.req.completed()
        status = self.ram.mem[self.status - self.ram.gpa + 16 * (head // 2)]
        if len(done) != 1 or done[0][0] != head or status:
            raise RuntimeError(f"PV-IOMMU {name}: completed {done}, status {status}")
        return rtt

    def blk_read(self) -> int:
        """One 4 KiB read of sector 0: doorbell to MSI-X interrupt; its round trip (ns)."""
        self.ram.mem[self.blk_status - self.ram.gpa] = 0xFF
        self.blk_ring.post(self.blk_head)
        t0 = time.perf_counter_ns()
        self.blk.doorbell()
        self.blk.wait_interrupt()
        rtt = time.perf_counter_ns() - t0
        done = self.blk_ring.completed()
        status = self.ram.mem[self.blk_status - self.ram.gpa]
        if len(done) != 1 or status:
            raise RuntimeError(f"virtio-blk read: completed {done}, status {status}")
        return rtt

    def close(self) -> None:
        self.blk.close()
        self.iommu.close()
        self.ram.close()


def pv_command(workdir: Path) -> tuple[list[str], list[Path]]:
    """The serve arguments of the PV backend, and its sockets."""
    viommu, blk, image = workdir / "viommu.sock", workdir / "blk.sock", workdir / "disk.img"
    image.write_bytes(bytes(1 << 20))
    return (["--viommu", str(viommu), "--blk", f"{blk},endpoint=00:02.0,image={image}"],
            [viommu, blk])


def run_pv(workdir: Path, requests: int, placements: tuple[str, ...],
           profile: Path | None = None) -> list[dict[str, Any]]:
    """MAP/UNMAP and vfio-user blk rows, one per placement each."""
    args, sockets = pv_command(workdir)
    if profile is not None:  # cProfile sees the main thread only: keep the queue there
        args.append("--no-kick-thread")
    rows = []
    with ServedBackend(args, sockets, workdir / "serve-pv.log", profile) as served:
        guest = PvGuest(*sockets)
        try:
            for placement in placements:
                rows.append(timed("PV-IOMMU MAP/UNMAP (vhost-user)", placement, served.pid,
                                  requests, lambda i: guest.iommu_request(
                                      "map" if i % 2 == 0 else "unmap"), trips=1))
            if profile is None:
                for placement in placements:
                    rows.append(timed("virtio-blk 4 KiB read, doorbell to MSI-X (vfio-user)",
                                      placement, served.pid, requests,
                                      lambda i: guest.blk_read(), trips=1))
        finally:
            guest.close()
    return rows
