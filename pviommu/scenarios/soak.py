"""The soak: guest I/O for minutes while the host injects faults and takes mappings
away several times a second; nothing may be lost, nothing may leak.

Per IOMMU mode (pv, vsmmu) one lab runs guest-kernel-config/soak-io.sh: random
4 KiB writes of random data, each read back and compared, every block checked
again at the end; a request the host made fail is retried by the guest. At the
same time the host, over the backend's QMP, alternately injects a fault and
takes a live mapping away (pv: ``inject-fault``, ``revoke-mapping``; vsmmu: a
rogue ``inject-dma`` refused at stage 1, and ``stage2-unmap`` under the next
DMA then ``stage2-map`` back once the fault is seen). It samples the backend's
RSS and open fds, and at the end checks every block the guest wrote in the
image file on the host, and the backend's log for tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..lab import Endpoint, ExtraFile, Iommu, Lab, Topology
from ..lab.state import query
from ..qmp.vsmmu import EVENT_VSMMU
from ..resources import repo_path

MODES = ("pv", "vsmmu")
BLOCK = 4096


@dataclass
class SoakPlan:
    """How long each mode runs, how often the host acts, how many blocks are used."""

    seconds: float = 600
    modes: tuple[str, ...] = MODES
    actions_per_second: float = 4
    blocks: int = 2048
    sample_every: float = 5.0


def _topology(mode: str) -> Topology:
    return Topology(iommu=Iommu(kind=mode, strict=True),
                    endpoints=(Endpoint("blk", size=BLOCK * 4096),),
                    files=(ExtraFile(repo_path("guest-kernel-config", "soak-io.sh"),
                                     "/root/soak-io.sh"),))


_RSS_FIELDS = {"VmRSS": "rss_kib", "RssAnon": "rss_anon_kib", "RssFile": "rss_file_kib",
               "RssShmem": "rss_shmem_kib"}


def _resources(pid: int) -> dict[str, int]:
    """The backend's RSS, split as /proc/PID/status does, and its open fds.

    ``rss_kib`` (VmRSS) is the sum of the three parts. ``rss_shmem_kib`` counts the
    pages of the guest's RAM (the frontend's shared memfd, mapped whole by each
    transport that needs it) that the backend has touched: it grows with every new
    guest page a DMA lands on, up to the guest's RAM size per mapping, and is QEMU's
    memory, not the backend's. ``rss_anon_kib`` is the backend's own heap (Python
    objects, malloc arenas, thread stacks): a leak shows there.
    """
    out = dict.fromkeys(_RSS_FIELDS.values(), 0)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in _RSS_FIELDS:
            out[_RSS_FIELDS[key]] = int(value.split()[0])
    return {**out, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class _Host:
    """The host's side of one mode's soak: faults, revocations, samples."""

    def __init__(self, lab: Lab, mode: str, plan: SoakPlan) -> None:
        self.lab = lab
        self.mode = mode
        self.plan = plan
        self.disk = lab.endpoint("blk").endpoint_id
        self.counts = {"faults_injected": 0, "mappings_taken": 0, "mappings_given_back": 0,
                       "stage2_faults_seen": 0}
        self.samples: list[dict[str, Any]] = []
        self._rng = random.Random(0x50A4)

    async def act(self, stop: asyncio.Event) -> None:
        """Alternates a fault and a revocation until ``stop``."""
        period = 1 / self.plan.actions_per_second
        turn = 0
        while not stop.is_set():
            turn += 1
            if turn % 2:
                await self._fault()
            else:
                await self._take_mapping(stop)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)

    async def _fault(self) -> None:
        client = self.lab.backend_qmp
        address = 0xDEAD000 + (self._rng.randrange(256) << 12)
        if self.mode == "pv":
            await query(client, "inject-fault", {"endpoint": self.disk, "address": address,
                                                 "access": "read", "reason": "mapping"})
        else:  # a rogue read at an address the guest never mapped: refused at stage 1
            await query(client, "inject-dma", {"endpoint": self.disk, "address": address,
                                               "access": "read", "size": 4})
        self.counts["faults_injected"] += 1

    async def _take_mapping(self, stop: asyncio.Event) -> None:
        client = self.lab.backend_qmp
        access = self._rng.choice(("read", "write"))
        if self.mode == "pv":
            await query(client, "revoke-mapping", {"endpoint": self.disk, "min-size": BLOCK,
                                                   "access": access})
            self.counts["mappings_taken"] += 1
            return
        since = len(self.lab.backend_events)
        await query(client, "stage2-unmap", {"endpoint": self.disk, "min-size": BLOCK,
                                             "access": access})
        self.counts["mappings_taken"] += 1
        while not stop.is_set():  # the page stays out until the device met the fault
            try:
                event = await self.lab.wait_event(EVENT_VSMMU, 1.0, since)
            except TimeoutError:
                continue
            self.counts["stage2_faults_seen"] += 1
            await query(client, "stage2-map", {"start": event["data"]["ipa"] & ~0xFFF,
                                               "size": BLOCK})
            self.counts["mappings_given_back"] += 1
            return

    async def sample(self, stop: asyncio.Event) -> None:
        """Samples the backend's RSS and open fds until ``stop``."""
        assert self.lab.backend is not None and self.lab.backend.pid is not None
        t0 = time.monotonic()
        while True:
            self.samples.append({"t_s": round(time.monotonic() - t0, 1),
                                 **_resources(self.lab.backend.pid)})
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.plan.sample_every)


