"""``python -m pviommu.microbench``: runs the backend micro-benchmark, prints its table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .run import CASES, markdown, profile_map_unmap, run_micro
from .stats import PLACEMENTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pviommu.microbench",
                                     description=__doc__)
    parser.add_argument("--requests", type=int, default=20000,
                        help="round trips per case and placement (default %(default)s)")
    parser.add_argument("--placements", default=",".join(PLACEMENTS),
                        help="some of any (unpinned), cross (2 CPUs), same (1 CPU) "
                             "(default %(default)s)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="some of pv, vsmmu (default %(default)s)")
    parser.add_argument("--floor-rounds", type=int, default=5000,
                        help="eventfd ping-pongs, half before, half after (default "
                             "%(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="instead: profile the backend (cProfile) over MAP/UNMAP round "
                             "trips, write FILE, print the top functions")
    args = parser.parse_args(argv)
    if args.profile:
        print(profile_map_unmap(args.profile, args.requests))
        return 0
    try:
        result = run_micro(args.requests, tuple(args.placements.split(",")),
                           args.floor_rounds, tuple(args.cases.split(",")))
    except ValueError as exc:
        print(f"pviommu microbench: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
