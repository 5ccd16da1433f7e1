"""``pviommu shell`` and ``pviommu run``: a lab for people at a terminal."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path

from .lab import BOOT_TIMEOUT, Lab
from .shell import CommandTimeout
from .topology import Topology

LEAVE = "\x1d"
"""Ctrl-]: leaves ``pviommu shell`` (as telnet does)."""
INTERACTIVE_SETUP = "stty echo; dmesg -n 7; PS1='guest:\\w# '"
"""The console as a person wants it: echo, kernel messages, a prompt with the path."""


def add_lab_options(p: argparse.ArgumentParser) -> None:
    """The options ``shell`` and ``run`` share: the topology and where things go."""
    p.add_argument("topology", nargs="?", type=Path,
                   help="a topology file (docs/LAB.md); default: the PV-IOMMU with a "
                        "virtio-blk and a virtio-rng")
    p.add_argument("--workdir", type=Path,
                   help="where sockets, images and logs go (default: a temporary directory, "
                        "removed at the end unless something failed)")
    p.add_argument("--trace", type=Path, metavar="FILE",
                   help="write the backend's IOMMU traffic to FILE as a Trace Event Format "
                        "timeline (Perfetto, chrome://tracing; docs/TRACING.md)")
    p.add_argument("--boot-timeout", type=float, default=BOOT_TIMEOUT, metavar="SECONDS",
                   help="how long the guest may take to boot (default %(default)g)")


def _lab(args: argparse.Namespace) -> Lab:
    topology = Topology.from_toml(args.topology) if args.topology else Topology()
    return Lab(topology, workdir=args.workdir, trace=args.trace,
               boot_timeout=args.boot_timeout)


def banner(lab: Lab) -> str:
    """What ``pviommu shell`` prints before the console: where to point qmp-shell,
    the endpoints, the logs, how to leave."""
    t = lab.topology
    lines = [f"pviommu: the guest is up ({t.iommu.kind} IOMMU, booted in "
             f"{lab.boot_seconds:.1f}s); its console follows."]
    if lab.backend_qmp_socket is not None:
        lines.append(f"  backend QMP: {lab.backend_qmp_socket}   (qmp-shell PATH, docs/QMP.md)")
    lines.append(f"  QEMU QMP:    {lab.qemu_qmp_socket}")
    for ep in lab.endpoints:
        lines.append(f"  {ep.kind} at {ep.pci} (endpoint ID {ep.endpoint_id:#x})"
                     + (f", image {ep.image}" if ep.image else ""))
    lines.append(f"  logs: {lab.console_log}"
                 + (f", {lab.backend_log}" if lab.backend_qmp_socket else ""))
    lines.append("Leave with Ctrl-] (stops the guest), or type 'poweroff -f' in the guest.")
    return "\n".join(lines)


async def _shell(args: argparse.Namespace) -> int:
    async with _lab(args) as lab:
        await lab.shell.raw(INTERACTIVE_SETUP)
        print(banner(lab), flush=True)
        await lab.release_console()
        lab.console.send("\n")  # a fresh prompt
        await asyncio.to_thread(lab.interact, LEAVE)
        print("\npviommu: leaving; the guest and the backend stop", file=sys.stderr)
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    """``pviommu shell [TOPOLOGY]``: a lab with the guest's console on this terminal."""
    if not sys.stdin.isatty():
        print("pviommu: error: shell needs a terminal on its standard input "
              "(use `pviommu run TOPOLOGY -- COMMAND` in scripts)", file=sys.stderr)
        return 2
    return asyncio.run(_shell(args))


async def _run(args: argparse.Namespace, command: str) -> int:
    async with _lab(args) as lab:
        try:
            result = await lab.run(command, timeout=args.timeout)
        except CommandTimeout as exc:
            print(exc.output, end="" if exc.output.endswith("\n") or not exc.output else "\n")
            print(f"pviommu: {exc}", file=sys.stderr)
            return 124
    print(result.output, end="" if result.output.endswith("\n") or not result.output else "\n")
    return result.status


def cmd_run(args: argparse.Namespace) -> int:
    """``pviommu run [TOPOLOGY] -- COMMAND``: boots a lab, runs one guest command,
    prints its output and exits with its status."""
    command = getattr(args, "guest_command", None)
    if not command:
        print("pviommu: error: give the guest command after --, e.g. "
              "pviommu run lab.toml -- cat /proc/interrupts", file=sys.stderr)
        return 2
    # One argument is a shell command line; several are words, quoted as such.
    line = command[0] if len(command) == 1 else shlex.join(command)
    return asyncio.run(_run(args, line))
