"""vSMMU mode: a 4 KiB virtio-blk read over vhost-user with ACCESS_PLATFORM, and the
device-IOTLB round trips it drives: MISS (back-end channel) answered with UPDATE
(main socket, acked) and then the MISS ack, and INVALIDATE (acked).

One ``pviommu serve --vsmmu-blk``. The client plays QEMU behind its SMMUv3: the
rings and buffers are at IOVAs (here equal to their guest-physical addresses,
stage 1 mapping all of guest RAM to itself), and every MISS is answered from
that stage 1. Three phases per placement:

- warm: the IOTLB holds every page, no IOTLB message per request;
- INVALIDATE alone: of a page the IOTLB does not hold, back to back;
- strict: as a strict guest unmaps after each request, the header, data and
  status buffers are invalidated after each read (3 INVALIDATEs; the header and
  status share a page), so each read misses twice.
"""

from __future__ import annotations

import select
import struct
import time
from pathlib import Path
from typing import Any

from ..transport.vhost_user import protocol as p
from .guest import GuestRam, Ring
from .served import ServedBackend
from .stats import summary, take_eventfd, wait_fd
from .timing import timed
from .vhost_user import VhostUserClient, ack_backend_request, read_message

RAM_SIZE = 4 << 20
PAGE = 0x1000
BLK_HEADER = struct.Struct("<IIQ")
UNCACHED_IOVA = 0x2_0000_0000


class VsmmuGuest:
    """Guest RAM shared with a vSMMU blk endpoint, its blk queue at IOVAs, and QEMU's
    side of the device IOTLB."""

    def __init__(self, blk: Path) -> None:
        self.ram = GuestRam(RAM_SIZE)
        gpa = self.ram.gpa
        self.fe = VhostUserClient(blk)
        self.fe.negotiate()
        self.channel = self.fe.backend_channel()
        self.fe.set_mem_table(self.ram)
        self.ring = Ring(self.ram, gpa, 16)
        self.fds = self.fe.start_vring(0, self.ring, 0)  # IOVAs, equal to the GPAs
        self.header, self.status, self.data = gpa + 0x2000, gpa + 0x2100, gpa + 0x3000
        self.ram.write(self.header, BLK_HEADER.pack(0, 0, 0))
        self.head = self.ring.chain([(self.header, BLK_HEADER.size, False),
                                     (self.data, 4096, True), (self.status, 1, True)])
        self.poller = select.poll()
        self.poller.register(self.fds.call, select.POLLIN)
        self.poller.register(self.channel.fileno(), select.POLLIN)
        self.cycles: list[int] = []  # MISS received to the backend's next message, ns
        self.updates: list[int] = []  # UPDATE sent to its ack, ns
        self.misses = 0

    def _answer_miss(self) -> None:
        request, flags, payload = read_message(self.channel)
        msg = p.IotlbMsg.unpack(payload)
        if request != p.BackendRequest.IOTLB_MSG or msg.type != p.IotlbType.MISS:
            raise RuntimeError(f"back-end channel: request {request}, IOTLB type {msg.type}")
        page = msg.iova & ~(PAGE - 1)
        ok = self.ram.gpa <= page < self.ram.gpa + self.ram.size
        if ok:
            t0 = time.perf_counter_ns()
            self.fe.update(page, PAGE, self.ram.uaddr + page - self.ram.gpa)
            self.updates.append(time.perf_counter_ns() - t0)
        ack_backend_request(self.channel, p.BackendRequest.IOTLB_MSG, 0 if ok else 1)

    def blk_read(self) -> int:
        """One 4 KiB read, every MISS answered; its round trip, kick to call (ns)."""
        self.ram.mem[self.status - self.ram.gpa] = 0xFF
        self.ring.post(self.head)
        call, clock = self.fds.call, time.perf_counter_ns
        miss_at = 0
        t0 = clock()
        self.fds.kick_ring()
        while True:
            ready = wait_fd(self.poller)
            now = clock()
            if any(fd == call for fd, _ in ready) and take_eventfd(call):
                break
            if miss_at:
                self.cycles.append(now - miss_at)
            miss_at = now
            self.misses += 1
            self._answer_miss()
        rtt = now - t0
        if miss_at:
            self.cycles.append(now - miss_at)
        done = self.ring.completed()
        status = self.ram.mem[self.status - self.ram.gpa]
        if len(done) != 1 or status:
            raise RuntimeError(f"vSMMU virtio-blk read: completed {done}, status {status}")
        return rtt

    def invalidate(self, iova: int) -> int:
        """One INVALIDATE of the page at ``iova``; its round trip (ns)."""
        t0 = time.perf_counter_ns()
        self.fe.invalidate(iova, PAGE)
        return time.perf_counter_ns() - t0

    def strict_read(self, invalidations: list[int]) -> int:
        """A read, then the INVALIDATEs of a strict guest's three unmaps (their round
        trips go to ``invalidations``); returns the read's round trip (ns)."""
        rtt = self.blk_read()
        for iova in (self.header, self.data, self.status):
            invalidations.append(self.invalidate(iova))
        return rtt

    def close(self) -> None:
        self.channel.close()
        self.fe.close()
        self.ram.close()


