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

import asyncio
import time
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from ..backend import EVENT_NEEDS_RESET, Backend, BackendConfig
from ..endpoints import EndpointSpec
from ..lab.faults import vsmmu_faults
from ..lab.state import vsmmu_state
from ..machine.console import Console, GuestFailed
from ..machine.guest_image import build_initramfs
from ..machine.guestlog import guest_io_errors
from ..machine.qemu import QemuMachine
from ..machine.topology import Topology, VhostUserBlkPci, VhostUserRngPci, pci_name, pci_rid
from ..provision import GuestAssets
from ..qmp.vsmmu import EVENT_VSMMU
from .dma import blk_checks, make_image
from .pv import backend_qmp, demo_plan, rng_report, wait_step

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


def endpoint_specs(workdir: Path, image: Path) -> list[EndpointSpec]:
    """The backend's vSMMU endpoints: virtio-blk on ``image``, virtio-rng."""
    return [EndpointSpec("blk", workdir / "blk.sock", pci_rid(BLK_ADDR), image=image,
                         transport="vhost-user"),
            EndpointSpec("rng", workdir / "rng.sock", pci_rid(RNG_ADDR),
                         transport="vhost-user")]


def vsmmu_topology(assets: GuestAssets, initrd: Path, specs: list[EndpointSpec],
                   append: str = "console=ttyAMA0 panic=-1 quiet") -> Topology:
    """The virt machine with QEMU's SMMUv3 and the backend's blk and rng behind it
    (``specs`` as :func:`endpoint_specs` makes them)."""
    blk, rng = specs
    return Topology(kernel=assets.kernel, initrd=initrd, append=append, iommu="smmuv3",
                    devices=[VhostUserBlkPci(socket=blk.socket, addr=BLK_ADDR),
                             VhostUserRngPci(socket=rng.socket, addr=RNG_ADDR)])


async def _qmp_event(listener: EventListener, name: str, console: Console,
                     timeout: float) -> dict[str, Any]:
    """The data of the next QMP event ``name``; GuestFailed if the guest gave up first."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise GuestFailed(f"no {name} from the backend within {timeout:.0f}s")
        try:
            event = await asyncio.wait_for(listener.get(), min(left, 1.0))
        except TimeoutError:
            if (failed := console.find("FAIL")) is not None:
                raise GuestFailed(f"guest scenario failed: {failed.fields.get('reason', '?')}"
                                  f" (waiting for {name})") from None
            continue
        if event["event"] == name:
            return dict(event.get("data", {}))


async def _stage2_fault(client: QMPClient, events: EventListener, console: Console,
                        resets: EventListener, blk: int) -> dict[str, Any]:
    """Takes the IPA page under the guest's next disk read out of stage 2, maps it back
    once the device met the fault, and waits for the guest to read on."""
    # A disk read: the device writes guest memory (access "write").
    armed = await client.execute("stage2-unmap", {"endpoint": blk, "min-size": 4096,
                                                  "access": "write"})
    event = await _qmp_event(events, EVENT_VSMMU, console, STEP_TIMEOUT)
    page = event["ipa"] & ~0xFFF
    remapped = await client.execute("stage2-map", {"start": page, "size": 4096})
    await wait_step(console, resets, "IO_RECOVERED", STEP_TIMEOUT)
    return {"armed": armed, "qmp_event": event, "ipa": page, "remapped": remapped}


async def _rogue_dma(client: QMPClient, console: Console, resets: EventListener,
                     blk: int) -> dict[str, Any]:
    """The disk reads ROGUE_IOVA on its own; the guest must log the stage-1 fault."""
    await wait_step(console, resets, "S1_WAIT", STEP_TIMEOUT)
    result = await client.execute("inject-dma", {"endpoint": blk, "address": ROGUE_IOVA,
                                                 "access": "read", "size": 4})
    await wait_step(console, resets, "S1_FAULT_SEEN", STEP_TIMEOUT)
    return {"address": ROGUE_IOVA, "access": "read", "result": result}


async def run(qemu: Path, assets: GuestAssets, workdir: Path) -> dict[str, Any]:
    """Runs the vSMMU scenario once and returns the report (see README: demo --json)."""
    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "disk.img"
    plan = demo_plan()
    host_read_sha = make_image(image, plan)
    specs = endpoint_specs(workdir, image)
    blk_ep = specs[0].endpoint
    pci = {s.endpoint: pci_name(s.endpoint) for s in specs}
    initrd = workdir / "initramfs.cpio.gz"
    modules = build_initramfs(
        initrd, busybox=assets.busybox, modules_dir=assets.modules,
        modules=["virtio_blk", "virtio-rng"], scenario="vsmmu",
        env={"ENDPOINTS": " ".join(pci.values()), "DISK": "vda",
             "READ_BYTES": plan.read_bytes, "WRITE_OFFSET": plan.write_offset,
             "WRITE_BYTES": plan.write_bytes, "RNG_BYTES": RNG_BYTES,
             "STEP_WAIT": int(STEP_TIMEOUT)})

    config = BackendConfig(viommu_socket=None, qmp_socket=workdir / "backend-qmp.sock",
                           devices=specs)
    report: dict[str, Any] = {"mode": "vsmmu"}
    async with Backend(config):
        client, listener = await backend_qmp(config.qmp_socket)  # type: ignore[arg-type]
        resets = EventListener(EVENT_NEEDS_RESET)
        client.register_listener(resets)
        vsmmu_events = EventListener(EVENT_VSMMU)
        client.register_listener(vsmmu_events)
        try:
            topology = vsmmu_topology(assets, initrd, specs)
            vm = QemuMachine(qemu, topology, workdir, log_file=workdir / "console.log")
            async with vm:
                console = vm.console
                assert console is not None
                booted = await console.wait_marker("BOOTED", BOOT_TIMEOUT)
                await wait_step(console, resets, "READY", STEP_TIMEOUT)
                stage2_fault = await _stage2_fault(client, vsmmu_events, console, resets,
                                                   blk_ep)
                rogue = await _rogue_dma(client, console, resets, blk_ep)
                done = await wait_step(console, resets, "DONE", STEP_TIMEOUT)
                exit_status = await vm.wait_exit(STEP_TIMEOUT)
            events = [dict(ev) for ev in listener.history]
            state = await vsmmu_state(client)
            devices = await client.execute("query-endpoint-devices")
        finally:
            await client.disconnect()

    if (failed := console.find("FAIL")) is not None:
        raise GuestFailed(f"guest scenario failed: {failed.fields.get('reason', '?')}")
    report["faults"] = vsmmu_faults(console.lines, events, rogue["result"])
    report["qmp_events"] = [{"event": e["event"], "data": e.get("data", {})} for e in events]
    report["dma"] = blk_checks(console, image, plan, host_read_sha)
    report["rng"] = rng_report(console, RNG_BYTES)
    recovered = console.find("IO_RECOVERED")
    carried_on = console.find("S1_CARRIED_ON")
    stage2_fault["guest_io_error"] = next(iter(guest_io_errors(console.lines)), None)
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
        "modules": [m.name for m in modules],
        "kernel": str(assets.kernel),
    }
    report["backend"] = {"endpoint_devices": [
        {k: d[k] for k in ("id", "kind", "transport", "mode", "connections", "needs-reset")}
        for d in devices]}
    report["qemu"] = {"binary": str(qemu), "exit_status": exit_status}
    report["timings"] = {"boot_s": round(booted.time - vm.started_at, 3),
                         "total_s": round(time.monotonic() - t0, 3)}
    report["logs"] = {"console": str(workdir / "console.log")}
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
