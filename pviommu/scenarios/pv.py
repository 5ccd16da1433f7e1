"""The PV-IOMMU scenario: the guest's virtio_iommu driver programs the backend, and
the guest's virtio_blk and virtio-rng drivers do DMA through it.

The backend (started first, stopped last) serves the virtio-iommu device over
vhost-user and its endpoint devices over vfio-user: a virtio-blk at 2.0 and a
virtio-rng at 3.0, both behind the PV-IOMMU (the iommu-map is patched into the
device tree). The guest reports its IOMMU groups and reserved regions, writes
and reads the disk (sha256 checked on both sides) and reads the rng. Then the
host either injects a fault over the backend's QMP, or revokes a live mapping
of the disk while the guest reads it, and checks what the guest and QMP saw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from ..backend import EVENT_REVOKED
from ..endpoints import EndpointSpec
from ..iommu.pv import IommuConfig
from ..lab import Endpoint, Iommu, Lab
from ..lab import Topology as LabTopology
from ..lab.faults import pv_faults
from ..lab.state import pv_state, query
from ..machine.console import GuestFailed
from ..machine.dtb import add_pci_iommu
from ..machine.guest_image import build_initramfs
from ..machine.guestlog import guest_io_errors
from ..machine.qemu import dump_dtb
from ..machine.topology import (
    Device,
    Topology,
    VfioUserPci,
    VhostUserIommuPci,
    pci_addr,
    pci_name,
    pci_rid,
)
from ..provision import GuestAssets
from .dma import DmaPlan, blk_checks, make_image
from .runner import ScenarioRun, run_sections, scenario_files

IOMMU_ADDR = "1.0"
BLK_ADDR = "2.0"
RNG_ADDR = "3.0"
ENDPOINT_ADDR = BLK_ADDR
MiB = 1 << 20


def demo_plan() -> DmaPlan:
    """The demo's disk check: 4 MiB read, 4 MiB written into a 64 MiB image."""
    return DmaPlan(image_bytes=64 * MiB, read_bytes=4 * MiB, write_offset=32 * MiB,
                   write_bytes=4 * MiB)


@dataclass
class FaultPlan:
    """The fault the host injects once the guest is ready."""

    address: int = 0xDEAD000
    access: str = "write"
    reason: str = "mapping"


@dataclass
class PvOptions:
    """Knobs of the PV scenario.

    ``blk`` is the disk check (None: the guest does not load virtio_blk),
    ``rng_bytes`` what the guest reads from the rng (0: virtio-rng not loaded),
    ``fault`` a fault to inject over QMP, ``revoke`` whether the host revokes a
    live mapping of the disk while the guest reads it (needs ``blk``).
    """

    iommu: IommuConfig = field(default_factory=IommuConfig)
    passthrough: bool = False
    blk: DmaPlan | None = field(default_factory=demo_plan)
    rng_bytes: int = 4096
    fault: FaultPlan | None = None
    revoke: bool = True
    boot_timeout: float = 120
    step_timeout: float = 60

    def __post_init__(self) -> None:
        if self.revoke and self.blk is None:
            raise ValueError("revoking a mapping needs the disk (blk)")
        if self.rng_bytes % 64:
            raise ValueError("rng_bytes must be a multiple of 64")


def pv_initramfs(out: Path, assets: GuestAssets, endpoints: list[str], opts: PvOptions
                 ) -> list[Any]:
    """An initramfs whose own init runs the pv-iommu scenario and powers off (for a
    QEMU started without a lab, e.g. against a ``pviommu serve`` of one's own);
    returns the modules it loads."""
    modules = ["virtio_iommu"]
    if opts.blk is not None:
        modules.append("virtio_blk")
    if opts.rng_bytes:
        modules.append("virtio-rng")
    env = _scenario_env(endpoints, opts) | {"HOLD_WAIT": 0}
    return build_initramfs(out, busybox=assets.busybox, modules_dir=assets.modules,
                           modules=modules, scenario="pv-iommu", env=env)


def endpoint_specs(workdir: Path, image: Path) -> list[EndpointSpec]:
    """The backend's endpoints of the scenario: virtio-blk on ``image``, virtio-rng."""
    return [EndpointSpec("blk", workdir / "blk.sock", pci_rid(BLK_ADDR), image=image),
            EndpointSpec("rng", workdir / "rng.sock", pci_rid(RNG_ADDR))]


def endpoint_devices(specs: list[EndpointSpec]) -> list[Device]:
    """The vfio-user-pci devices QEMU needs for the backend's endpoints."""
    return [VfioUserPci(socket=s.socket, addr=pci_addr(s.endpoint), id=f"{s.kind}{i}")
            for i, s in enumerate(specs)]


async def pv_topology(qemu: Path, assets: GuestAssets, initrd: Path, workdir: Path,
                      socket: Path, append: str, endpoints: list[Device]) -> Topology:
    """The PV topology with the device tree patched for the PV-IOMMU.

    ``endpoints`` sit behind the IOMMU: the iommu-map covers every RID of the
    bus but the IOMMU's own. The backend must already listen on ``socket`` (and
    on the endpoints' sockets): dumping the DTB realizes the devices, which
    connect.
    """
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