def run_vsmmu(workdir: Path, requests: int, placements: tuple[str, ...]
              ) -> list[dict[str, Any]]:
    """The warm read, INVALIDATE alone, and the strict read with its MISS cycles, UPDATE
    and INVALIDATE round trips: rows per placement."""
    sock, image = workdir / "vsmmu-blk.sock", workdir / "vsmmu-disk.img"
    image.write_bytes(bytes(1 << 20))
    rows: list[dict[str, Any]] = []
    args = ["--vsmmu-blk", f"{sock},endpoint=00:02.0,image={image}"]
    with ServedBackend(args, [sock], workdir / "serve-vsmmu.log") as served:
        guest = VsmmuGuest(sock)
        try:
            for placement in placements:
                rows += _placement(guest, served.pid, requests, placement)
        finally:
            guest.close()
    return rows


def _placement(guest: VsmmuGuest, pid: int, requests: int, placement: str
               ) -> list[dict[str, Any]]:
    rows = [timed("vSMMU virtio-blk 4 KiB read, IOTLB warm (vhost-user)", placement, pid,
                  requests, lambda i: guest.blk_read(), trips=1),
            timed("vSMMU IOTLB INVALIDATE alone", placement, pid, requests,
                  lambda i: guest.invalidate(UNCACHED_IOVA + PAGE * (i % 64)), trips=1)]
    strict_n = max(1, requests // 5)
    invalidations: list[int] = []

    def forget_warmup() -> None:
        guest.cycles, guest.updates, guest.misses = [], [], 0
        invalidations.clear()
    strict = timed("vSMMU virtio-blk 4 KiB read, strict (misses, then 3 INVALIDATEs)",
                   placement, pid, strict_n, lambda i: guest.strict_read(invalidations),
                   forget_warmup)
    misses = guest.misses / strict_n
    strict.update(misses_per_read=misses, trips=1 + 2 * misses)
    # CPU of one miss: the strict read's, less a warm read's and three INVALIDATEs'.
    miss_cpu = (strict["backend_cpu_us"] - rows[0]["backend_cpu_us"]
                - 3 * rows[1]["backend_cpu_us"]) / misses if misses else 0.0
    derived = {"placement": placement, "derived_from": strict["case"]}
    return rows + [
        strict,
        {"case": "vSMMU IOTLB MISS cycle (MISS, UPDATE+ack, MISS ack, next message)",
         **derived, **summary(guest.cycles), "trips": 2, "backend_cpu_us": miss_cpu},
        {"case": "vSMMU IOTLB UPDATE (answering a MISS)", **derived,
         **summary(guest.updates), "trips": 1},
        {"case": "vSMMU IOTLB INVALIDATE (strict, after a read)", **derived,
         **summary(invalidations), "trips": 1}]
