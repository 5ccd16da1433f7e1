"""The backend killed (SIGKILL) under a running guest's disk I/O and started again:
nothing is lost.

vSMMU mode, the disk on QEMU's vhost-user-blk-pci with ``reconnect-ms`` (the one
device stock QEMU 10.2 reconnects; docs/ARCHITECTURE.md "Restarting the
backend"). The host changes stage 2 over QMP first (an alias range outside guest
RAM, mapped, partly made read-only, a page unmapped); then the guest writes
random blocks and reads each back (guest-kernel-config/restart-io.sh), while the
backend is frozen (SIGSTOP, 0.5 s: the writers' requests pile up, some taken by
the backend, the rest in the avail ring), killed (SIGKILL) and restarted. It
must hold: QEMU alive, every write completed, every block verified (sha256) as
read back, in the guest at the end and in the image on the host, no I/O error in
the guest's kernel log, QEMU's in-flight region mapped by both backends, and
``query-stage2`` as before the kill.

At queue depth 1 nothing more is needed: QEMU's SET_VRING_BASE after the
reconnect is the used index it read in guest memory, so the one request in
flight is fetched again from the avail ring. With several writers at once the
backend completes out of order, and the requests in flight are found in the
in-flight region QEMU kept (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) and submitted
again.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import re
import signal
from pathlib import Path

import pytest

from pviommu.lab import Endpoint, ExtraFile, Iommu, Lab, Topology
from pviommu.resources import repo_path

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

BLOCK = 65536
COUNT = 40
"""Blocks each writer writes."""
ALIAS = 0x10_0000_0000
"""An IPA range outside guest RAM that the host maps, protects and punches: stage 2
the guest never uses but the backend must keep."""
LINE = re.compile(r"^RIO (\d+) (ok|BAD|WERR|RERR) ([\d.]+)", re.M)


def _topology() -> Topology:
    return Topology(iommu=Iommu(kind="vsmmu", strict=True),
                    endpoints=(Endpoint("blk", size=16 << 20, reconnect_ms=200),),
                    files=(ExtraFile(repo_path("guest-kernel-config", "restart-io.sh"),
                                     "/root/restart-io.sh"),))


async def _stage2(lab: Lab) -> dict:
    state = await lab.backend_qmp.execute("query-stage2")
    assert isinstance(state, dict)
    return state


def _mapped_inflight(pid: int) -> bool:
    """Whether process ``pid`` maps an in-flight region (QEMU's SET_INFLIGHT_FD)."""
    return "pviommu-inflight" in Path(f"/proc/{pid}/maps").read_text()


def _pause(output: str) -> float:
    """The longest gap between two completions the guest saw (seconds)."""
    stamps = sorted(float(m.group(3)) for m in LINE.finditer(output))
    return max((b - a for a, b in itertools.pairwise(stamps)), default=0.0)


@pytest.mark.parametrize("jobs", [1, 4])
async def test_a_killed_backend_restarts_under_guest_io_and_nothing_is_lost(jobs, tmp_path):
    async with Lab(_topology(), workdir=tmp_path / "lab") as lab:
        qmp = lab.backend_qmp
        await qmp.execute("stage2-map", {"start": ALIAS, "size": 0x20_0000, "pa": 0x4000_0000})
        await qmp.execute("stage2-protect", {"start": ALIAS + 0x10_0000, "size": 0x10_0000,
                                             "read": True, "write": False})
        await qmp.execute("stage2-unmap", {"start": ALIAS + 0x8000, "size": 0x1000})
        io = asyncio.create_task(lab.run(f"sh /root/restart-io.sh vda {jobs} {COUNT}",
                                         timeout=600))
        # Kill it in the middle of the I/O.
        await lab.console.wait_line(r"^RIO \d+ ok", 300)
        await asyncio.sleep(0.3)
        before = await _stage2(lab)
        assert any(r["ipa-start"] == ALIAS + 0x10_0000 and not r["write"]
                   for r in before["ranges"])
        old_pid = lab.backend.pid if lab.backend is not None else None
        assert old_pid is not None
        inflight_region = _mapped_inflight(old_pid)
        # Frozen first, so that the writers' requests pile up in flight: some taken by
        # the backend, the rest waiting in the avail ring; then killed.
        os.kill(old_pid, signal.SIGSTOP)
        await asyncio.sleep(0.5)
        away = await lab.restart_backend(kill=True)
        assert lab.backend is not None and lab.backend.pid != old_pid
        after = await _stage2(lab)  # before QEMU is back: what the backend took up
        await lab.console.wait_line(r"^RIO_END", 300)
        assert lab.backend.pid is not None
        inflight_region_after = _mapped_inflight(lab.backend.pid)
        result = await io
        assert lab.machine is not None and lab.machine.child is not None
        assert lab.machine.child.isalive(), "QEMU died"
        status = await lab.qemu_qmp.execute("query-status")
        kernel = await lab.kernel_log()
        listing = await lab.run("cd /tmp/rio && for f in [0-9]*; do echo \"$f $(cat $f)\"; "
                                "done", check=True)
        again = await _stage2(lab)
        log_text = lab.backend_log.read_text(errors="replace")
    sums = {int(b): d for b, d in (x.split() for x in listing.lines() if x.strip())}
    image = lab.endpoint("blk").image
    assert image is not None
    with open(image, "rb") as fh:
        host_bad = [b for b, d in sums.items()
                    if (fh.seek(b * BLOCK), hashlib.sha256(fh.read(BLOCK)).hexdigest())[1] != d]
    pause = _pause(result.output)
    resubmitted = sum(int(n) for n in re.findall(r"(\d+) requests in flight when", log_text))
    log.warning("restart: backend away %.2f s, the guest's longest pause %.2f s, "
                "%d blocks, %d requests resubmitted", away, pause, len(sums), resubmitted)
    print(f"{jobs} writers: backend away {away:.2f} s; the guest's longest pause "
          f"{pause:.2f} s; {resubmitted} requests in flight submitted again")

    assert status["status"] == "running"
    assert result.status == 0, result.output[-2000:]
    end = re.search(r"RIO_END blocks=(\d+) verified=(\d+) bad=(\d+) errors=(\d+)",
                    result.output)
    assert end is not None, result.output[-2000:]
    assert end.groups() == (str(jobs * COUNT), str(jobs * COUNT), "0", "0")
    assert len(sums) == jobs * COUNT and host_bad == []
    assert not [x for x in kernel if "I/O error" in x or "blk_update_request" in x]
    # Stage 2 as before the kill (the restarted backend took it up, QEMU's memory
    # table adopted nothing anew), and the composed translations were rebuilt.
    assert after == before
    assert {k: v for k, v in again.items() if k != "table-bytes"} == {
        k: v for k, v in before.items() if k != "table-bytes"}
    assert log_text.count("Traceback") == 0
    # QEMU handed the in-flight region to both backends (the second got the first's).
    assert inflight_region and inflight_region_after
    assert pause < 60
