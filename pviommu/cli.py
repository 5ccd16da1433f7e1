"""The ``pviommu`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import sys
from pathlib import Path

from . import kconfig, provision
from .machine.console import GuestFailed, GuestTimeout
from .machine.qemu import QemuError
from .report import format_report
from .scenarios import dma


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


def cmd_demo(args: argparse.Namespace) -> int:
    qemu, assets = provision.setup(args.kernel, args.modules)
    workdir = args.workdir
    if workdir is None:
        workdir = provision.cache_dir() / "runs" / "demo"
        shutil.rmtree(workdir, ignore_errors=True)  # ours alone: never a user's --workdir
    if not args.json:
        print(f"pviommu: booting the {args.mode} demo (logs in {workdir})", file=sys.stderr)
    try:
        report = asyncio.run(dma.run(qemu, assets, workdir, mode=args.mode))
    except (GuestFailed, GuestTimeout, QemuError) as exc:
        raise type(exc)(f"{exc} (guest console log: {workdir / 'console.log'})") from exc
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["dma"]["checksums_ok"] else 1


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

    p = sub.add_parser("demo", help="boot a guest that does DMA through an IOMMU and report")
    p.add_argument("--mode", choices=dma.MODES, default="builtin",
                   help="builtin: QEMU's virtio-iommu-pci + virtio-blk-pci (the anchor)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--workdir", type=Path, help="where the image and logs go (created if needed; "
                        "default: CACHE/runs/demo, replaced each run)")
    _add_guest_options(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pviommu`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (provision.ProvisionError, QemuError, GuestFailed, GuestTimeout) as exc:
        print(f"pviommu: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
