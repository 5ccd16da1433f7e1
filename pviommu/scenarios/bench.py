"""Benchmark: guest sequential disk throughput through the backend's PV path against
QEMU's built-in virtio-iommu-pci + virtio-blk-pci (the anchor), in the same run.

Each round boots one guest per (path, IOMMU mode) cell, alternating the paths,
and the guest times direct-I/O ``dd`` runs of each block size. The table holds
the medians over the rounds and the ratio of the PV path to the built-in one.
A benchmark, not a test: it asserts nothing, it measures and writes down.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backend import Backend, BackendConfig
from ..endpoints import EndpointSpec
from ..machine.console import Console, GuestFailed
from ..machine.guest_image import build_initramfs
from ..machine.qemu import QemuMachine
from ..machine.topology import Topology, VirtioBlkPci, VirtioIommuPci, pci_rid
from ..provision import GuestAssets
from . import pv

MiB = 1 << 20
PATHS = ("pv", "builtin")
IOMMU_MODES = {"strict": "iommu.strict=1", "lazy": "iommu.strict=0"}


@dataclass
class BenchPlan:
    """What each guest runs: (op, block size, bytes) triples, and how many rounds."""

    tests: list[tuple[str, int, int]] = field(default_factory=lambda: [
        ("read", 4096, 8 * MiB), ("read", MiB, 256 * MiB),
        ("write", 4096, 8 * MiB), ("write", MiB, 256 * MiB)])
    rounds: int = 7
    image_bytes: int = 512 * MiB
    timeout: float = 600


def _initramfs(out: Path, assets: GuestAssets, plan: BenchPlan) -> None:
    tests = " ".join(f"{op}:{bs}:{n}" for op, bs, n in plan.tests)
    build_initramfs(out, busybox=assets.busybox, modules_dir=assets.modules,
                    modules=["virtio_iommu", "virtio_blk"], scenario="bench-blk",
                    env={"DISK": "vda", "TESTS": tests})


def _seen(console: Console, name: str, n: int) -> Callable[[], bool]:
    return lambda: sum(m.name == name for m in console.markers) >= n


async def _boot(qemu: Path, topology: Topology, workdir: Path, plan: BenchPlan,
                iommu_requests: Callable[[], int] | None = None) -> list[dict[str, Any]]:
    """Boots the bench guest; with ``iommu_requests`` (a counter of the PV-IOMMU's
    MAP and UNMAP requests) also counts those made during each test."""
    vm = QemuMachine(qemu, topology, workdir, log_file=workdir / "console.log")
    timeout = plan.timeout
    per_test: list[int] = []
    async with vm:
        console = vm.console
        assert console is not None
        for i in range(len(plan.tests) if iommu_requests is not None else 0):
            await console.wait_until(_seen(console, "BENCH_GO", i + 1), "BENCH_GO", timeout)
            before = iommu_requests()  # type: ignore[misc]
            await console.wait_until(_seen(console, "BENCH", i + 1), "BENCH", timeout)
            per_test.append(iommu_requests() - before)  # type: ignore[misc]
        await console.wait_marker("DONE", timeout)
        await vm.wait_exit(60)
    if (failed := console.find("FAIL")) is not None:
        raise GuestFailed(f"bench guest failed: {failed.fields.get('reason', '?')} "
                          f"(log {workdir / 'console.log'})")
    out = []
    for i, m in enumerate(m for m in console.markers if m.name == "BENCH"):
        centis = max(int(m.fields["centis"]), 1)
        mib = int(m.fields["bytes"]) / MiB
        result: dict[str, Any] = {"op": m.fields["op"], "bs": int(m.fields["bs"]),
                                  "mib_s": mib / (centis / 100)}
        if i < len(per_test):
            result["iommu_requests_per_mib"] = round(per_test[i] / mib, 1)
        out.append(result)
    return out


async def _run_builtin(qemu: Path, assets: GuestAssets, workdir: Path, initrd: Path,
                       image: Path, append: str, plan: BenchPlan) -> list[dict[str, Any]]:
    topology = Topology(kernel=assets.kernel, initrd=initrd, append=append,
                        devices=[VirtioIommuPci(addr="1.0"),
                                 VirtioBlkPci(image=image, addr=pv.BLK_ADDR)])
    return await _boot(qemu, topology, workdir, plan)


async def _run_pv(qemu: Path, assets: GuestAssets, workdir: Path, initrd: Path,
                  image: Path, append: str, plan: BenchPlan) -> list[dict[str, Any]]:
    spec = EndpointSpec("blk", workdir / "blk.sock", pci_rid(pv.BLK_ADDR), image=image)
    config = BackendConfig(viommu_socket=workdir / "viommu.sock", endpoints=[],
                           devices=[spec])
    async with Backend(config) as backend:
        requests = backend.device.requests

        def map_unmap() -> int:
            return sum(n for (kind, _), n in requests.items() if kind in ("MAP", "UNMAP"))
        topology = await pv.pv_topology(qemu, assets, initrd, workdir, config.viommu_socket,
                                        append, pv.endpoint_devices([spec]))
        return await _boot(qemu, topology, workdir, plan, map_unmap)


async def run(qemu: Path, assets: GuestAssets, workdir: Path, plan: BenchPlan | None = None,
              progress: Any = None) -> dict[str, Any]:
    """Runs every round and returns the raw samples and the table of medians."""
    plan = plan or BenchPlan()
    workdir.mkdir(parents=True, exist_ok=True)
    initrd = workdir / "initramfs.cpio.gz"
    _initramfs(initrd, assets, plan)
    image = workdir / "disk.img"
    with open(image, "wb") as fh:
        fh.truncate(plan.image_bytes)
    samples: dict[tuple[str, str, str, int], list[float]] = {}
    iommu_load: dict[tuple[str, str, int], list[float]] = {}
    t0 = time.monotonic()
    for rnd in range(plan.rounds):
        for mode, arg in IOMMU_MODES.items():
            # Alternate which path goes first, so that neither always runs warm.
            order = PATHS if rnd % 2 == 0 else PATHS[::-1]
            for path in order:
                cell = workdir / f"r{rnd}-{mode}-{path}"
                cell.mkdir(exist_ok=True)
                append = f"console=ttyAMA0 panic=-1 quiet {arg}"
                runner = _run_pv if path == "pv" else _run_builtin
                results = await runner(qemu, assets, cell, initrd, image, append, plan)
                for r in results:
                    samples.setdefault((path, mode, r["op"], r["bs"]), []).append(r["mib_s"])
                    if "iommu_requests_per_mib" in r:
                        iommu_load.setdefault((mode, r["op"], r["bs"]), []).append(
                            r["iommu_requests_per_mib"])
                if progress is not None:
                    progress(f"round {rnd + 1}/{plan.rounds} {mode:6} {path:7} " + ", ".join(
                        f"{r['op']} {r['bs']}: {r['mib_s']:.1f} MiB/s" for r in results))
    table = []
    for mode in IOMMU_MODES:
        for op, bs, _ in plan.tests:
            pvs = samples.get(("pv", mode, op, bs), [])
            builtin = samples.get(("builtin", mode, op, bs), [])
            if not pvs or not builtin:
                continue
            m_pv, m_b = statistics.median(pvs), statistics.median(builtin)
            table.append({"iommu": mode, "op": op, "bs": bs, "pv_mib_s": round(m_pv, 2),
                          "builtin_mib_s": round(m_b, 2), "ratio": round(m_pv / m_b, 3),
                          "pv_samples": [round(x, 2) for x in pvs],
                          "builtin_samples": [round(x, 2) for x in builtin],
                          "pv_iommu_requests_per_mib": iommu_load.get((mode, op, bs), [])})
    return {"table": table, "rounds": plan.rounds,
            "tests": [{"op": op, "bs": bs, "bytes": n} for op, bs, n in plan.tests],
            "machine": machine_description(), "qemu": str(qemu),
            "kernel": str(assets.kernel), "elapsed_s": round(time.monotonic() - t0, 1)}


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
        return "?"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB"


def markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    lines = ["| IOMMU | op | block | PV path MiB/s | built-in MiB/s | ratio "
             "| PV-IOMMU MAP+UNMAP per MiB |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for row in result["table"]:
        flag = "" if row["ratio"] >= 0.8 else " (below 0.8)"
        lines.append(f"| {row['iommu']} | {row['op']} | {_size(row['bs'])} | "
                     f"{row['pv_mib_s']:.1f} | {row['builtin_mib_s']:.1f} | "
                     f"{row['ratio']:.2f}{flag} | {_load(row['pv_iommu_requests_per_mib'])} |")
    return "\n".join(lines)
