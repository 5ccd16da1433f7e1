"""The benchmark's guest workloads: fio jobs, and what a job's JSON report says.

Each workload is one fio job on the guest's /dev/vda: direct I/O with libaio,
time-based. 4 KiB random reads and writes at queue depth 1 and 16; 1 MiB
sequential reads and writes with the I/O buffers in the guest's huge pages
(``--iomem=shmhuge``: a buffer is physically contiguous, so the number of MAPs
per request is fixed) and in ordinary memory (the fragmented case: as many MAPs
as the buffer has discontiguous pieces).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..machine.fio import fio_json

KiB = 1 << 10
MiB = 1 << 20
HUGE_PAGES = 64
"""2 MiB huge pages the guest reserves for the huge-page workloads (128 MiB)."""


@dataclass(frozen=True)
class Workload:
    """One fio job: its pattern (``rw``), block size, queue depth, and whether its
    buffers are in huge pages."""

    name: str
    rw: str
    bs: int
    iodepth: int
    huge: bool = False

    @property
    def reads(self) -> bool:
        """Whether the job reads (the device writes guest memory)."""
        return "read" in self.rw

    def command(self, runtime: float, size: int) -> str:
        """The guest's fio command line, reporting JSON."""
        iomem = "shmhuge" if self.huge else "malloc"
        return (f"fio --name={self.name} --filename=/dev/vda --rw={self.rw} --bs={self.bs} "
                f"--iodepth={self.iodepth} --ioengine=libaio --direct=1 --iomem={iomem} "
                f"--size={size} --time_based --runtime={runtime:g} "
                "--randrepeat=0 --norandommap --output-format=json")


WORKLOADS = (
    Workload("randread-4k-qd1", "randread", 4 * KiB, 1),
    Workload("randread-4k-qd16", "randread", 4 * KiB, 16),
    Workload("randwrite-4k-qd1", "randwrite", 4 * KiB, 1),
    Workload("randwrite-4k-qd16", "randwrite", 4 * KiB, 16),
    Workload("read-1m-huge", "read", MiB, 1, huge=True),
    Workload("write-1m-huge", "write", MiB, 1, huge=True),
    Workload("read-1m", "read", MiB, 1),
    Workload("write-1m", "write", MiB, 1),
)
BY_NAME = {w.name: w for w in WORKLOADS}


def job_result(output: str) -> dict[str, Any]:
    """What a workload's fio report says: IOPS, MiB/s, I/Os done, and completion
    latency percentiles in µs (p50, p90, p99)."""
    job = fio_json(output)["jobs"][0]
    side = job["read"] if job["read"]["total_ios"] else job["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})

    def us(key: str) -> float | None:
        value = pct.get(key)
        return round(value / 1000, 1) if value is not None else None
    return {"iops": round(side["iops"], 1), "mib_s": round(side["bw_bytes"] / MiB, 2),
            "ios": side["total_ios"], "clat_p50_us": us("50.000000"),
            "clat_p90_us": us("90.000000"), "clat_p99_us": us("99.000000")}