async def run(qemu: Path, assets: GuestAssets, workdir: Path,
              options: PvOptions | None = None, trace: Path | None = None) -> dict[str, Any]:
    """Runs the PV scenario once in a lab and returns the report (see README: demo
    --json); ``trace`` writes the backend's timeline there."""
    opts = options or PvOptions()
    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "disk.img"
    plan = opts.blk or demo_plan()
    host_read_sha = make_image(image, plan)
    blk_ep, rng_ep = pci_rid(BLK_ADDR), pci_rid(RNG_ADDR)
    pci = {blk_ep: pci_name(blk_ep), rng_ep: pci_name(rng_ep)}
    modules = ["virtio_iommu"] + (["virtio_blk"] if opts.blk is not None else []) \
        + (["virtio-rng"] if opts.rng_bytes else [])
    topology = LabTopology(
        iommu=Iommu.pv(opts.iommu, passthrough=opts.passthrough),
        endpoints=(Endpoint("blk", image=image, address=BLK_ADDR),
                   Endpoint("rng", address=RNG_ADDR)),
        load_modules=tuple(modules),
        files=scenario_files("pv-iommu", _scenario_env(list(pci.values()), opts), workdir))
    report: dict[str, Any] = {"mode": "pv"}
    lab = Lab(topology, workdir=workdir, qemu=qemu, assets=assets, trace=trace,
              boot_timeout=opts.boot_timeout)
    async with lab:
        client = lab.backend_qmp
        scenario = ScenarioRun(lab, "pv-iommu")
        await scenario.start()
        await scenario.step("READY", opts.step_timeout)
        report["iommu"] = await pv_state(client)
        await scenario.go_ahead()
        injected = None
        if opts.fault is not None:
            injected = await client.execute("inject-fault", {
                "endpoint": blk_ep, "address": opts.fault.address,
                "access": opts.fault.access, "reason": opts.fault.reason})
            await scenario.step("FAULT_SEEN", opts.step_timeout)
        armed = None
        if opts.revoke:
            # A disk read: the device writes guest memory (access "write").
            armed = await client.execute("revoke-mapping", {
                "endpoint": blk_ep, "min-size": 4096, "access": "write"})
            await scenario.step("IO_RECOVERED", opts.step_timeout)
        done = await scenario.step("DONE", opts.step_timeout)
        kernel_log = await lab.kernel_log()
        events = lab.backend_events
        stats = await query(client, "query-viommu-stats")
        devices = await query(client, "query-endpoint-devices")
        exit_status = await lab.poweroff(opts.step_timeout)
        console = lab.console

    if (failed := scenario.failed()) is not None:
        raise GuestFailed(f"guest scenario failed: {failed}")
    report["faults"] = pv_faults(kernel_log, events)
    report["injected"] = injected
    report["qmp_events"] = [{"event": e["event"], "data": e.get("data", {})} for e in events]
    if opts.blk is not None:
        report["dma"] = blk_checks(console, image, plan, host_read_sha)
    if opts.rng_bytes:
        report["rng"] = rng_report(console, opts.rng_bytes)
    if opts.revoke:
        revoked = next((e["data"] for e in events if e.get("event") == EVENT_REVOKED), None)
        errors = guest_io_errors(kernel_log)
        report["revocation"] = {
            "armed": armed, "qmp_event": revoked,
            "memory_unchanged": bool(revoked and revoked["memory-unchanged"]),
            "guest_io_error": errors[0] if errors else None,
            "recovered": console.find("IO_RECOVERED") is not None}
    groups = {m.fields.get("pci"): m.fields for m in console.markers if m.name == "IOMMU_GROUP"}
    report["endpoints"] = [
        {"id": d["id"], "kind": d["kind"], "pci": pci[d["id"]],
         "iommu_group": groups.get(pci[d["id"]], {}).get("group"),
         "group_type": groups.get(pci[d["id"]], {}).get("type"),
         "stats": d["stats"], "vfio_user_connections": d["connections"]}
        for d in devices]
    viommu = console.find("VIOMMU")
    first = groups.get(pci[blk_ep], {})
    disk = console.find("DISK")
    report["guest"] = {
        "scenario_rc": int(done.fields.get("rc", "-1")),
        "viommu_driver": viommu.fields.get("driver") if viommu else None,
        "endpoint_pci": pci[blk_ep],
        "iommu_group": first.get("group"),
        "group_type": first.get("type"),
        "reserved_regions": [m.fields for m in console.markers
                             if m.name == "RESV" and m.fields.get("pci") == pci[blk_ep]],
        "disk": disk.fields if disk else None,
        "modules": lab.modules,
        "kernel": str(assets.kernel),
    }
    report["backend"] = {"vhost_user_connections": stats["vhost-user"]["connections"],
                         "stats": stats}
    report.update(run_sections(lab, qemu, exit_status, t0, trace))
    return report


def _scenario_env(endpoints: list[str], opts: PvOptions) -> dict[str, Any]:
    """The pv-iommu guest script's environment (see its header)."""
    env: dict[str, Any] = {"ENDPOINTS": " ".join(endpoints),
                           "FAULT_WAIT": int(opts.step_timeout) if opts.fault else 0,
                           "REVOKE_WAIT": int(opts.step_timeout) if opts.revoke else 0,
                           "RNG_BYTES": opts.rng_bytes,
                           "HOLD_WAIT": int(opts.step_timeout)}
    if opts.blk is not None:
        env.update({"DISK": "vda", "READ_BYTES": opts.blk.read_bytes,
                    "WRITE_OFFSET": opts.blk.write_offset, "WRITE_BYTES": opts.blk.write_bytes})
    return env


def rng_report(console: Any, expected: int) -> dict[str, Any]:
    """The report's ``rng`` section from the guest's RNG marker (``expected`` bytes)."""
    rng = console.find("RNG")
    if rng is None:
        raise GuestFailed("guest did not report its rng read (no RNG marker)")
    got = int(rng.fields.get("bytes", "0"))
    current = rng.fields.get("current", "")
    distinct = int(rng.fields.get("distinct", "0"))
    return {"current": current, "bytes": got, "distinct_in_64": distinct,
            "ok": got == expected and current.startswith("virtio_rng") and distinct > 16}
