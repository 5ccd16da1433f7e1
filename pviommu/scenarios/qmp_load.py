"""Load on the control plane: does a QMP client polling the IOMMU's mappings at
100 Hz move the guest's disk throughput by more than the noise?

Per IOMMU mode (pv, vsmmu) one lab runs fio workloads (:mod:`.workloads`) in
rounds, each round a pair of runs of every workload: one with the backend's
QMP left alone, one while a second QMP client (its own connection to the
backend's socket, as a monitoring tool or ``qmp-shell`` would be) asks for
the mappings at a fixed rate: in PV mode ``query-viommu-domains`` and then
``query-viommu-mappings`` of each domain, in vSMMU mode ``query-stage2``
(stage 2's ranges). Which run of a pair goes first alternates (ABBA), so
that a drift of the machine falls on both sides.

The noise is the spread of the runs without polling: the polled median is
within the noise when it lies between the lowest and the highest unpolled run.
Beside it: the polls' answer times, the rate reached, the backend's CPU per
second with and without polling (from /proc), and this process's own (the
poller's client side: on a 2-core host it competes with the guest too). A
measurement, not a test: the verdict is reported, nothing is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from ..lab import Endpoint, Iommu, Lab, Topology
from ..lab.state import query
from ..machine.console import GuestFailed
from ..machine.fio import fio_files
from ..microbench.stats import cpu_seconds, summary
from .bench import prepare_guest
from .bench_report import metric
from .workloads import BY_NAME, Workload, job_result

MODES = ("pv", "vsmmu")
MiB = 1 << 20


@dataclass
class LoadPlan:
    """The workloads, how long each run lasts, how many pairs, the polling rate."""

    modes: tuple[str, ...] = MODES
    workloads: tuple[Workload, ...] = field(
        default_factory=lambda: (BY_NAME["randread-4k-qd1"], BY_NAME["read-1m-huge"]))
    runtime: float = 5.0
    pairs: int = 5
    hz: float = 100.0
    strict: bool = True
    image_bytes: int = 256 * MiB
    vcpus: int = 1
    """The guest's vCPUs: one, as the benchmark's guests, so that the backend and
    the poller share the second core rather than fight two vCPUs for it."""


def _topology(mode: str, plan: LoadPlan) -> Topology:
    modules = ("virtio_iommu", "virtio_blk") if mode == "pv" else ("virtio_blk",)
    return Topology(iommu=Iommu(kind=mode, strict=plan.strict),
                    endpoints=(Endpoint("blk", size=plan.image_bytes),),
                    load_modules=modules, files=fio_files(), memory=1 << 30,
                    vcpus=plan.vcpus)


class Poller:
    """A QMP client of its own asking for the mappings ``hz`` times a second.

    Ticks are on a fixed schedule; a poll that overruns its tick makes the next
    start at once (the ticks it covered count as missed, not as queued).
    """

    def __init__(self, socket: Path, mode: str, hz: float) -> None:
        self.socket = socket
        self.mode = mode
        self.period = 1 / hz
        self.client = QMPClient("qmp-load-poller")
        self.latencies_ns: list[int] = []
        self.missed = 0
        self.errors: list[str] = []
        self.mappings_seen = 0

    async def __aenter__(self) -> Poller:
        await self.client.connect(str(self.socket))
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.disconnect(), 10)

    async def poll_once(self) -> None:
        """One snapshot of the mappings (PV: every domain's; vSMMU: stage 2's ranges)."""
        if self.mode == "pv":
            count = 0
            for d in await query(self.client, "query-viommu-domains"):
                count += len(await query(self.client, "query-viommu-mappings",
                                         {"domain": d["id"]}))
            self.mappings_seen = count
        else:
            self.mappings_seen = len((await query(self.client, "query-stage2"))["ranges"])

    async def run(self, stop: asyncio.Event) -> None:
        """Polls until ``stop``."""
        next_tick = time.monotonic()
        while not stop.is_set():
            t0 = time.monotonic_ns()
            try:
                await self.poll_once()
            except Exception as exc:  # reported: a poll that fails is a finding
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.latencies_ns.append(time.monotonic_ns() - t0)
            next_tick += self.period
            now = time.monotonic()
            if now > next_tick:
                self.missed += int((now - next_tick) / self.period)
                next_tick = now
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), next_tick - now)

    def summary(self, seconds: float) -> dict[str, Any]:
        """Polls done, the rate reached, answer times (ms), missed ticks, errors."""
        lat = summary(self.latencies_ns)
        n = int(lat["n"])
        return {"polls": n, "hz": round(n / seconds, 1) if seconds else None,
                "p50_ms": round(lat["median_us"] / 1000, 2) if n else None,
                "p99_ms": round(lat["p99_us"] / 1000, 2) if n else None,
                "missed_ticks": self.missed,
                "errors": self.errors[:5], "error_count": len(self.errors),
                "mappings_last_seen": self.mappings_seen}


async def _job(lab: Lab, w: Workload, plan: LoadPlan, poll: bool) -> dict[str, Any]:
    """One fio run, with the poller on or off; its result and the backend's CPU."""
    assert lab.backend is not None and lab.backend.pid is not None
    pid = lab.backend.pid
    socket = lab.backend_qmp_socket
    assert socket is not None
    stop = asyncio.Event()
    cpu0, t0, own0 = cpu_seconds(pid), time.monotonic(), time.process_time()
    async with contextlib.AsyncExitStack() as stack:
        poller = None
        task = None
        if poll:
            poller = await stack.enter_async_context(Poller(socket, lab.topology.iommu.kind,
                                                            plan.hz))
            task = asyncio.create_task(poller.run(stop))
        try:
            result = await lab.run(w.command(plan.runtime, plan.image_bytes),
                                   timeout=plan.runtime + 120)
        finally:
            stop.set()
            if task is not None:
                await task
    seconds = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    own = time.process_time() - own0  # this process: the lab's console reader, the poller
    if not result.ok:
        raise GuestFailed(f"qmp-load {w.name}: fio failed with status {result.status}: "
                          f"{result.output.strip()[-500:]} (log {lab.console_log})")
    row = {"workload": w.name, "polled": poll, **job_result(result.output),
           "backend_cpu_ms_per_s": round(cpu / seconds * 1000, 1),
           "client_cpu_ms_per_s": round(own / seconds * 1000, 1)}
    if poller is not None:
        row["poller"] = poller.summary(seconds)
    return row


