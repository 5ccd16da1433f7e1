"""The DMA scenario: a guest reads and writes a virtio-blk disk behind an IOMMU.

The host writes random data into a fresh image, the guest reads it and reports
its sha256; the guest writes random data and reports its sha256, which the host
checks in the image after QEMU has exited. Mode "builtin" is the anchor: QEMU's
own virtio-iommu-pci and virtio-blk-pci.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..lab import Endpoint, Iommu, Lab, Topology
from ..lab.state import query
from ..machine.console import Console, GuestFailed
from ..machine.guestlog import guest_faults
from ..provision import GuestAssets
from .runner import ScenarioRun, run_sections, scenario_files

MODES = ("builtin",)
MiB = 1 << 20


@dataclass
class DmaPlan:
    """Sizes of the image and of the guest's read and write."""

    image_bytes: int = 64 * MiB
    read_bytes: int = 8 * MiB
    write_offset: int = 32 * MiB
    write_bytes: int = 8 * MiB


@dataclass
class Timeouts:
    """Seconds the host waits for each stage (TCG on 2 shared cores is slow)."""

    boot: float = 120
    scenario: float = 600
    shutdown: float = 60


def _sha256_file_range(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = length
        while left:
            chunk = fh.read(min(left, MiB))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def make_image(image: Path, plan: DmaPlan) -> str:
    """Writes a fresh image whose first ``read_bytes`` are random; returns their sha256."""
    payload = os.urandom(plan.read_bytes)
    with open(image, "wb") as fh:
        fh.write(payload)
        fh.truncate(plan.image_bytes)
    return hashlib.sha256(payload).hexdigest()


def blk_checks(console: Console, image: Path, plan: DmaPlan, host_read_sha: str
               ) -> dict[str, Any]:
    """The report's ``dma`` section: the guest's READ/WRITE markers against the image.

    Call it once QEMU has exited, so that the image holds what the guest wrote.
    """
    read = console.find("READ")
    write = console.find("WRITE")
    if read is None or write is None:
        raise GuestFailed("guest did not report its DMA (no READ/WRITE marker)")
    guest_read_sha = read.fields.get("sha256", "")
    guest_write_sha = write.fields.get("sha256", "")
    host_write_sha = _sha256_file_range(image, plan.write_offset, plan.write_bytes)
    read_ok = guest_read_sha == host_read_sha
    write_ok = guest_write_sha == host_write_sha
    return {
        "bytes_read": int(read.fields.get("bytes", "0")),
        "bytes_written": int(write.fields.get("bytes", "0")),
        "checksums_ok": read_ok and write_ok,
        "read": {"guest_sha256": guest_read_sha, "host_sha256": host_read_sha, "ok": read_ok},
        "write": {"guest_sha256": guest_write_sha, "host_sha256": host_write_sha,
                  "ok": write_ok},
    }


async def run(qemu: Path, assets: GuestAssets, workdir: Path, *, mode: str = "builtin",
              plan: DmaPlan | None = None, timeouts: Timeouts | None = None,
              trace: Path | None = None) -> dict[str, Any]:
    """Runs the scenario once in a lab and returns the report (see README: demo --json).
    ``trace`` is accepted for symmetry with the backend's modes: QEMU's own devices
    leave no backend trace."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    plan = plan or DmaPlan()
    timeouts = timeouts or Timeouts()
    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)

    image = workdir / "disk.img"
    host_read_sha = make_image(image, plan)
    env = {"DISK": "vda", "READ_BYTES": plan.read_bytes,
           "WRITE_OFFSET": plan.write_offset, "WRITE_BYTES": plan.write_bytes}
    topology = Topology(iommu=Iommu(kind=mode),
                        endpoints=(Endpoint("blk", image=image, address="2.0"),),
                        files=scenario_files("anchor-dma", env, workdir))
    report: dict[str, Any] = {"mode": mode}
    lab = Lab(topology, workdir=workdir, qemu=qemu, assets=assets, boot_timeout=timeouts.boot)
    async with lab:
        scenario = ScenarioRun(lab, "anchor-dma")
        await scenario.start()
        status = await query(lab.qemu_qmp, "query-status")
        pci = await query(lab.qemu_qmp, "query-pci")
        done = await scenario.step("DONE", timeouts.scenario)
        kernel_log = await lab.kernel_log()
        exit_status = await lab.poweroff(timeouts.shutdown)
        console = lab.console

    if (failed := scenario.failed()) is not None:
        raise GuestFailed(f"guest scenario failed: {failed}")
    report["dma"] = blk_checks(console, image, plan, host_read_sha)
    group = console.find("IOMMU_GROUP")
    report["faults"] = guest_faults(kernel_log)
    report["guest"] = {
        "scenario_rc": int(done.fields.get("rc", "-1")),
        "iommu_group": None if group is None or group.fields.get("group") == "none"
        else group.fields.get("group"),
        "disk_pci": group.fields.get("pci") if group else None,
        "modules": lab.modules,
        "kernel": str(assets.kernel),
    }
    report["qemu"] = {
        "binary": str(qemu),
        "status": status.get("status"),
        "pci_devices": [
            {"slot": d["slot"], "function": d["function"],
             "vendor": d["id"]["vendor"], "device": d["id"]["device"],
             "description": d.get("qdev_id") or d.get("class_info", {}).get("desc", "")}
            for bus in pci for d in bus["devices"]
        ],
        "exit_status": exit_status,
    }
    sections = run_sections(lab, qemu, exit_status, t0)
    report["timings"], report["logs"] = sections["timings"], sections["logs"]
    return report
