"""``pviommu fuzz TARGET --seconds N [--corpus DIR]``: the command line of the fuzzers.

The lead wires it into :mod:`pviommu.cli` with :func:`add_fuzz_parser` and
:func:`cmd_fuzz`; ``python -m pviommu.fuzz`` runs it standalone.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .engine import run
from .registry import TARGETS


def add_fuzz_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the fuzz command's arguments to ``parser``."""
    parser.add_argument("target", nargs="?", choices=[*TARGETS, "all"],
                        help="what to fuzz ('all': each target in turn, for --seconds each)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="how long to fuzz each target (default 60)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="directory for the inputs that found new coverage (kept; "
                             "with 'all', one subdirectory per target); default: a "
                             "temporary directory. The seed corpus in "
                             "tests/fuzz/corpus/TARGET is read in any case")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="directory for the inputs of findings (default: the current "
                             "directory)")
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto",
                        help="atheris (libFuzzer) if installed, else hypothesis (default)")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")


def add_fuzz_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``fuzz`` to the subcommands ``sub`` (argparse's ``add_subparsers()`` result)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "fuzz", help="fuzz a parser or state machine a client or guest reaches",
        description="Coverage-guided fuzzing (atheris/libFuzzer, or hypothesis without it) "
                    "of one target: " + "; ".join(f"{t.name}: {t.covers}"
                                                   for t in TARGETS.values()))
    add_fuzz_arguments(parser)
    parser.set_defaults(func=cmd_fuzz)
    return parser


def cmd_fuzz(args: argparse.Namespace) -> int:
    """Runs the fuzzer(s) as ``args`` say and prints each report; 1 if anything was found."""
    if args.list:
        for t in TARGETS.values():
            print(f"{t.name:12} {t.covers}")
        return 0
    if args.target is None:
        print("pviommu fuzz: name a target (or 'all'); --list lists them")
        return 2
    names = list(TARGETS) if args.target == "all" else [args.target]
    found = 0
    for name in names:
        corpus = args.corpus
        if corpus is not None and len(names) > 1:
            corpus = corpus / name
        result = run(name, args.seconds, corpus, args.artifacts, args.engine)
        print(result.summary(), flush=True)
        if len(names) > 1:
            print()
        found += len(result.findings)
    return 1 if found else 0
