"""Benchmark: what a storage person measures (fio in the guest) through the backend's
two modes against QEMU's own devices, in the same run.

The paths (:data:`PATHS`):

- ``pv``: the backend's PV-IOMMU (vhost-user) and virtio-blk (vfio-user);
- ``vsmmu``: QEMU's SMMUv3 (the guest's stage 1) and the backend's virtio-blk over
  vhost-user with the backend's stage 2 (nested translation);
- ``builtin`` (the anchor): QEMU's virtio-iommu-pci and virtio-blk-pci;
- ``smmuv3-builtin``: QEMU's SMMUv3 and QEMU's virtio-blk-pci, both in QEMU: what
  the emulated SMMUv3 costs without any process boundary;
- ``qsd``: QEMU's C vhost-user-blk back-end (qemu-storage-daemon's export) behind
  the same machine, but with no IOMMU on its path: the export offers no
  VIRTIO_F_ACCESS_PLATFORM, and QEMU refuses ``iommu_platform=on`` without it.
  The vhost-user transport alone, as a reference for the vSMMU path.

Each round boots one lab (:class:`pviommu.lab.Lab`) per (path, IOMMU mode)
cell, rotating the order of the paths, and the guest runs each workload
(:mod:`.workloads`: fio jobs, one guest command each). On the backend's paths
the round trips to another process are counted around each job (the lab's
counters): MAP and UNMAP requests to the PV-IOMMU; IOTLB MISS, UPDATE and
INVALIDATE messages of the vSMMU endpoint; per I/O. The tables hold the medians
over the rounds and the ratios to the built-in path. A benchmark, not a test:
it asserts nothing, it measures and writes down.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..lab import Endpoint, Iommu, Lab, Topology
from ..machine.console import GuestFailed
from ..machine.fio import fio_files
from ..machine.topology import Device
from ..microbench import CASES, run_micro
from ..provision import GuestAssets
from .bench_report import format_speed, summarize
from .workloads import BY_NAME, HUGE_PAGES, WORKLOADS, Workload, job_result

MiB = 1 << 20
PATHS = ("pv", "vsmmu", "builtin", "smmuv3-builtin", "qsd")
IOMMU_MODES = {"strict": "iommu.strict=1", "lazy": "iommu.strict=0"}
# What counts as a round trip to another process on each of the backend's paths.
ROUND_TRIPS = {"pv": ("map", "unmap"),
               "vsmmu": ("miss", "update", "invalidate")}
LAB_KINDS = {"pv": "pv", "vsmmu": "vsmmu", "builtin": "builtin", "smmuv3-builtin": "smmuv3",
             "qsd": "smmuv3"}
"""The lab's IOMMU kind of each path (qsd's device is added to an SMMUv3 machine)."""
BLK_ADDR = "2.0"
QSD = "qemu-storage-daemon"

@dataclass
class BenchPlan:
    """What each guest runs (fio workloads, seconds each), how many rounds, which paths."""

    workloads: tuple[Workload, ...] = WORKLOADS
    runtime: float = 3.0
    rounds: int = 5
    image_bytes: int = 256 * MiB
    paths: tuple[str, ...] = PATHS
    micro_requests: int = 5000
    """Round trips per case of the backend micro-benchmark run first, for the cost
    model (0: none)."""
    vcpus: int = 1
    """The guest's vCPUs, the same on every path. One by default: on a 2-core host a
    second TCG vCPU leaves the backend no core of its own, and every one of its
    wake-ups then waits for the scheduler (BENCHMARKS.md, the cost model)."""

    @property
    def timeout(self) -> float:
        """How long one job may take before the guest command is interrupted."""
        return self.runtime + 120


@dataclass
class QsdBlkPci(Device):
    """vhost-user-blk-pci served by qemu-storage-daemon, without ``iommu_platform``
    (the daemon's export cannot do it): the device reads guest-physical addresses."""

    socket: Path = Path()
    addr: str = BLK_ADDR
    id: str = "qsdblk"

    def qemu_args(self) -> list[str]:
        return ["-chardev", f"socket,id={self.id},path={self.socket}",
                "-device", f"vhost-user-blk-pci,chardev={self.id},addr={self.addr},"
                "num-queues=1,disable-legacy=on"]


def per_io(deltas: Mapping[str, int], kinds: tuple[str, ...], ios: int) -> dict[str, Any]:
    """A job's round trips per I/O: their sum and each counter's share."""
    n = max(ios, 1)
    return {"round_trips_per_io": round(sum(deltas.get(k, 0) for k in kinds) / n, 2),
            "by_kind": {k: round(v / n, 2) for k, v in sorted(deltas.items()) if v}}


async def prepare_guest(lab: Lab, workloads: tuple[Workload, ...]) -> None:
    """Waits for the guest's disk (/dev/vda) and reserves the huge pages the workloads
    need."""
    await lab.run("for i in $(seq 50); do test -b /dev/vda && break; sleep 0.1; done; "
                  "test -b /dev/vda", check=True)
    if any(w.huge for w in workloads):
        await lab.run(f"echo {HUGE_PAGES} > /proc/sys/vm/nr_hugepages", check=True)


async def run_workloads(lab: Lab, plan: BenchPlan, kinds: tuple[str, ...] = ()
                        ) -> list[dict[str, Any]]:
    """Runs the plan's workloads in ``lab``'s guest, one fio job each, and counts the
    backend's round trips of ``kinds`` around each (when the lab has a backend)."""
    await prepare_guest(lab, plan.workloads)
    out = []
    for w in plan.workloads:
        before = await lab.counters()
        result = await lab.run(w.command(plan.runtime, plan.image_bytes), plan.timeout)
        after = await lab.counters()
        if not result.ok:
            raise GuestFailed(f"bench {w.name}: fio failed with status {result.status}: "
                              f"{result.output.strip()[-500:]} (log {lab.console_log})")
        row = {"workload": w.name, **job_result(result.output)}
        if kinds:
            row.update(per_io({k: after.get(k, 0) - before.get(k, 0)
                               for k in set(after) | set(before)}, kinds, row["ios"]))
        out.append(row)
    return out


def cell_topology(path: str, image: Path, strict: bool, vcpus: int = 1) -> Topology:
    """The machine of one path: its IOMMU kind, ``vcpus`` and the shared disk at 2.0."""
    kind = LAB_KINDS[path]
    modules = ("virtio_iommu", "virtio_blk") if kind in ("pv", "builtin") else ("virtio_blk",)
    endpoints = (Endpoint("blk", image=image, address=BLK_ADDR),) if path != "qsd" else ()
    return Topology(iommu=Iommu(kind=kind, strict=strict), endpoints=endpoints,
                    load_modules=modules, files=fio_files(), memory=1 << 30, vcpus=vcpus)


async def _run_qsd(lab_args: dict[str, Any], image: Path, topology: Topology,
                   plan: BenchPlan) -> list[dict[str, Any]]:
    """qemu-storage-daemon's export of ``image``, plugged into a lab as a device of its
    own (``qemu_args``)."""
    daemon = shutil.which(QSD)
    assert daemon is not None
    workdir: Path = lab_args["workdir"]
    workdir.mkdir(parents=True, exist_ok=True)
    socket = workdir / "qsd.sock"
    with open(workdir / "qsd.log", "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            daemon,
            "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=off",
            "--blockdev", "driver=raw,node-name=fmt0,file=file0",
            "--export", "type=vhost-user-blk,id=exp0,node-name=fmt0,writable=on,"
            f"addr.type=unix,addr.path={socket}",
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise GuestFailed(f"{QSD} did not listen (log {workdir / 'qsd.log'})")
            await asyncio.sleep(0.05)
        async with Lab(topology, qemu_args=QsdBlkPci(socket=socket).qemu_args(),
                       **lab_args) as lab:
            return await run_workloads(lab, plan)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def run_cell(path: str, qemu: Path, assets: GuestAssets, workdir: Path, image: Path,
                   strict: bool, plan: BenchPlan, trace: Path | None = None
                   ) -> list[dict[str, Any]]:
    """Boots one guest of ``path`` and runs the plan's tests in it."""
    topology = cell_topology(path, image, strict, plan.vcpus)
    lab_args: dict[str, Any] = {"workdir": workdir, "qemu": qemu, "assets": assets}
    if path == "qsd":
        return await _run_qsd(lab_args, image, topology, plan)
    async with Lab(topology, trace=trace if path in ROUND_TRIPS else None, **lab_args) as lab:
        return await run_workloads(lab, plan, ROUND_TRIPS.get(path, ()))


def available_paths(paths: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The paths this machine can run, and why each other one is left out."""
    skipped = {}
    if "qsd" in paths and shutil.which(QSD) is None:
        skipped["qsd"] = f"{QSD} is not installed (Debian: qemu-system-common)"
    return tuple(p for p in paths if p not in skipped), skipped


def rotate(paths: tuple[str, ...], rnd: int) -> tuple[str, ...]:
    """The order of the paths in round ``rnd``: each round starts one further on,
    so that no path always runs first (or last) on a warm machine."""
    k = rnd % len(paths)
    return paths[k:] + paths[:k]


async def run(qemu: Path, assets: GuestAssets, workdir: Path, plan: BenchPlan | None = None,
              progress: Any = None, trace: Path | None = None) -> dict[str, Any]:
    """Runs every round and returns the raw samples and the table of medians; with
    ``trace``, each cell of a backend's path writes its timeline beside it
    (FILE-rROUND-MODE-PATH.json)."""
    plan = plan or BenchPlan()
    paths, skipped = available_paths(plan.paths)
    if progress is not None:
        for path, why in skipped.items():
            progress(f"path {path} left out: {why}")
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "disk.img"
    with open(image, "wb") as fh:
        fh.truncate(plan.image_bytes)
    samples: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    t0 = time.monotonic()
    micro = None
    if plan.micro_requests:
        if progress is not None:
            progress(f"backend micro-benchmark ({plan.micro_requests} round trips a case)")
        micro = await asyncio.to_thread(run_micro, plan.micro_requests, ("any",),
                                        max(1000, plan.micro_requests // 2), CASES, workdir)
    for rnd in range(plan.rounds):
        for mode in IOMMU_MODES:
            for path in rotate(paths, rnd):
                cell = workdir / f"r{rnd}-{mode}-{path}"
                cell_trace = (trace.with_name(f"{trace.stem}-r{rnd}-{mode}-{path}{trace.suffix}")
                              if trace is not None else None)
                results = await run_cell(path, qemu, assets, cell, image, mode == "strict",
                                         plan, cell_trace)
                for r in results:
                    samples.setdefault((path, mode, r["workload"]), []).append(r)
                if progress is not None:
                    progress(f"round {rnd + 1}/{plan.rounds} {mode:6} {path:14} " + ", ".join(
                        f"{r['workload']} {format_speed(r, BY_NAME[r['workload']])}"
                        for r in results))
    return {"table": summarize(samples, plan.workloads, paths), "rounds": plan.rounds,
            "paths": list(paths), "skipped_paths": skipped,
            "workloads": [w.name for w in plan.workloads], "runtime_s": plan.runtime,
            "vcpus": plan.vcpus,
            "machine": machine_description(), "qemu": str(qemu),
            "qsd": _qsd_version(), "kernel": str(assets.kernel), "micro": micro,
            "elapsed_s": round(time.monotonic() - t0, 1)}


def _qsd_version() -> str | None:
    daemon = shutil.which(QSD)
    if daemon is None:
        return None
    try:
        out = subprocess.run([daemon, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines()[0] if out.stdout else None


def machine_description() -> dict[str, Any]:
    """Where the numbers were taken."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "os": platform.platform()}
