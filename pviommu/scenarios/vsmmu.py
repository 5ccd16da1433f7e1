"""The vSMMU scenario: the guest's arm-smmu-v3 driver programs stage 1 in QEMU's SMMUv3,
the backend owns stage 2, and the guest's virtio_blk and virtio-rng drivers do DMA
through both.

The backend (started first, stopped last) serves a virtio-blk at 2.0 and a
virtio-rng at 3.0 over vhost-user to stock ``vhost-user-blk-pci`` and
``vhost-user-rng-pci`` (``iommu_platform=on``) behind ``-M virt,iommu=smmuv3``.
The guest reports its SMMU and IOMMU groups, writes and reads the disk (sha256
checked on both sides) and reads the rng. Then the host shows a fault at each
stage: it takes the IPA page under a disk read out of stage 2 (``VSMMU_EVENT``,
an I/O error in the guest; the host maps the page back and the guest reads on),
and it makes the disk do a rogue DMA at an I/O virtual address the guest never
mapped (QEMU's SMMUv3 refuses the miss and the guest's arm-smmu-v3 logs the
event).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..lab import Endpoint, Iommu, Lab, Topology
from ..lab.faults import vsmmu_faults
from ..lab.state import query, vsmmu_state
from ..machine.console import GuestFailed
from ..machine.guestlog import guest_io_errors
from ..machine.topology import pci_name, pci_rid
from ..provision import GuestAssets
from ..qmp.vsmmu import EVENT_VSMMU
from .dma import blk_checks, make_image
from .pv import demo_plan, rng_report
from .runner import ScenarioRun, run_sections, scenario_files

BLK_ADDR = "2.0"
RNG_ADDR = "3.0"
ROGUE_IOVA = 0xDEAD000
"""Where the rogue DMA reads. Linux's IOVA allocator hands out addresses from the top
of the 32-bit space down (0xffffffff first), and the SMMUv3's MSI window
(0x8000000, 1 MiB) is a reserved region: a guest that mapped 0xdead000 would have
about 3.8 GiB of IOVA in use. The read is the check itself: had the guest mapped
it, the DMA translates (``translated`` true), nothing is written, and the demo
fails."""
RNG_BYTES = 4096
STEP_TIMEOUT = 60.0
BOOT_TIMEOUT = 120.0


async def _stage2_fault(lab: Lab, scenario: ScenarioRun, blk: int) -> dict[str, Any]:
    """Takes the IPA page under the guest's next disk read out of stage 2, maps it back
    once the device met the fault, and waits for the guest to read on."""
    since = len(lab.backend_events)
    # A disk read: the device writes guest memory (access "write").
    armed = await query(lab.backend_qmp, "stage2-unmap", {
        "endpoint": blk, "min-size": 4096, "access": "write"})
    event = (await lab.wait_event(EVENT_VSMMU, STEP_TIMEOUT, since))["data"]
    page = event["ipa"] & ~0xFFF
    remapped = await query(lab.backend_qmp, "stage2-map", {"start": page, "size": 4096})
    await scenario.step("IO_RECOVERED", STEP_TIMEOUT)
    return {"armed": armed, "qmp_event": event, "ipa": page, "remapped": remapped}


async def _rogue_dma(lab: Lab, scenario: ScenarioRun, blk: int) -> dict[str, Any]:
    """The disk reads ROGUE_IOVA on its own; the guest must log the stage-1 fault."""
    await scenario.step("S1_WAIT", STEP_TIMEOUT)
    result = await query(lab.backend_qmp, "inject-dma", {
        "endpoint": blk, "address": ROGUE_IOVA, "access": "read", "size": 4})
    await scenario.step("S1_FAULT_SEEN", STEP_TIMEOUT)
    return {"address": ROGUE_IOVA, "access": "read", "result": result}


async def run(qemu: Path, assets: GuestAssets, workdir: Path,
              trace: Path | None = None) -> dict[str, Any]:
    """Runs the vSMMU scenario once in a lab and returns the report (see README: demo
    --json); ``trace`` writes the backend's timeline there."""
    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "disk.img"
    plan = demo_plan()
    host_read_sha = make_image(image, plan)
    blk_ep, rng_ep = pci_rid(BLK_ADDR), pci_rid(RNG_ADDR)
    pci = {blk_ep: pci_name(blk_ep), rng_ep: pci_name(rng_ep)}
    env = {"ENDPOINTS": " ".join(pci.values()), "DISK": "vda",
           "READ_BYTES": plan.read_bytes, "WRITE_OFFSET": plan.write_offset,
           "WRITE_BYTES": plan.write_bytes, "RNG_BYTES": RNG_BYTES,
           "STEP_WAIT": int(STEP_TIMEOUT)}
    topology = Topology(iommu=Iommu(kind="vsmmu"),
                        endpoints=(Endpoint("blk", image=image, address=BLK_ADDR),
                                   Endpoint("rng", address=RNG_ADDR)),
                        files=scenario_files("vsmmu", env, workdir))
    report: dict[str, Any] = {"mode": "vsmmu"}
    lab = Lab(topology, workdir=workdir, qemu=qemu, assets=assets, trace=trace,
              boot_timeout=BOOT_TIMEOUT)
    async with lab:
        client = lab.backend_qmp
        scenario = ScenarioRun(lab, "vsmmu")
        await scenario.start()
        await scenario.step("READY", STEP_TIMEOUT)
        stage2_fault = await _stage2_fault(lab, scenario, blk_ep)
        rogue = await _rogue_dma(lab, scenario, blk_ep)
        done = await scenario.step("DONE", STEP_TIMEOUT)
        kernel_log = await lab.kernel_log()
        events = lab.backend_events
        state = await vsmmu_state(client)
        devices = await query(client, "query-endpoint-devices")
        exit_status = await lab.poweroff(STEP_TIMEOUT)
        console = lab.console

    if (failed := scenario.failed()) is not None:
        raise GuestFailed(f"guest scenario failed: {failed}")
    report["faults"] = vsmmu_faults(kernel_log, events, rogue["result"])
    report["qmp_events"] = [{"event": e["event"], "data": e.get("data", {})} for e in events]
    report["dma"] = blk_checks(console, image, plan, host_read_sha)
    report["rng"] = rng_report(console, RNG_BYTES)
    recovered = console.find("IO_RECOVERED")
    carried_on = console.find("S1_CARRIED_ON")
    stage2_fault["guest_io_error"] = next(iter(guest_io_errors(kernel_log)), None)
    stage2_fault["recovered"] = bool(recovered and
                                     recovered.fields.get("sha256") == host_read_sha)
    rogue["guest_carried_on"] = bool(carried_on and
                                     carried_on.fields.get("sha256") == host_read_sha)
    groups = {m.fields.get("pci"): m.fields for m in console.markers if m.name == "IOMMU_GROUP"}
    smmu = console.find("SMMU")
    report["vsmmu"] = {
        "smmu": smmu.fields if smmu else None,
        **state,
        "iotlb": {str(d["id"]): d.get("iotlb") for d in devices},
        "translation": {str(d["id"]): d.get("translation") for d in devices},
        "stage2_unmap": stage2_fault,
        "rogue_dma": rogue,
    }
    report["endpoints"] = [
        {"id": d["id"], "kind": d["kind"], "pci": pci[d["id"]],
         "iommu_group": groups.get(pci[d["id"]], {}).get("group"),
         "group_type": groups.get(pci[d["id"]], {}).get("type"),
         "stats": d["stats"], "iotlb": d.get("iotlb"),
         "vhost_user_connections": d["connections"]}
        for d in devices]
    disk = console.find("DISK")
    first = groups.get(pci[blk_ep], {})
    report["guest"] = {
        "scenario_rc": int(done.fields.get("rc", "-1")),
        "smmu_driver": smmu.fields.get("driver") if smmu else None,
        "endpoint_pci": pci[blk_ep],
        "iommu_group": first.get("group"),
        "group_type": first.get("type"),
        "disk": disk.fields if disk else None,
        "modules": lab.modules,
        "kernel": str(assets.kernel),
    }
    report["backend"] = {"endpoint_devices": [
        {k: d[k] for k in ("id", "kind", "transport", "mode", "connections", "needs-reset")}
        for d in devices]}
    report.update(run_sections(lab, qemu, exit_status, t0, trace))
    return report


def shows_everything(report: dict[str, Any]) -> bool:
    """Whether a vSMMU report shows what the demo promises: arm-smmu-v3 bound, the
    checksums and the rng, exactly one stage-1 fault (the rogue DMA, logged by the
    guest and refused at stage 1) and one stage-2 fault (the host's record and the
    guest's I/O error), and the guest reading on after each."""
    vs = report["vsmmu"]
    s1 = [f for f in report["faults"] if f.get("stage") == 1]
    s2 = [f for f in report["faults"] if f.get("stage") == 2]
    return bool(
        (vs.get("smmu") or {}).get("driver") == "arm-smmu-v3"
        and report["dma"]["checksums_ok"] and report["rng"]["ok"]
        and len(s1) == 1 and len(s2) == 1
        and s1[0]["address"] == vs["rogue_dma"]["address"] and s1[0]["injected"]
        and s2[0]["io_errors"] and s2[0]["qmp_event"]
        and vs["stage2_unmap"]["recovered"] and vs["rogue_dma"]["guest_carried_on"])
