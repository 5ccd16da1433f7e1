"""The PV-IOMMU scenario: the guest's virtio_iommu driver programs the backend.

The backend (started first, stopped last) serves the virtio-iommu device over
vhost-user; QEMU runs ``vhost-user-test-device-pci`` at 1.0 and a PCI function
at 2.0 behind it, with the iommu-map patched into the device tree. The guest
reports its IOMMU group and reserved regions; the host injects a fault over the
backend's QMP and checks that the guest logged it and that QMP announced it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from ..backend import Backend, BackendConfig
from ..iommu.pv import IommuConfig
from ..machine.console import GuestFailed
from ..machine.dtb import add_pci_iommu
from ..machine.guest_image import build_initramfs
from ..machine.guestlog import guest_faults
from ..machine.qemu import QemuMachine, dump_dtb
from ..machine.topology import (
    Device,
    Topology,
    VhostUserIommuPci,
    VirtioRngPci,
    pci_name,
    pci_rid,
)
from ..provision import GuestAssets
from ..qmp.viommu import EVENT_FAULT

IOMMU_ADDR = "1.0"
ENDPOINT_ADDR = "2.0"


@dataclass
class FaultPlan:
    """The fault the host injects once the guest is ready."""

    address: int = 0xDEAD000
    access: str = "write"
    reason: str = "mapping"


@dataclass
class PvOptions:
    """Knobs of the PV scenario."""

    iommu: IommuConfig = field(default_factory=IommuConfig)
    passthrough: bool = False
    fault: FaultPlan | None = field(default_factory=FaultPlan)
    boot_timeout: float = 120
    step_timeout: float = 60


def pv_initramfs(out: Path, assets: GuestAssets, endpoint_pci: str, fault_wait: int
                 ) -> list[Any]:
    """The guest image of the pv-iommu scenario; returns the modules it loads.

    ``fault_wait`` seconds the guest waits for a fault in its log (0: none).
    """
    return build_initramfs(out, busybox=assets.busybox, modules_dir=assets.modules,
                           modules=["virtio_iommu"], scenario="pv-iommu",
                           env={"ENDPOINT_PCI": endpoint_pci, "FAULT_WAIT": fault_wait})


async def pv_topology(qemu: Path, assets: GuestAssets, initrd: Path, workdir: Path,
                      socket: Path, append: str, endpoints: list[Device] | None = None
                      ) -> Topology:
    """The PV topology with the device tree patched for the PV-IOMMU.

    ``endpoints`` (default: a virtio-rng-pci at ENDPOINT_ADDR) sit behind the
    IOMMU. The backend must already listen on ``socket``: dumping the DTB
    realizes the vhost-user device, which connects.
    """
    if endpoints is None:
        endpoints = [VirtioRngPci(addr=ENDPOINT_ADDR)]
    topology = Topology(kernel=assets.kernel, initrd=initrd, append=append,
                        devices=[VhostUserIommuPci(socket=socket, addr=IOMMU_ADDR), *endpoints])
    dtb = await dump_dtb(qemu, topology, workdir / "virt.dtb")
    patched = workdir / "virt-pv.dtb"
    patched.write_bytes(add_pci_iommu(dtb, iommu_rid=pci_rid(IOMMU_ADDR)))
    topology.dtb = patched
    return topology


async def backend_qmp(path: Path) -> tuple[QMPClient, EventListener]:
    """A QMP client connected to the backend, with a listener for every event."""
    client = QMPClient("pviommu-demo")
    listener = EventListener()
    client.register_listener(listener)
    await client.connect(str(path))
    return client, listener


MAPPINGS_SHOWN = 32


async def iommu_state(client: QMPClient) -> dict[str, Any]:
    """The report's ``iommu`` section, asked of the backend over QMP.

    ``mappings`` holds the first MAPPINGS_SHOWN mappings of each domain.
    """
    stats = await client.execute("query-viommu-stats")
    domains = await client.execute("query-viommu-domains")
    mappings = {}
    for d in domains:
        found = await client.execute("query-viommu-mappings", {"domain": d["id"]})
        mappings[str(d["id"])] = found[:MAPPINGS_SHOWN]
    return {"domains": domains,
            "mappings": mappings,
            "endpoints": await client.execute("query-viommu-endpoints"),
            "requests": stats["requests"],
            "faults_reported": stats["faults-reported"],
            "faults_dropped": stats["faults-dropped"]}


async def run(qemu: Path, assets: GuestAssets, workdir: Path,
              options: PvOptions | None = None) -> dict[str, Any]:
    """Runs the PV scenario once and returns the report (see README: demo --json)."""
    opts = options or PvOptions()
    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    endpoint_id = pci_rid(ENDPOINT_ADDR)
    endpoint_pci = pci_name(endpoint_id)
    initrd = workdir / "initramfs.cpio.gz"
    modules = pv_initramfs(initrd, assets, endpoint_pci,
                           int(opts.step_timeout) if opts.fault else 0)
    append = "console=ttyAMA0 panic=-1 quiet"
    if opts.passthrough:
        append += " iommu.passthrough=1"

    config = BackendConfig(viommu_socket=workdir / "viommu.sock",
                           qmp_socket=workdir / "backend-qmp.sock",
                           endpoints=[endpoint_id], iommu=opts.iommu)
    report: dict[str, Any] = {"mode": "pv"}
    events: list[dict[str, Any]] = []
    async with Backend(config) as backend:
        client, listener = await backend_qmp(config.qmp_socket)  # type: ignore[arg-type]
        try:
            topology = await pv_topology(qemu, assets, initrd, workdir, config.viommu_socket,
                                         append)
            vm = QemuMachine(qemu, topology, workdir, log_file=workdir / "console.log")
            async with vm:
                assert vm.console is not None
                booted = await vm.console.wait_marker("BOOTED", opts.boot_timeout)
                await vm.console.wait_marker("READY", opts.step_timeout)
                report["iommu"] = await iommu_state(client)
                injected = None
                if opts.fault is not None:
                    injected = await client.execute("inject-fault", {
                        "endpoint": endpoint_id, "address": opts.fault.address,
                        "access": opts.fault.access, "reason": opts.fault.reason})
                    await vm.console.wait_marker("FAULT_SEEN", opts.step_timeout)
                done = await vm.console.wait_marker("DONE", opts.step_timeout)
                exit_status = await vm.wait_exit(opts.step_timeout)
                console = vm.console
            events = [dict(ev) for ev in listener.history]
            stats = await client.execute("query-viommu-stats")
        finally:
            await client.disconnect()
        connections = backend.vhost.connections

    if (failed := console.find("FAIL")) is not None:
        raise GuestFailed(f"guest scenario failed: {failed.fields.get('reason', '?')}")
    viommu = console.find("VIOMMU")
    group = console.find("IOMMU_GROUP")
    resv = [m.fields for m in console.markers if m.name == "RESV"]
    qmp_faults = [e for e in events if e.get("event") == EVENT_FAULT]
    faults = guest_faults(console.lines)
    for f in faults:
        f["qmp_event"] = next((e["data"] for e in qmp_faults
                               if e["data"]["endpoint"] == f["endpoint"]
                               and e["data"]["address"] == f["address"]), None)
    report["faults"] = faults
    report["injected"] = injected
    report["qmp_events"] = [{"event": e["event"], "data": e.get("data", {})} for e in events]
    report["guest"] = {
        "scenario_rc": int(done.fields.get("rc", "-1")),
        "viommu_driver": viommu.fields.get("driver") if viommu else None,
        "endpoint_pci": endpoint_pci,
        "iommu_group": group.fields.get("group") if group else None,
        "group_type": group.fields.get("type") if group else None,
        "reserved_regions": resv,
        "modules": [m.name for m in modules],
        "kernel": str(assets.kernel),
    }
    report["backend"] = {"vhost_user_connections": connections,
                         "stats": stats}
    report["qemu"] = {"binary": str(qemu), "exit_status": exit_status}
    report["timings"] = {"boot_s": round(booted.time - vm.started_at, 3),
                         "total_s": round(time.monotonic() - t0, 3)}
    report["logs"] = {"console": str(workdir / "console.log")}
    return report