def _parse_soak_line(output: str) -> dict[str, int]:
    line = next((x for x in output.splitlines() if x.startswith("SOAK ")), "")
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}


def _host_check(image: Path, sums: dict[int, str]) -> int:
    """How many of the guest's blocks the image holds as the guest last wrote them."""
    good = 0
    with open(image, "rb") as fh:
        for block, digest in sums.items():
            fh.seek(block * BLOCK)
            good += hashlib.sha256(fh.read(BLOCK)).hexdigest() == digest
    return good


async def soak_mode(mode: str, plan: SoakPlan, workdir: Path | None = None,
                    qemu: Path | None = None) -> dict[str, Any]:
    """One mode's soak; its report (see :func:`ok` for what must hold)."""
    async with Lab(_topology(mode), workdir=workdir, qemu=qemu) as lab:
        host = _Host(lab, mode, plan)
        stop = asyncio.Event()
        sampler = asyncio.create_task(host.sample(stop))
        actor = asyncio.create_task(host.act(stop))
        t0 = time.monotonic()
        try:
            result = await lab.run(f"sh /root/soak-io.sh vda {plan.blocks} {int(plan.seconds)}",
                                   timeout=plan.seconds + 600)
        finally:
            stop.set()
            await asyncio.gather(actor, sampler, return_exceptions=True)
        elapsed = time.monotonic() - t0
        if actor.done() and not actor.cancelled() and actor.exception() is not None:
            raise actor.exception()  # type: ignore[misc]
        listing = await lab.run("cd /tmp/soak && for f in *; do echo \"$f $(cat $f)\"; done",
                                check=True)
        sums = {int(b): d for b, d in (x.split() for x in listing.lines() if x.strip())}
        image = lab.endpoint("blk").image
        assert image is not None
        host_good = _host_check(image, sums)
        kernel = await lab.kernel_log()
        state = await lab.iommu_state()
        log = lab.backend_log.read_text(errors="replace")
    guest = _parse_soak_line(result.output)
    return {
        "mode": mode, "seconds": round(elapsed, 1), "guest_status": result.status,
        "guest": guest, "guest_output_tail": result.output.splitlines()[-5:],
        "host_blocks_checked": len(sums), "host_blocks_good": host_good,
        "host": host.counts, "samples": host.samples,
        "guest_io_errors": sum("I/O error" in line for line in kernel),
        "backend_tracebacks": log.count("Traceback"),
        "faults_reported": state.get("faults_reported"),
        "stage2_events": len(state.get("events", [])) if mode == "vsmmu" else None,
    }