async def load_mode(mode: str, plan: LoadPlan, workdir: Path | None = None,
                    progress: Any = None) -> dict[str, Any]:
    """One mode's pairs of runs, and their comparison per workload."""
    runs: list[dict[str, Any]] = []
    async with Lab(_topology(mode, plan), workdir=workdir) as lab:
        await prepare_guest(lab, plan.workloads)
        for pair in range(plan.pairs):
            order = (False, True) if pair % 2 == 0 else (True, False)
            for w in plan.workloads:
                for poll in order:
                    row = await _job(lab, w, plan, poll)
                    row["pair"] = pair
                    runs.append(row)
                    if progress is not None:
                        progress(f"qmp-load {mode} pair {pair + 1}/{plan.pairs} {w.name} "
                                 f"{'polled  ' if poll else 'unpolled'} "
                                 f"{row[metric(w)]:g} {metric(w)}")
        log = lab.backend_log.read_text(errors="replace")
    return {"mode": mode, "runs": runs, "compare": compare(runs, plan.workloads),
            "backend_tracebacks": log.count("Traceback")}


def compare(runs: list[dict[str, Any]], workloads: tuple[Workload, ...]
            ) -> list[dict[str, Any]]:
    """Per workload: the medians without and with polling, the change, the noise
    (the unpolled runs' range) and whether the polled median lies inside it (None
    for both with a single unpolled run: one run has no spread)."""
    out = []
    for w in workloads:
        key = metric(w)
        off = [r[key] for r in runs if r["workload"] == w.name and not r["polled"]]
        on = [r[key] for r in runs if r["workload"] == w.name and r["polled"]]
        if not off or not on:
            continue
        m_off, m_on = statistics.median(off), statistics.median(on)
        polls = [r["poller"] for r in runs if r["workload"] == w.name and r["polled"]]
        cpu_off = [r["backend_cpu_ms_per_s"] for r in runs
                   if r["workload"] == w.name and not r["polled"]]
        cpu_on = [r["backend_cpu_ms_per_s"] for r in runs
                  if r["workload"] == w.name and r["polled"]]
        out.append({
            "workload": w.name, "unit": key,
            "unpolled": off, "polled": on,
            "median_unpolled": round(m_off, 2), "median_polled": round(m_on, 2),
            "change": round(m_on / m_off - 1, 4) if m_off else None,
            "noise": round((max(off) - min(off)) / m_off, 4) if m_off and len(off) > 1
            else None,
            "within_noise": min(off) <= m_on <= max(off) if len(off) > 1 else None,
            "poll_hz": statistics.median(p["hz"] for p in polls),
            "poll_p50_ms": statistics.median(p["p50_ms"] for p in polls),
            "poll_p99_ms": max(p["p99_ms"] for p in polls),
            "poll_errors": sum(p["error_count"] for p in polls),
            "missed_ticks": sum(p["missed_ticks"] for p in polls),
            "backend_cpu_ms_per_s_unpolled": statistics.median(cpu_off),
            "backend_cpu_ms_per_s_polled": statistics.median(cpu_on),
            "client_cpu_ms_per_s_unpolled": statistics.median(
                r.get("client_cpu_ms_per_s", 0.0) for r in runs
                if r["workload"] == w.name and not r["polled"]),
            "client_cpu_ms_per_s_polled": statistics.median(
                r.get("client_cpu_ms_per_s", 0.0) for r in runs
                if r["workload"] == w.name and r["polled"])})
    return out


