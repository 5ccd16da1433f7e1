"""Benchmark: guest sequential disk throughput through the backend's two modes
against QEMU's own devices, in the same run.

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
cell, rotating the order of the paths, and the guest times direct-I/O ``dd``
runs of each block size, one guest command each. On the backend's paths the
round trips to another process are counted around each ``dd`` (the lab's
counters): MAP and UNMAP requests to the PV-IOMMU; IOTLB MISS, UPDATE and
INVALIDATE messages of the vSMMU endpoint. The table holds the medians over the rounds and
the ratios to the built-in path. A benchmark, not a test: it asserts nothing,
it measures and writes down.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..lab import Endpoint, Iommu, Lab, Topology
from ..machine.console import GuestFailed
from ..machine.topology import Device
from ..provision import GuestAssets

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

Counters = Callable[[], Mapping[str, int]]


@dataclass
class BenchPlan:
    """What each guest runs: (op, block size, bytes) triples, how many rounds, which paths."""

    tests: list[tuple[str, int, int]] = field(default_factory=lambda: [
        ("read", 4096, 8 * MiB), ("read", MiB, 256 * MiB),
        ("write", 4096, 8 * MiB), ("write", MiB, 256 * MiB)])
    rounds: int = 7
    image_bytes: int = 512 * MiB
    timeout: float = 600
    paths: tuple[str, ...] = PATHS


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


def _seconds_command(op: str, bs: int, nbytes: int) -> str:
    """The guest command of one test: a direct-I/O ``dd``, timed by the guest's own
    clock (1/100 s), printing the elapsed centiseconds."""
    count = nbytes // bs
    io = (f"dd if=/dev/vda of=/dev/null bs={bs} count={count} iflag=direct" if op == "read"
          else f"dd if=/dev/zero of=/dev/vda bs={bs} count={count} oflag=direct")
    clock = "tr -d . < /proc/uptime | cut -d' ' -f1"
    return f"t0=$({clock}); {io} 2>/dev/null || exit 1; t1=$({clock}); echo $((t1 - t0))"


def per_mib(deltas: Mapping[str, int], kinds: tuple[str, ...], mib: float) -> dict[str, Any]:
    """A test's round trips per MiB moved: their sum and each kind's share."""
    return {"round_trips_per_mib": round(sum(deltas.get(k, 0) for k in kinds) / mib, 1),
            "by_kind": {k: round(n / mib, 1) for k, n in sorted(deltas.items())}}


async def run_tests(lab: Lab, plan: BenchPlan, kinds: tuple[str, ...] = ()
                    ) -> list[dict[str, Any]]:
    """Runs the plan's tests in ``lab``'s guest, one command each, and counts the
    backend's round trips of ``kinds`` around each (when the lab has a backend)."""
    out = []
    await lab.run("test -b /dev/vda || sleep 2; test -b /dev/vda", check=True)
    for op, bs, nbytes in plan.tests:
        before = await lab.counters()
        result = await lab.run(_seconds_command(op, bs, nbytes), plan.timeout)
        if not result.ok:
            raise GuestFailed(f"bench {op} {bs}: the guest's dd failed ({result.output.strip()}; "
                              f"log {lab.console_log})")
        after = await lab.counters()
        centis = max(int(result.output.split()[-1]), 1)
        mib = nbytes / MiB
        row: dict[str, Any] = {"op": op, "bs": bs, "mib_s": mib / (centis / 100)}
        if kinds:
            row.update(per_mib({k: after.get(k, 0) - before.get(k, 0)
                                for k in set(after) | set(before)}, kinds, mib))
        out.append(row)
    return out