def flat(samples: list[dict[str, Any]], key: str, slack: float) -> bool:
    """Whether ``key`` ends within ``slack`` (a fraction) of its value after warm-up
    (the second sample on)."""
    if len(samples) < 3:
        return True
    base = float(samples[1][key])
    return max(float(s[key]) for s in samples[1:]) <= base * (1 + slack) + 1


def ok(report: dict[str, Any]) -> bool:
    """What a soak must show: the guest's exit status 0 with no bad block, every block
    the guest wrote right in the image, host actions done, the backend's own memory
    (anonymous RSS) within 10 % and its fds flat, no traceback.

    The whole VmRSS is reported, not checked: it also counts the guest RAM pages the
    backend's mapping of the guest's memfd has touched, which grow with the guest's
    I/O (new buffers on new pages) up to the guest's RAM, whatever the backend keeps
    (:func:`_resources`)."""
    g = report["guest"]
    return bool(report["guest_status"] == 0 and g.get("bad", 1) == 0
            and g.get("verified") == report["host_blocks_checked"]
            and report["host_blocks_good"] == report["host_blocks_checked"] > 0
            and report["host"]["mappings_taken"] > 0 and report["host"]["faults_injected"] > 0
            and flat(report["samples"], "rss_anon_kib", 0.10)
            and flat(report["samples"], "fds", 0)
            and report["backend_tracebacks"] == 0)


async def run(plan: SoakPlan, workdir: Path | None = None, progress: Any = None
              ) -> list[dict[str, Any]]:
    """Every mode's soak, one after the other."""
    reports = []
    for mode in plan.modes:
        if progress is not None:
            progress(f"soak: {mode} for {plan.seconds:g}s")
        cell = workdir / mode if workdir is not None else None
        reports.append(await soak_mode(mode, plan, cell))
    return reports


def markdown(reports: list[dict[str, Any]]) -> str:
    """The soak's summary and its samples, as Markdown."""
    lines = ["| mode | seconds | writes | reads | retries (w/r) | blocks checked (guest, host) "
             "| faults injected | mappings taken | guest I/O errors | anon RSS KiB first -> last "
             "| VmRSS KiB first -> last | fds first -> last | tracebacks | ok |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | --- |"]
    for r in reports:
        g, s = r["guest"], r["samples"]
        lines.append(
            f"| {r['mode']} | {r['seconds']:.0f} | {g.get('writes')} | {g.get('reads')} | "
            f"{g.get('write_retries')}/{g.get('read_retries')} | "
            f"{g.get('verified')}, {r['host_blocks_good']}/{r['host_blocks_checked']} | "
            f"{r['host']['faults_injected']} | {r['host']['mappings_taken']} | "
            f"{r['guest_io_errors']} | {s[0]['rss_anon_kib']} -> {s[-1]['rss_anon_kib']} | "
            f"{s[0]['rss_kib']} -> {s[-1]['rss_kib']} | "
            f"{s[0]['fds']} -> {s[-1]['fds']} | {r['backend_tracebacks']} | "
            f"{'yes' if ok(r) else 'NO'} |")
    for r in reports:
        lines += ["", f"{r['mode']}: backend RSS (KiB; anon: its own heap, shmem: the guest "
                  "RAM pages it touched) and open fds over time", "",
                  "| t (s) | RSS KiB | anon KiB | shmem KiB | fds |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {x['t_s']:.0f} | {x['rss_kib']} | {x.get('rss_anon_kib', '')} | "
                  f"{x.get('rss_shmem_kib', '')} | {x['fds']} |" for x in r["samples"]]
    return "\n".join(lines)
