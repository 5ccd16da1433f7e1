"""The ``pviommu`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import libfdt

from . import kconfig, provision
from .backend import Backend, BackendConfig
from .endpoints import EndpointSpec, create_image, kind_option, parse_endpoint_id
from .fuzz.cli import add_fuzz_parser
from .iommu.pv import IommuConfig, ResvRegion, ResvType
from .lab import LabError, TopologyError
from .lab.commands import add_lab_options, cmd_run, cmd_shell
from .machine.console import GuestFailed, GuestTimeout
from .machine.dtb import DtbError, add_pci_iommu
from .machine.guest_image import (
    DEFAULT_MODULES,
    ExtraFile,
    GuestImageError,
    build_guest_image,
)
from .machine.modules import ModuleError
from .machine.qemu import QemuError
from .machine.topology import pci_name
from .microbench import markdown as microbench_markdown
from .microbench.__main__ import main as microbench_main
from .qmp.server import MAX_CLIENTS as QMP_MAX_CLIENTS
from .report import format_report
from .scenarios import bench, bench_report, dma, pv, qmp_load, soak, vsmmu
from .scenarios.workloads import BY_NAME
from .transport.unix_socket import SocketPathError, resolve_group
from .transport.vfio_user.protocol import MAX_DMA_MAPS
from .transport.vfio_user.server import DEFAULT_MAX_DMA_MAPS

DEMO_MODES = ("pv", "vsmmu", "builtin")


def _add_guest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", type=Path, help="guest kernel Image to use instead of Debian's")
    p.add_argument("--modules", type=Path,
                   help="the /lib/modules/VERSION directory that goes with --kernel")


def cmd_setup(args: argparse.Namespace) -> int:
    qemu, assets = provision.setup(args.kernel, args.modules)
    print(f"qemu:    {qemu}")
    print(f"kernel:  {assets.kernel}")
    print(f"modules: {assets.modules}")
    print(f"busybox: {assets.busybox}")
    return 0


def cmd_check_kernel(args: argparse.Namespace) -> int:
    try:
        config = Path(args.config).read_text()
    except OSError as exc:
        print(f"pviommu: cannot read {args.config}: {exc.strerror}", file=sys.stderr)
        return 2
    fragment = Path(args.fragment) if args.fragment else kconfig.default_fragment()
    problems = kconfig.check(config, fragment.read_text())
    if not problems:
        print(f"{args.config}: all {len(kconfig.parse_config(fragment.read_text()))} "
              f"options of {fragment.name} are satisfied")
        return 0
    print(f"{args.config}: {len(problems)} option(s) not as the guest needs:")
    for p in problems:
        print(f"  {p}")
    return 1


def demo_ok(report: dict) -> bool:
    """Whether a demo report shows what its mode promises."""
    if report["mode"] == "builtin":
        return bool(report["dma"]["checksums_ok"])
    if report["mode"] == "vsmmu":
        return vsmmu.shows_everything(report)
    attached = any(e.get("attached") for e in report["iommu"]["endpoints"])
    seen = any(f.get("guest_log") and f.get("qmp_event") for f in report["faults"])
    ok = attached and seen
    if "dma" in report:
        ok = ok and report["dma"]["checksums_ok"]
    if "rng" in report:
        ok = ok and report["rng"]["ok"]
    if "revocation" in report:
        rev = report["revocation"]
        ok = ok and rev["memory_unchanged"] and rev["recovered"] and any(
            f.get("io_errors") and f.get("qmp_event") for f in report["faults"])
    return ok


def cmd_demo(args: argparse.Namespace) -> int:
    qemu, assets = provision.setup(args.kernel, args.modules)
    workdir = args.workdir
    if workdir is None:
        workdir = provision.cache_dir() / "runs" / "demo"
        shutil.rmtree(workdir, ignore_errors=True)  # ours alone: never a user's --workdir
    if not args.json:
        print(f"pviommu: booting the {args.mode} demo (logs in {workdir})", file=sys.stderr)
    if args.mode == "pv":
        # A revocation needs a DMA domain: identity domains have nothing to revoke.
        options = pv.PvOptions(iommu=iommu_config(args), passthrough=args.passthrough,
                               revoke=not args.passthrough)
        scenario = pv.run(qemu, assets, workdir, options, trace=args.trace)
    elif args.mode == "vsmmu":
        scenario = vsmmu.run(qemu, assets, workdir, trace=args.trace)
    else:
        if args.trace is not None:
            print("pviommu: --trace: the builtin mode has no backend to trace", file=sys.stderr)
            return 2
        scenario = dma.run(qemu, assets, workdir, mode=args.mode)
    try:
        report = asyncio.run(scenario)
    except (GuestFailed, GuestTimeout, QemuError) as exc:
        raise type(exc)(f"{exc} (guest console log: {workdir / 'console.log'})") from exc
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if demo_ok(report) else 1


def cmd_bench(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        print("pviommu: error: --rounds must be at least 1", file=sys.stderr)
        return 2
    unknown = [p for p in args.paths if p not in bench.PATHS]
    if unknown or not args.paths:
        print(f"pviommu: error: --paths takes some of {','.join(bench.PATHS)}", file=sys.stderr)
        return 2
    unknown = [w for w in args.workloads if w not in BY_NAME]
    if unknown or not args.workloads:
        print(f"pviommu: error: --workloads takes some of {','.join(BY_NAME)}", file=sys.stderr)
        return 2
    if args.runtime <= 0:
        print("pviommu: error: --runtime must be positive", file=sys.stderr)
        return 2
    qemu, assets = provision.setup(args.kernel, args.modules)
    workdir = args.workdir or provision.cache_dir() / "runs" / "bench"
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    plan = bench.BenchPlan(rounds=args.rounds, paths=tuple(args.paths), runtime=args.runtime,
                           workloads=tuple(BY_NAME[w] for w in args.workloads),
                           vcpus=args.vcpus)
    print(f"pviommu: benchmark, {plan.rounds} round(s) of "
          f"{len(plan.paths) * len(bench.IOMMU_MODES)} guests of {plan.vcpus} vCPU(s) "
          f"(logs in {workdir})",
          file=sys.stderr)
    result = asyncio.run(bench.run(qemu, assets, workdir, plan,
                                   progress=lambda line: print(line, file=sys.stderr),
                                   trace=args.trace))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        if result.get("micro"):
            print(microbench_markdown(result["micro"]))
            print()
        for table in (bench_report.markdown, bench_report.markdown_cost_model,
                      bench_report.markdown_references, bench_report.markdown_latency,
                      bench_report.markdown_samples):
            print(table(result))
            print()
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    unknown = [m for m in args.modes if m not in soak.MODES]
    if unknown or not args.modes or args.minutes <= 0:
        print(f"pviommu: error: --modes takes some of {','.join(soak.MODES)}, --minutes a "
              "positive number", file=sys.stderr)
        return 2
    provision.setup()
    plan = soak.SoakPlan(seconds=args.minutes * 60, modes=tuple(args.modes))
    reports = asyncio.run(soak.run(plan, args.workdir,
                                   progress=lambda line: print(line, file=sys.stderr)))
    print(json.dumps(reports, indent=2) if args.json else soak.markdown(reports))
    return 0 if all(soak.ok(r) for r in reports) else 1


def cmd_qmp_load(args: argparse.Namespace) -> int:
    unknown = [m for m in args.modes if m not in qmp_load.MODES]
    bad = [w for w in args.workloads if w not in BY_NAME]
    if unknown or not args.modes or bad or not args.workloads:
        print(f"pviommu: error: --modes takes some of {','.join(qmp_load.MODES)}, "
              f"--workloads some of {','.join(BY_NAME)}", file=sys.stderr)
        return 2
    provision.setup()
    plan = qmp_load.LoadPlan(modes=tuple(args.modes), pairs=args.pairs, hz=args.hz,
                             runtime=args.runtime, strict=not args.lazy,
                             workloads=tuple(BY_NAME[w] for w in args.workloads))
    reports = asyncio.run(qmp_load.run(plan, args.workdir,
                                       progress=lambda line: print(line, file=sys.stderr)))
    print(json.dumps(reports, indent=2) if args.json else qmp_load.markdown(reports, plan))
    return 0


def _endpoint_id(text: str) -> int:
    """An endpoint ID: a number (0x10, 16) or a PCI address ([BUS:]DEV.FN)."""
    try:
        return parse_endpoint_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _max_dma_maps(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= value <= MAX_DMA_MAPS:
        raise argparse.ArgumentTypeError(f"{value} is not in 1..{MAX_DMA_MAPS}")
    return value


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer (any base Python reads) of at least ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not at least {low}")
        return value
    return parse


def _names(text: str) -> list[str]:
    """An argparse type: a comma-separated list of names (empty ones dropped)."""
    return [x for x in text.split(",") if x]


def _positive(text: str) -> float:
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def _endpoint_device(kind: str, transport: str = "vfio-user") -> Callable[[str], EndpointSpec]:
    """Parses SOCKET,endpoint=ID[,image=PATH][,size=SIZE][,ro][,serial=S]."""
    def parse(text: str) -> EndpointSpec:
        try:
            return EndpointSpec.parse(kind, text, transport)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = f"--{kind_option(kind, transport)}"
    return parse


def _range(text: str) -> tuple[int, int]:
    """START:END (inclusive), numbers in any base Python accepts."""
    try:
        start, end = (int(x, 0) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START:END") from None
    if start > end:
        raise argparse.ArgumentTypeError(f"{text}: start is above end")
    return start, end


def iommu_config(args: argparse.Namespace) -> IommuConfig:
    """The PV-IOMMU configuration the serve/demo options describe."""
    kwargs: dict = {"bypass": args.bypass, "bypass_config": not args.no_bypass_config,
                    "mmio": args.mmio, "probe_size": args.probe_size,
                    "page_size_mask": args.page_size_mask,
                    "max_domains": args.max_domains, "max_mappings": args.max_mappings,
                    "reserved": [ResvRegion(s, e, ResvType.RESERVED) for s, e in args.reserved]}
    if args.input_range:
        kwargs["input_start"], kwargs["input_end"] = args.input_range
    if args.domain_range:
        kwargs["domain_start"], kwargs["domain_end"] = args.domain_range
    if args.no_msi_region:
        kwargs["msi_doorbell"] = None
    try:
        return IommuConfig(**kwargs)
    except ValueError as exc:
        raise SystemExit(f"pviommu: error: {exc}") from None


def _add_iommu_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PV-IOMMU device")
    g.add_argument("--page-size-mask", type=lambda t: int(t, 0),
                   default=IommuConfig.page_size_mask,
                   help="page_size_mask (default 0xfffffffffffff000: 4 KiB granule)")
    g.add_argument("--input-range", type=_range, help="START:END of I/O virtual addresses "
                   "(default: the whole 64-bit space)")
    g.add_argument("--domain-range", type=_range, help="START:END of domain IDs "
                   "(default 0:0xffffffff)")
    g.add_argument("--probe-size", type=int, default=IommuConfig.probe_size,
                   help="PROBE property buffer size (default %(default)s)")
    g.add_argument("--bypass", action="store_true",
                   help="unattached endpoints bypass translation until the driver says not")
    g.add_argument("--no-bypass-config", action="store_true",
                   help="do not offer VIRTIO_IOMMU_F_BYPASS_CONFIG (identity domains then "
                        "arrive as MAP requests)")
    g.add_argument("--mmio", action="store_true", help="offer VIRTIO_IOMMU_F_MMIO")
    g.add_argument("--reserved", type=_range, action="append", default=[],
                   metavar="START:END", help="an extra reserved region every endpoint reports "
                                             "in PROBE (repeatable)")
    g.add_argument("--no-msi-region", action="store_true",
                   help="do not report the GICv3 ITS doorbell page as an MSI region")
    g.add_argument("--max-domains", type=int, default=IommuConfig.max_domains,
                   help="domains the guest may create before ATTACH answers S_NOMEM "
                        "(default %(default)s)")
    g.add_argument("--max-mappings", type=int, default=IommuConfig.max_mappings,
                   help="mappings, over all domains, before MAP answers S_NOMEM "
                        "(default %(default)s)")


async def _serve(config: BackendConfig) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    # SIGHUP (the terminal went away) stops the backend like SIGTERM, sockets removed.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel)
    async with Backend(config) as backend:
        if config.viommu_socket is not None:
            print(f"pviommu: serving virtio-iommu on {config.viommu_socket}"
                  + (f", QMP on {config.qmp_socket}" if config.qmp_socket else ""),
                  file=sys.stderr, flush=True)
        elif config.qmp_socket:
            print(f"pviommu: QMP on {config.qmp_socket}", file=sys.stderr, flush=True)
        for d in config.devices:
            where = "" if d.mode == "pv" else ", vSMMU mode over vhost-user"
            print(f"pviommu: serving virtio-{d.kind} endpoint {d.endpoint:#x} "
                  f"({pci_name(d.endpoint)}{where}) on {d.socket}", file=sys.stderr, flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await backend.serve_forever()


def _extra_file(text: str) -> ExtraFile:
    try:
        return ExtraFile.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_guest_image(args: argparse.Namespace) -> int:
    modules = ([] if args.no_default_modules else list(DEFAULT_MODULES)) + args.module
    assets = provision.fetch_guest(args.kernel, args.modules)
    try:
        loaded = build_guest_image(args.output, busybox=assets.busybox,
                                   modules_dir=assets.modules, modules=modules,
                                   files=args.file, init=args.init)
    except (ModuleError, GuestImageError) as exc:
        print(f"pviommu: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pviommu: error: {args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{args.output}: loads {', '.join(m.name for m in loaded) or 'no module'}, then "
          + (f"runs {args.init}" if args.init else "a shell on the console"))
    print(f"kernel:  {assets.kernel}")
    return 0


def cmd_patch_dtb(args: argparse.Namespace) -> int:
    try:
        data = args.input.read_bytes()
        args.output.write_bytes(add_pci_iommu(data, iommu_rid=args.iommu))
    except OSError as exc:
        print(f"pviommu: error: {exc}", file=sys.stderr)
        return 1
    except (DtbError, libfdt.FdtException) as exc:
        print(f"pviommu: error: {args.input}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.output}: virtio-iommu at RID {args.iommu:#x}, iommu-map for the rest "
          "of the bus")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    devices = args.blk + args.rng + args.vsmmu_blk + args.vsmmu_rng
    if args.viommu is None and args.blk + args.rng:
        print("pviommu: error: --blk and --rng endpoints sit behind the PV-IOMMU: "
              "give its socket with --viommu", file=sys.stderr)
        return 2
    if args.viommu is None and not devices:
        print("pviommu: error: nothing to serve: give --viommu, or vSMMU endpoints "
              "(--vsmmu-blk, --vsmmu-rng)", file=sys.stderr)
        return 2
    ids = [d.endpoint for d in devices]
    if len(set(ids)) != len(ids):
        print("pviommu: error: two endpoint devices share an endpoint ID", file=sys.stderr)
        return 2
    try:
        group = None if args.socket_group is None else resolve_group(args.socket_group)
    except SocketPathError as exc:
        print(f"pviommu: error: {exc}", file=sys.stderr)
        return 2
    for d in args.blk + args.vsmmu_blk:
        try:
            if create_image(d):
                print(f"pviommu: created {d.image} ({d.size} bytes, sparse)", file=sys.stderr)
        except (OSError, ValueError) as exc:
            print(f"pviommu: error: {exc}", file=sys.stderr)
            return 2
    config = BackendConfig(viommu_socket=args.viommu, qmp_socket=args.qmp,
                           endpoints=args.endpoint or None, iommu=iommu_config(args),
                           devices=devices, socket_group=group,
                           max_dma_maps=args.max_dma_maps,
                           qmp_max_clients=args.qmp_max_clients,
                           allow_unsealed_memory=args.allow_unsealed_memory,
                           trace=args.trace, kick_thread=not args.no_kick_thread,
                           state_dir=args.state,
                           poll_us=args.poll_us)
    if os.environ.get("PVIOMMU_DEBUG_NO_GC"):
        gc.disable()  # tests: a gone client's memory must be freed without the collector
    try:
        asyncio.run(_serve(config))
    except OSError as exc:
        print(f"pviommu: error: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pviommu`` command."""
    parser = argparse.ArgumentParser(
        prog="pviommu", description="Out-of-process IOMMU lab for QEMU Arm virt guests.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what pviommu does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("setup", help="provision QEMU and the guest assets (what is missing)")
    _add_guest_options(p)
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("check-kernel",
                       help="check a kernel config against the options the guest needs")
    p.add_argument("config", help="a kernel .config file, e.g. /boot/config-VERSION")
    p.add_argument("--fragment", help="the required options (default: guest-kernel-config/"
                                      "pviommu.config)")
    p.set_defaults(func=cmd_check_kernel)

    p = sub.add_parser("serve", help="run the backend: a PV-IOMMU on a vhost-user socket and "
                                     "its endpoints on vfio-user sockets, and/or vSMMU "
                                     "endpoints on vhost-user sockets")
    p.add_argument("--viommu", type=Path, metavar="PATH",
                   help="vhost-user socket for QEMU's vhost-user-test-device-pci (the "
                        "PV-IOMMU); needed unless only vSMMU endpoints are served")
    p.add_argument("--qmp", type=Path, metavar="PATH", help="QMP socket of the backend")
    p.add_argument("--qmp-max-clients", type=_at_least(1), default=QMP_MAX_CLIENTS, metavar="N",
                   help="QMP clients connected at once; one more is refused with an error "
                        "(default %(default)s)")
    p.add_argument("--endpoint", type=_endpoint_id, action="append", metavar="ID",
                   help="endpoint ID (PCI RID, e.g. 0x10 or 00:02.0) of a device behind the "
                        "IOMMU; repeatable. ATTACH of any other ID fails with NOENT. "
                        "Without it every ID is accepted (unless --blk/--rng name them)")
    p.add_argument("--blk", type=_endpoint_device("blk"), action="append", default=[],
                   metavar="SOCKET,endpoint=ID,image=PATH[,size=SIZE][,ro][,serial=S]",
                   help="serve a virtio-blk endpoint over vfio-user on SOCKET, backed by the "
                        "image file PATH; ID is its PCI address or RID (repeatable). With "
                        "size= (e.g. 64M) a missing image is created sparse, and an existing "
                        "one must have that size")
    p.add_argument("--rng", type=_endpoint_device("rng"), action="append", default=[],
                   metavar="SOCKET,endpoint=ID",
                   help="serve a virtio-rng endpoint over vfio-user on SOCKET (repeatable)")
    p.add_argument("--vsmmu-blk", type=_endpoint_device("blk", "vhost-user"), action="append",
                   default=[], metavar="SOCKET,endpoint=ID,image=PATH[,size=SIZE][,ro][,serial=S]",
                   help="serve a virtio-blk endpoint in vSMMU mode: over vhost-user on SOCKET "
                        "to QEMU's vhost-user-blk-pci (iommu_platform=on, num-queues=1) behind "
                        "-M virt,iommu=smmuv3; ID is its PCI address (its StreamID); options "
                        "as --blk (repeatable)")
    p.add_argument("--vsmmu-rng", type=_endpoint_device("rng", "vhost-user"), action="append",
                   default=[], metavar="SOCKET,endpoint=ID",
                   help="serve a virtio-rng endpoint in vSMMU mode over vhost-user on SOCKET "
                        "to QEMU's vhost-user-rng-pci (iommu_platform=on) (repeatable)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="let GROUP (a name or GID) connect to every socket: they are created "
                        "0660 with that group instead of owner-only 0600")
    p.add_argument("--max-dma-maps", type=_max_dma_maps, default=DEFAULT_MAX_DMA_MAPS,
                   metavar="N", help="DMA maps one vfio-user client may hold per endpoint; "
                                     "past it DMA_MAP fails with ENOSPC (default %(default)s)")
    p.add_argument("--state", type=Path, metavar="DIR",
                   help="keep what a restarted backend must take up (the vSMMU's stage 2) in "
                        "DIR, and take it up from there at start (docs/ARCHITECTURE.md, "
                        "\"Restarting the backend\")")
    p.add_argument("--poll-us", type=_at_least(0), default=0, metavar="N",
                   help="after each batch of PV-IOMMU requests, spin N microseconds for the "
                        "next one before blocking (default 0: block at once); wins only with "
                        "a core to spare (BENCHMARKS.md)")
    p.add_argument("--no-kick-thread", action="store_true",
                   help="serve the PV-IOMMU's request queue on the event loop instead of its "
                        "own thread")
    p.add_argument("--trace", type=Path, metavar="FILE",
                   help="write the IOMMU traffic to FILE as a Trace Event Format timeline "
                        "(Perfetto, chrome://tracing; docs/TRACING.md)")
    p.add_argument("--allow-unsealed-memory", action="store_true",
                   help="map guest memory fds that are not memfds sealed against shrinking "
                        "(QEMU's memory-backend-memfd seals them by default): trusts the "
                        "frontends, since one that shrinks such a file kills the backend")
    _add_iommu_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("guest-image", help="write a guest initramfs for your own QEMU command "
                                           "line: modules, your files, a shell or your init")
    p.add_argument("output", type=Path, help="the initramfs to write (gzip-compressed cpio)")
    p.add_argument("--module", action="append", default=[], metavar="NAME",
                   help="a kernel module to load besides " + ", ".join(DEFAULT_MODULES)
                        + " (with its dependencies; repeatable)")
    p.add_argument("--no-default-modules", action="store_true",
                   help="do not load " + ", ".join(DEFAULT_MODULES) + " (only --module ones)")
    p.add_argument("--file", type=_extra_file, action="append", default=[],
                   metavar="SRC[:DEST]", help="copy a file or directory into the image "
                   "(default DEST /root/NAME; repeatable)")
    p.add_argument("--init", type=Path, metavar="SCRIPT",
                   help="a shell script to run once the modules are loaded, instead of a "
                        "shell; the guest powers off when it ends")
    _add_guest_options(p)
    p.set_defaults(func=cmd_guest_image)

    p = sub.add_parser("patch-dtb", help="add the PV-IOMMU's iommu-map to a DTB QEMU dumped")
    p.add_argument("input", type=Path, help="the DTB from -machine virt,dumpdtb=FILE")
    p.add_argument("output", type=Path, help="the patched DTB, for -dtb")
    p.add_argument("--iommu", type=_endpoint_id, default=0x8, metavar="ADDR",
                   help="PCI address (or RID) of vhost-user-test-device-pci (default 00:01.0)")
    p.set_defaults(func=cmd_patch_dtb)

    p = sub.add_parser("demo", help="boot a guest that does DMA through an IOMMU and report")
    p.add_argument("--mode", choices=DEMO_MODES, default="pv",
                   help="pv (default): the backend's PV-IOMMU over vhost-user and its "
                        "virtio-blk and virtio-rng endpoints over vfio-user; the guest does "
                        "DMA through them, then the host revokes a live mapping; vsmmu: "
                        "the same endpoints over vhost-user behind QEMU's SMMUv3 (guest "
                        "stage 1, the backend's stage 2), then a fault at each stage; "
                        "builtin: QEMU's virtio-iommu-pci + virtio-blk-pci doing DMA "
                        "(the anchor)")
    p.add_argument("--passthrough", action="store_true",
                   help="pv mode: boot the guest with iommu.passthrough=1 (identity domains)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--workdir", type=Path, help="where the image and logs go (created if needed; "
                        "default: CACHE/runs/demo, replaced each run)")
    p.add_argument("--trace", type=Path, metavar="FILE",
                   help="pv and vsmmu modes: write the backend's IOMMU traffic to FILE as a "
                        "Trace Event Format timeline (docs/TRACING.md)")
    _add_guest_options(p)
    _add_iommu_options(p)
    p.set_defaults(func=cmd_demo)

    sub.add_parser("microbench", help="measure the backend alone against this machine's "
                   "wake-up floor (BENCHMARKS.md); `pviommu microbench --help` for its options")

    add_fuzz_parser(sub)

    p = sub.add_parser("soak", help="guest I/O under faults and revocations for minutes: "
                                    "nothing lost, nothing leaked (exit 1 otherwise)")
    p.add_argument("--minutes", type=_positive, default=10, help="per mode (default %(default)g)")
    p.add_argument("--modes", type=_names,
                   default=list(soak.MODES), help="some of pv,vsmmu (default: both)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.add_argument("--workdir", type=Path, help="where the labs' files go (kept)")
    p.set_defaults(func=cmd_soak)

    p = sub.add_parser("qmp-load", help="measure whether a QMP client polling the mappings "
                                        "(100 Hz) moves the guest's disk throughput")
    p.add_argument("--pairs", type=_at_least(1), default=qmp_load.LoadPlan.pairs,
                   help="runs with and without polling per workload (default %(default)s)")
    p.add_argument("--hz", type=_positive, default=qmp_load.LoadPlan.hz,
                   help="polls a second (default %(default)g)")
    p.add_argument("--runtime", type=_positive, default=qmp_load.LoadPlan.runtime,
                   metavar="SECONDS", help="seconds each fio run lasts (default %(default)g)")
    p.add_argument("--modes", type=_names,
                   default=list(qmp_load.MODES), help="some of pv,vsmmu (default: both)")
    p.add_argument("--workloads", type=_names,
                   default=",".join(w.name for w in qmp_load.LoadPlan().workloads),
                   help="comma-separated fio workloads (default: %(default)s)")
    p.add_argument("--lazy", action="store_true", help="lazy IOTLB flushes (default strict)")
    p.add_argument("--json", action="store_true", help="print every run as JSON")
    p.add_argument("--workdir", type=Path, help="where the labs' files go (kept)")
    p.set_defaults(func=cmd_qmp_load)

    p = sub.add_parser("shell", help="boot a lab (a topology file, docs/LAB.md) and hand "
                                     "over the guest's console")
    add_lab_options(p)
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser("run", help="boot a lab, run one guest command and exit with its status",
                       usage="pviommu run [-h] [options] [TOPOLOGY] -- COMMAND...")
    add_lab_options(p)
    p.add_argument("--timeout", type=float, default=600, metavar="SECONDS",
                   help="how long the command may run; then it gets a Ctrl-C and run "
                        "exits with 124 (default %(default)g)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="measure guest disk throughput through the PV and vSMMU "
                                     "paths against QEMU's built-in virtio-iommu + virtio-blk")
    p.add_argument("--rounds", type=int, default=bench.BenchPlan.rounds,
                   help="guests per cell; the table shows medians (default %(default)s)")
    p.add_argument("--paths", type=_names,
                   default=list(bench.PATHS),
                   help="comma-separated paths to measure (default: all of "
                        f"{','.join(bench.PATHS)}; qsd needs qemu-storage-daemon)")
    p.add_argument("--workloads", type=_names,
                   default=list(BY_NAME),
                   help=f"comma-separated fio workloads (default: all of {','.join(BY_NAME)})")
    p.add_argument("--vcpus", type=_at_least(1), default=bench.BenchPlan.vcpus,
                   help="the guest's vCPUs on every path (default %(default)s: on a 2-core "
                        "host a second one leaves the backend no core)")
    p.add_argument("--runtime", type=_positive, default=bench.BenchPlan.runtime, metavar="SECONDS",
                   help="seconds each fio job runs (default %(default)g)")
    p.add_argument("--json", action="store_true", help="print the raw samples as JSON")
    p.add_argument("--workdir", type=Path, help="where images and logs go "
                        "(default: CACHE/runs/bench, replaced each run)")
    p.add_argument("--trace", type=Path, metavar="FILE",
                   help="write each pv and vsmmu cell's backend timeline beside FILE, as "
                        "FILE-rROUND-MODE-PATH.json (docs/TRACING.md)")
    _add_guest_options(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pviommu`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "microbench":  # its own parser: python -m pviommu.microbench
        cut = argv.index("microbench")
        return microbench_main(argv[cut + 1:])
    guest_command = None
    if "--" in argv:  # run's guest command, kept whole (argparse would mix it in)
        cut = argv.index("--")
        argv, guest_command = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if guest_command is not None:
        if args.func is not cmd_run:
            build_parser().error("'--' separates the guest command of `pviommu run`")
        args.guest_command = guest_command
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (provision.ProvisionError, QemuError, GuestFailed, GuestTimeout, LabError,
            TopologyError) as exc:
        print(f"pviommu: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