async def run(plan: LoadPlan, workdir: Path | None = None, progress: Any = None
              ) -> list[dict[str, Any]]:
    """Every mode, one after the other."""
    reports = []
    for mode in plan.modes:
        cell = workdir / mode if workdir is not None else None
        reports.append(await load_mode(mode, plan, cell, progress))
    return reports


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _verdict(within: bool | None) -> str:
    return "-" if within is None else "yes" if within else "NO"


def markdown(reports: list[dict[str, Any]], plan: LoadPlan) -> str:
    """The comparison table and every run, as Markdown."""
    lines = [f"{plan.pairs} pairs of {plan.runtime:g} s fio runs per workload, polled at "
             f"{plan.hz:g} Hz or left alone, in one lab per mode "
             f"({'strict' if plan.strict else 'lazy'}, {plan.vcpus} vCPU).", "",
             "| mode | workload | unit | unpolled (median) | polled (median) | change "
             "| noise (unpolled range) | within noise | polls/s | poll p50 / p99 ms "
             "| backend CPU ms/s unpolled -> polled | lab process (poller) CPU ms/s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in reports:
        for c in r["compare"]:
            lines.append(
                f"| {r['mode']} | {c['workload']} | {c['unit']} | {c['median_unpolled']:g} | "
                f"{c['median_polled']:g} | {c['change']:+.1%} | {_pct(c['noise'])} | "
                f"{_verdict(c['within_noise'])} | {c['poll_hz']:g} | "
                f"{c['poll_p50_ms']:g} / {c['poll_p99_ms']:g} | "
                f"{c['backend_cpu_ms_per_s_unpolled']:g} -> "
                f"{c['backend_cpu_ms_per_s_polled']:g} | "
                f"{c['client_cpu_ms_per_s_unpolled']:g} -> {c['client_cpu_ms_per_s_polled']:g} |")
    lines += ["", "Every run (in order):", "",
              "| mode | pair | workload | polled | IOPS | MiB/s | clat p99 µs "
              "| backend CPU ms/s | polls/s |",
              "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in reports:
        for x in r["runs"]:
            hz = x["poller"]["hz"] if "poller" in x else "-"
            lines.append(f"| {r['mode']} | {x['pair']} | {x['workload']} | "
                         f"{'yes' if x['polled'] else 'no'} | {x['iops']:g} | {x['mib_s']:g} | "
                         f"{x['clat_p99_us']} | {x['backend_cpu_ms_per_s']:g} | {hz} |")
    return "\n".join(lines)
