"""The demo's guest scenarios run in a lab: their files, their start, their steps.

A scenario is a script of guest-kernel-config/scenarios/ that reports to the host
with markers (guest-kernel-config/lib/scenario.sh). The lab's guest gets the
script, the shared guest library, the runner (guest-kernel-config/
run-scenario.sh) and the scenario's environment as files; the host starts it in
the background (:meth:`pviommu.lab.Lab.spawn`, so that the guest's shell still
answers) and follows its markers on the console.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from pathlib import Path
from typing import Any, cast

from qemu.qmp import EventListener

from ..lab import ExtraFile, Lab
from ..machine.console import Console, GuestFailed, Marker
from ..machine.guest_image import scenario_path
from ..qmp.viommu import EVENT_NEEDS_RESET
from ..resources import repo_path

GO_AHEAD = "/tmp/pviommu-go"
"""The file a scenario that holds (HOLD_WAIT) waits for."""


def scenario_files(name: str, env: dict[str, Any], workdir: Path) -> tuple[ExtraFile, ...]:
    """The guest files scenario ``name`` needs; its ``env`` is written to
    ``workdir`` and becomes the guest's /etc/pviommu.env."""
    env_file = workdir / f"{name}.env"
    env_file.write_text("".join(f"{k}={shlex.quote(str(v))}\n" for k, v in env.items()))
    return (ExtraFile(repo_path("guest-kernel-config", "lib"), "/lib/pviommu"),
            ExtraFile(repo_path("guest-kernel-config", "run-scenario.sh"),
                      "/lib/pviommu/run-scenario.sh"),
            ExtraFile(scenario_path(name), f"/lib/pviommu/scenarios/{name}.sh"),
            ExtraFile(env_file, "/etc/pviommu.env"))


class ScenarioRun:
    """A scenario running in ``lab``: its markers, and the backend's NEEDS_RESET
    announcements (a device that needs a reset fails the run at once: the guest's
    driver would wait for it forever)."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name
        self.resets: EventListener | None = None

    async def start(self) -> None:
        """Starts the scenario in the background of the guest."""
        if self.lab.backend_qmp_socket is not None:
            self.resets = EventListener(EVENT_NEEDS_RESET)
            self.lab.backend_qmp.register_listener(self.resets)
        await self.lab.spawn(f"sh /lib/pviommu/run-scenario.sh {self.name}")

    async def step(self, marker: str, timeout: float) -> Marker:
        """Waits for the scenario's ``marker``; GuestFailed if the scenario failed, the
        guest died or a backend device needs a reset first."""
        if self.resets is None:
            return await self.lab.console.wait_marker(marker, timeout)
        return await wait_step(self.lab.console, self.resets, marker, timeout)

    async def go_ahead(self) -> None:
        """Lets a scenario that holds (HOLD_WAIT) go on."""
        await self.lab.run(f"touch {GO_AHEAD}", check=True)

    def failed(self) -> str | None:
        """The scenario's FAIL reason, if it failed."""
        failed = self.lab.console.find("FAIL")
        return failed.fields.get("reason", "?") if failed is not None else None


async def wait_step(console: Console, resets: EventListener, name: str, timeout: float
                    ) -> Marker:
    """Waits for the guest's marker ``name``, or fails at once if a device of the
    backend announces it needs a reset (DEVICE_NEEDS_RESET on ``resets``): the
    guest's driver would then wait for that device until ``timeout``."""
    marker = asyncio.ensure_future(console.wait_marker(name, timeout))
    reset = asyncio.ensure_future(resets.get())
    try:
        await asyncio.wait({marker, reset}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (marker, reset):
            task.cancel()
    if reset.done() and not reset.cancelled():
        data = cast(dict[str, Any], reset.result().get("data", {}))
        what = (f"{data.get('kind')} endpoint {data['endpoint']:#x}" if "endpoint" in data
                else "the PV-IOMMU")
        raise GuestFailed(f"{what} needs a reset (queue {data.get('queue')}: "
                          f"{data.get('reason')}) while waiting for the guest's {name}")
    return marker.result()


def run_sections(lab: Lab, qemu: Path, exit_status: int | None, started: float,
                 trace: Path | None = None) -> dict[str, Any]:
    """The report sections every demo scenario has: ``qemu`` (binary, exit status),
    ``timings`` (boot and whole run, from ``started``, a monotonic time) and ``logs``
    (the console's, the backend's if the lab has one, the trace's if written)."""
    logs = {"console": str(lab.console_log)}
    if lab.backend is not None:
        logs["backend"] = str(lab.backend_log)
    if trace is not None:
        logs["trace"] = str(trace)
    return {"qemu": {"binary": str(qemu), "exit_status": exit_status},
            "timings": {"boot_s": lab.boot_seconds,
                        "total_s": round(time.monotonic() - started, 3)},
            "logs": logs}
