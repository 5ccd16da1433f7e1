"""A running lab: the backend, QEMU and the guest of a topology, and their clean-up.

::

    async with Lab(Topology.from_toml("pv.toml")) as lab:
        result = await lab.run("cat /proc/interrupts")
        await lab.backend_qmp.execute("revoke-mapping", {...})
        print(await lab.faults())

Entering starts, in this order, the backend (a ``pviommu serve`` process, when
the IOMMU kind has one), QEMU (with the device tree patched for the PV-IOMMU)
and the guest, and returns once the guest's shell answers. Leaving stops QEMU,
then the backend, whatever happened inside: an exception, a cancellation, a
Ctrl-C. Both processes also die with the Python process that started them.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from ..machine.console import Console, GuestFailed, GuestTimeout
from ..machine.dtb import add_pci_iommu
from ..machine.qemu import QemuError, QemuMachine, dump_dtb
from ..machine.topology import Topology as MachineTopology
from ..machine.topology import pci_rid
from ..provision import GuestAssets, fetch_guest, find_qemu
from .backend_process import BackendError, BackendProcess
from .faults import lab_faults
from .machine import (
    STATE_DIR,
    WIRINGS,
    LabEndpoint,
    build_lab_image,
    create_images,
    kernel_command_line,
    lab_endpoints,
)
from .shell import CommandResult, GuestShell
from .state import pv_state, query, vsmmu_state
from .topology import Topology

log = logging.getLogger(__name__)

BOOT_TIMEOUT = 180.0
"""Seconds from QEMU's start to the guest's shell (TCG on a loaded 2-core machine)."""


class LabError(Exception):
    """The lab could not be started or used; the message says why and where the logs are."""


class Lab:
    """The backend, QEMU and the guest of ``topology`` (a Topology, or the path of a
    topology file; default ``Topology()``), used as ``async with Lab(...) as lab:``.

    ``workdir`` holds the sockets, images and logs; without one a temporary
    directory is made and removed on a clean exit (kept, and named in the log,
    after an error). ``trace`` writes the backend's timeline there
    (docs/TRACING.md). ``qemu`` and ``assets`` replace what ``pviommu setup``
    provisioned. ``qemu_args`` are added to QEMU's command line (a device of
    one's own, served by another process, say).
    """

    def __init__(self, topology: Topology | str | Path | None = None, *,
                 workdir: Path | None = None, trace: Path | None = None,
                 boot_timeout: float = BOOT_TIMEOUT, qemu: Path | None = None,
                 assets: GuestAssets | None = None, qemu_args: list[str] | None = None
                 ) -> None:
        if topology is None:
            topology = Topology()
        elif not isinstance(topology, Topology):
            topology = Topology.from_toml(topology)
        self.topology = topology
        self.trace = trace
        self.boot_timeout = boot_timeout
        self._qemu_binary = qemu
        self.qemu_args = list(qemu_args or [])
        self._assets = assets
        self._own_workdir = workdir is None
        self.workdir = workdir if workdir is not None else Path(
            tempfile.mkdtemp(prefix="pviommu-lab-"))
        self.endpoints: list[LabEndpoint] = []
        """The endpoint devices, placed (PCI address, endpoint ID, socket, image)."""
        self.modules: list[str] = []
        """The modules the guest loaded at boot, in order."""
        self.backend: BackendProcess | None = None
        self.machine: QemuMachine | None = None
        self._backend_qmp: QMPClient | None = None
        self._history: EventListener | None = None
        self._shell: GuestShell | None = None
        self.started_at = 0.0
        self.boot_seconds: float | None = None
        """Seconds from QEMU's start to the guest's shell."""

    # -- paths -------------------------------------------------------------------

    @property
    def backend_qmp_socket(self) -> Path | None:
        """The backend's QMP socket (None when the IOMMU kind has no backend); it takes
        several clients: point ``qmp-shell`` at it."""
        return self.workdir / "backend-qmp.sock" if self._wiring.served else None

    @property
    def qemu_qmp_socket(self) -> Path:
        """A QMP monitor of QEMU's free for people (``qmp-shell``); the lab holds another."""
        return self.workdir / "qemu-user-qmp.sock"

    @property
    def console_log(self) -> Path:
        """Everything the guest's serial console printed."""
        return self.workdir / "console.log"

    @property
    def backend_log(self) -> Path:
        """The backend's standard output and error."""
        return self.workdir / "backend.log"

    @property
    def state_dir(self) -> Path:
        """The backend's state directory (``pviommu serve --state``, vsmmu labs): what a
        restarted backend takes up."""
        return self.workdir / STATE_DIR

    @property
    def _wiring(self) -> Any:
        return WIRINGS[self.topology.iommu.kind]

    # -- life cycle --------------------------------------------------------------

    async def __aenter__(self) -> Lab:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        await self.stop(failed=exc_type is not None)

    async def start(self) -> None:
        """Starts the backend, QEMU and the guest; cleans up and raises if any fails."""
        try:
            await self._start()
        except BaseException:
            await self.stop(failed=True)
            raise

    async def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        qemu, assets = await asyncio.to_thread(self._provisioned)
        wiring = self._wiring
        self.endpoints = lab_endpoints(self.topology, self.workdir, wiring.served)
        create_images(self.endpoints)
        initrd = self.workdir / "initramfs.cpio.gz"
        self.modules = await asyncio.to_thread(build_lab_image, initrd, self.topology, assets)
        viommu = self.workdir / "viommu.sock"
        if wiring.served:
            await self._start_backend(wiring.backend_args(self.topology, self.endpoints,
                                                          viommu))
        machine = MachineTopology(
            kernel=assets.kernel, initrd=initrd, append=kernel_command_line(self.topology),
            memory_mb=self.topology.memory >> 20, smp=self.topology.vcpus,
            devices=wiring.devices(self.topology, self.endpoints, viommu),
            iommu=wiring.machine_iommu, user_qmp=self.qemu_qmp_socket,
            extra_args=self.qemu_args)
        if wiring.patch_dtb:
            # Dumping the DTB realizes the devices: the backend must listen already.
            dtb = await dump_dtb(qemu, machine, self.workdir / "virt.dtb")
            patched = self.workdir / "virt-pv.dtb"
            assert self.topology.iommu_address is not None
            patched.write_bytes(add_pci_iommu(dtb, iommu_rid=pci_rid(self.topology.iommu_address)))
            machine.dtb = patched
        self.machine = QemuMachine(qemu, machine, self.workdir, log_file=self.console_log)
        await self.machine.start()
        self.started_at = self.machine.started_at
        assert self.machine.console is not None
        self._shell = GuestShell(self.machine.console)
        try:
            await self._shell.ready(self.boot_timeout)
        except (GuestTimeout, GuestFailed) as exc:
            raise LabError(f"the guest did not boot to its shell: {exc}\n"
                           f"{self._diagnosis()}") from None
        self.boot_seconds = round(time.monotonic() - self.started_at, 3)

    def _provisioned(self) -> tuple[Path, GuestAssets]:
        qemu = self._qemu_binary or find_qemu(build=False)
        assets = self._assets or fetch_guest(self.topology.kernel, self.topology.modules)
        return qemu, assets

    async def _start_backend(self, args: list[str]) -> None:
        qmp = self.backend_qmp_socket
        assert qmp is not None
        args = [*args, "--qmp", str(qmp)]
        if self.trace is not None:
            args += ["--trace", str(self.trace)]
        sockets = [qmp, *(ep.socket for ep in self.endpoints if ep.socket is not None)]
        if "--viommu" in args:
            sockets.append(Path(args[args.index("--viommu") + 1]))
        self.backend = BackendProcess(args, sockets, self.backend_log)
        try:
            await self.backend.start()
        except BackendError as exc:
            raise LabError(str(exc)) from None
        self._history = EventListener()
        await self._connect_backend_qmp()

    async def _connect_backend_qmp(self) -> None:
        qmp = self.backend_qmp_socket
        assert qmp is not None and self._history is not None
        client = QMPClient("pviommu-lab")
        client.register_listener(self._history)
        await client.connect(str(qmp))
        self._backend_qmp = client

    async def restart_backend(self, kill: bool = True, timeout: float = 30) -> float:
        """Ends the backend (SIGKILL, or SIGTERM with ``kill=False``) and starts the same
        ``pviommu serve`` command line again; returns once it listens, with its QMP
        client reconnected (:attr:`backend_qmp`; :attr:`backend_events` goes on from
        the history of the one before). Returns the seconds it was away.

        Only what reconnects comes back: in vsmmu mode a blk endpoint with
        ``reconnect-ms``, whose stage 2 the backend takes up from its state
        directory (docs/ARCHITECTURE.md "Restarting the backend")."""
        if self.backend is None:
            raise LabError(f"no backend to restart: IOMMU kind {self.topology.iommu.kind!r} "
                           "has none" if not self._wiring.served else "the lab is not running")
        old, self._backend_qmp = self._backend_qmp, None
        if old is not None:
            if self._history is not None:
                old.remove_listener(self._history)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.disconnect(), 10)
        began = time.monotonic()
        try:
            status = await self.backend.restart(kill, timeout)
        except BackendError as exc:
            raise LabError(str(exc)) from None
        log.info("backend restarted (the one before ended with status %s)", status)
        await self._connect_backend_qmp()
        return round(time.monotonic() - began, 3)

    async def stop(self, failed: bool = False) -> None:
        """Stops QEMU, then the backend; removes a temporary workdir unless ``failed``.
        Idempotent; safe to call on a half-started lab."""
        if self.machine is not None:
            await self.machine.stop()
        if self._backend_qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._backend_qmp.disconnect(), 10)
            self._backend_qmp = None
        status = None
        if self.backend is not None:
            status = await self.backend.stop()
        if status not in (None, 0):
            log.warning("the backend exited with status %s; its log: %s", status,
                        self.backend_log)
            failed = True
        if self._own_workdir and self.workdir.exists():
            if failed:
                log.warning("lab files kept in %s", self.workdir)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the guest ---------------------------------------------------------------

    @property
    def console(self) -> Console:
        """The guest's serial console (every line it printed, as it came)."""
        if self.machine is None or self.machine.console is None:
            raise LabError("the lab is not running")
        return self.machine.console

    @property
    def shell(self) -> GuestShell:
        """The guest's shell."""
        if self._shell is None:
            raise LabError("the lab is not running")
        return self._shell

    async def run(self, command: str, timeout: float = 60, check: bool = False
                  ) -> CommandResult:
        """Runs a shell command in the guest: its exit status and output (see
        :meth:`GuestShell.run`)."""
        try:
            return await self.shell.run(command, timeout, check)
        except GuestFailed as exc:
            raise GuestFailed(f"{exc}\n{self._diagnosis()}") from None

    async def spawn(self, command: str) -> None:
        """Starts a shell command in the guest in the background (output to the
        console, :attr:`console`); :meth:`run` goes on answering meanwhile."""
        await self.shell.spawn(command)

    async def poweroff(self, timeout: float = 60) -> int | None:
        """Powers the guest off (``poweroff -f``) and waits for QEMU to exit; QEMU's
        exit status (None if it did not exit within ``timeout``). The lab can only
        be left afterwards."""
        self.console.send("poweroff -f\n")
        assert self.machine is not None
        return await self.machine.wait_exit(timeout)

    async def kernel_log(self) -> list[str]:
        """The guest kernel's log so far (``dmesg``)."""
        return await self.shell.kernel_log()

    def _diagnosis(self) -> str:
        parts = [f"console log {self.console_log}"]
        if self.machine is not None and self.machine.console is not None:
            parts.append("the console's last lines:\n" + self.machine.console.tail(15))
        if self.backend is not None:
            if self.backend.exited is not None:
                parts.append(f"the backend exited with status {self.backend.exited}")
            parts.append(f"backend log {self.backend_log}, last lines:\n"
                         + self.backend.log_tail(10))
        return "\n".join(parts)

    # -- QMP ---------------------------------------------------------------------

    @property
    def qemu_qmp(self) -> QMPClient:
        """A client of QEMU's QMP monitor, connected (qemu.qmp)."""
        if self.machine is None or self.machine.qmp is None:
            raise LabError("the lab is not running")
        return self.machine.qmp

    @property
    def backend_qmp(self) -> QMPClient:
        """A client of the backend's QMP, connected (docs/QMP.md)."""
        if self._backend_qmp is None:
            raise LabError(f"no backend QMP: IOMMU kind {self.topology.iommu.kind!r} has no "
                           "backend" if not self._wiring.served else "the lab is not running")
        return self._backend_qmp

    @property
    def backend_events(self) -> list[dict[str, Any]]:
        """Every QMP event the backend sent since it started, oldest first."""
        if self._history is None:
            return []
        return [dict(e) for e in self._history.history]

    async def events(self, *names: str) -> AsyncIterator[dict[str, Any]]:
        """The backend's QMP events from now on (those called ``names``, or all), as
        they come: ``async for event in lab.events("IOMMU_FAULT"):``."""
        listener = EventListener(names or None)
        client = self.backend_qmp
        client.register_listener(listener)
        try:
            async for event in listener:
                yield dict(event)
        finally:
            client.remove_listener(listener)

    async def wait_event(self, name: str, timeout: float = 30,
                         since: int = 0) -> dict[str, Any]:
        """The first backend event called ``name`` from index ``since`` of
        :attr:`backend_events` on, waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.backend_events[since:]:
                if event.get("event") == name:
                    return event
            if self.backend is not None and self.backend.exited is not None:
                raise LabError(f"the backend exited while waiting for {name}\n"
                               f"{self._diagnosis()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {name} event from the backend within {timeout:g}s")
            await asyncio.sleep(0.05)

    # -- what the IOMMU did ------------------------------------------------------

    async def faults(self) -> list[dict[str, Any]]:
        """The faults seen so far, as the demo's report shows them: the guest's log
        lines joined with the backend's QMP events (see :mod:`pviommu.lab.faults`)."""
        lines = await self.kernel_log()
        return lab_faults(self.topology.iommu.kind, lines, self.backend_events)

    async def iommu_state(self) -> dict[str, Any]:
        """The backend's IOMMU state and counters: for pv the domains, mappings,
        endpoints and request counters; for vsmmu stage 2 and its event queue; for
        both the endpoint devices with their counters. Empty without a backend."""
        if not self._wiring.served:
            return {}
        client = self.backend_qmp
        state = (await pv_state(client) if self.topology.iommu.kind == "pv"
                 else await vsmmu_state(client))
        state["devices"] = await query(client, "query-endpoint-devices")
        return state

    async def counters(self) -> dict[str, int]:
        """The round trips to the backend so far: PV-IOMMU requests by type ("map",
        "unmap", ...), or the vSMMU endpoints' IOTLB messages ("miss", "update",
        "invalidate", ...) and nested-translation counters, summed over endpoints."""
        if not self._wiring.served:
            return {}
        client = self.backend_qmp
        out: dict[str, int] = {}
        if self.topology.iommu.kind == "pv":
            stats = await query(client, "query-viommu-stats")
            for r in stats["requests"]:
                out[r["type"]] = out.get(r["type"], 0) + r["count"]
            return out
        for dev in await query(client, "query-endpoint-devices"):
            for section in ("iotlb", "translation"):
                for key, value in (dev.get(section) or {}).items():
                    if isinstance(value, int):
                        out[key] = out.get(key, 0) + value
        return out

    def endpoint(self, kind: str, index: int = 0) -> LabEndpoint:
        """The ``index``-th endpoint device of ``kind`` ("blk", "rng")."""
        found = [e for e in self.endpoints if e.kind == kind]
        if index >= len(found):
            raise LabError(f"the lab has {len(found)} {kind} endpoint(s), no #{index}")
        return found[index]

    def interact(self, escape: str = "\x1d") -> None:
        """Hands the guest's console to this terminal until the guest powers off or the
        user types ``escape`` (Ctrl-]). Blocking: call it in a thread
        (``await asyncio.to_thread(lab.interact)``) after :meth:`release_console`."""
        if self.machine is None or self.machine.child is None:
            raise LabError("the lab is not running")
        child = self.machine.child
        # pexpect's interact hands bytes to a str spawn's log file: log them here.
        log_file, child.logfile_read = child.logfile_read, None
        decoder = codecs.getincrementaldecoder("utf-8")("replace")

        def keep(data: bytes) -> bytes:
            if log_file is not None:
                log_file.write(decoder.decode(data))
            return data
        try:
            child.interact(escape_character=escape, output_filter=keep)
        finally:
            child.logfile_read = log_file

    async def release_console(self) -> None:
        """Stops reading the console in the background, for :meth:`interact`."""
        await self.console.stop()
        self.console.release()


__all__ = ["BOOT_TIMEOUT", "Lab", "LabError", "QemuError"]