def cell_topology(path: str, image: Path, strict: bool) -> Topology:
    """The machine of one path: its IOMMU kind and the shared disk at 2.0."""
    kind = LAB_KINDS[path]
    modules = ("virtio_iommu", "virtio_blk") if kind in ("pv", "builtin") else ("virtio_blk",)
    endpoints = (Endpoint("blk", image=image, address=BLK_ADDR),) if path != "qsd" else ()
    return Topology(iommu=Iommu(kind=kind, strict=strict), endpoints=endpoints,
                    load_modules=modules)


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
            return await run_tests(lab, plan)
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
    topology = cell_topology(path, image, strict)
    lab_args: dict[str, Any] = {"workdir": workdir, "qemu": qemu, "assets": assets}
    if path == "qsd":
        return await _run_qsd(lab_args, image, topology, plan)
    async with Lab(topology, trace=trace if path in ROUND_TRIPS else None, **lab_args) as lab:
        return await run_tests(lab, plan, ROUND_TRIPS.get(path, ()))


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


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def summarize(samples: dict[tuple[str, str, str, int], list[float]],
              loads: dict[tuple[str, str, str, int], list[dict[str, Any]]],
              tests: list[tuple[str, int, int]], paths: tuple[str, ...]) -> list[dict[str, Any]]:
    """The table: per (IOMMU mode, op, block) the medians of every path, the ratios
    to the built-in path, and the round trips per MiB of the backend's paths.

    The keys of the first table (``pv_mib_s``, ``builtin_mib_s``, ``ratio``,
    ``pv_samples``, ``builtin_samples``, ``pv_iommu_requests_per_mib``) are kept;
    ``paths`` holds every path's numbers."""
    table = []
    for mode in IOMMU_MODES:
        for op, bs, _ in tests:
            cells: dict[str, Any] = {}
            builtin = _median(samples.get(("builtin", mode, op, bs), []))
            for path in paths:
                values = samples.get((path, mode, op, bs), [])
                if not values:
                    continue
                med = _median(values)
                cell: dict[str, Any] = {
                    "mib_s": med, "samples": [round(x, 2) for x in values],
                    "ratio": round(med / builtin, 3) if builtin and med is not None else None}
                if path in ROUND_TRIPS:
                    load = loads.get((path, mode, op, bs), [])
                    cell["round_trips"] = "+".join(ROUND_TRIPS[path])
                    cell["round_trips_per_mib"] = [x["round_trips_per_mib"] for x in load]
                    cell["by_kind"] = [x["by_kind"] for x in load]
                cells[path] = cell
            if not cells:
                continue
            row: dict[str, Any] = {"iommu": mode, "op": op, "bs": bs, "paths": cells}
            if "pv" in cells and "builtin" in cells:
                row.update({"pv_mib_s": cells["pv"]["mib_s"], "builtin_mib_s": builtin,
                            "ratio": cells["pv"]["ratio"],
                            "pv_samples": cells["pv"]["samples"],
                            "builtin_samples": cells["builtin"]["samples"],
                            "pv_iommu_requests_per_mib": cells["pv"]["round_trips_per_mib"]})
            if "vsmmu" in cells and "qsd" in cells:
                row["vsmmu_to_qsd"] = round(cells["vsmmu"]["mib_s"] / cells["qsd"]["mib_s"], 3)
            table.append(row)
    return table


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
    samples: dict[tuple[str, str, str, int], list[float]] = {}
    loads: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    t0 = time.monotonic()
    for rnd in range(plan.rounds):
        for mode in IOMMU_MODES:
            for path in rotate(paths, rnd):
                cell = workdir / f"r{rnd}-{mode}-{path}"
                cell_trace = (trace.with_name(f"{trace.stem}-r{rnd}-{mode}-{path}{trace.suffix}")
                              if trace is not None else None)
                results = await run_cell(path, qemu, assets, cell, image, mode == "strict",
                                         plan, cell_trace)
                for r in results:
                    key = (path, mode, r["op"], r["bs"])
                    samples.setdefault(key, []).append(r["mib_s"])
                    if "round_trips_per_mib" in r:
                        loads.setdefault(key, []).append(r)
                if progress is not None:
                    progress(f"round {rnd + 1}/{plan.rounds} {mode:6} {path:14} " + ", ".join(
                        f"{r['op']} {r['bs']}: {r['mib_s']:.1f} MiB/s" for r in results))
    return {"table": summarize(samples, loads, plan.tests, paths), "rounds": plan.rounds,
            "paths": list(paths), "skipped_paths": skipped,
            "tests": [{"op": op, "bs": bs, "bytes": n} for op, bs, n in plan.tests],
            "machine": machine_description(), "qemu": str(qemu),
            "qsd": _qsd_version(), "kernel": str(assets.kernel),
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


def _load(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB"


def _speed(cell: dict[str, Any] | None) -> str:
    return "-" if cell is None or cell["mib_s"] is None else f"{cell['mib_s']:.1f}"


def _ratio(cell: dict[str, Any] | None) -> str:
    if cell is None or cell.get("ratio") is None:
        return "-"
    flag = "" if cell["ratio"] >= 0.8 else " (below 0.8)"
    return f"{cell['ratio']:.2f}{flag}"


def markdown(result: dict[str, Any]) -> str:
    """The three-way table (PV, vSMMU, built-in) as Markdown."""
    lines = ["| IOMMU | op | block | PV MiB/s | vSMMU MiB/s | built-in MiB/s "
             "| PV / built-in | vSMMU / built-in | PV MAP+UNMAP per MiB "
             "| vSMMU MISS+UPDATE+INVALIDATE per MiB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["table"]:
        cells = row["paths"]
        pv_, vs = cells.get("pv"), cells.get("vsmmu")
        lines.append(
            f"| {row['iommu']} | {row['op']} | {_size(row['bs'])} | {_speed(pv_)} | "
            f"{_speed(vs)} | {_speed(cells.get('builtin'))} | {_ratio(pv_)} | {_ratio(vs)} | "
            f"{_load(pv_['round_trips_per_mib'] if pv_ else [])} | "
            f"{_load(vs['round_trips_per_mib'] if vs else [])} |")
    return "\n".join(lines)


def markdown_references(result: dict[str, Any]) -> str:
    """The vSMMU path against QEMU's own SMMUv3 paths: its built-in virtio-blk
    behind the SMMUv3, and its C vhost-user-blk back-end (without IOMMU)."""
    lines = ["| IOMMU | op | block | vSMMU MiB/s | built-in blk behind SMMUv3 MiB/s "
             "| qemu-storage-daemon, no IOMMU, MiB/s | vSMMU / qemu-storage-daemon |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for row in result["table"]:
        cells = row["paths"]
        to_qsd = row.get("vsmmu_to_qsd")
        lines.append(
            f"| {row['iommu']} | {row['op']} | {_size(row['bs'])} | "
            f"{_speed(cells.get('vsmmu'))} | {_speed(cells.get('smmuv3-builtin'))} | "
            f"{_speed(cells.get('qsd'))} | {'-' if to_qsd is None else f'{to_qsd:.2f}'} |")
    return "\n".join(lines)


def markdown_samples(result: dict[str, Any]) -> str:
    """Every path's per-round samples (MiB/s) and round trips per MiB."""
    paths = result.get("paths", list(PATHS))
    head = "| IOMMU | op | block | " + " | ".join(paths) + " | PV MAP+UNMAP per MiB " \
           "| vSMMU MISS+UPDATE+INVALIDATE per MiB |"
    lines = [head, "| " + " | ".join(["---"] * (len(paths) + 5)) + " |"]

    def fmt(values: list[float]) -> str:
        return ", ".join(f"{x:.1f}" if x < 10 else f"{x:.0f}" for x in values) or "-"
    for row in result["table"]:
        cells = row["paths"]
        lines.append(
            f"| {row['iommu']} | {row['op']} | {_size(row['bs'])} | "
            + " | ".join(fmt(cells[p]["samples"]) if p in cells else "-" for p in paths)
            + " | " + " | ".join(fmt(cells[p]["round_trips_per_mib"]) if p in cells else "-"
                                 for p in ("pv", "vsmmu")) + " |")
    return "\n".join(lines)
