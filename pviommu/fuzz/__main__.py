"""``python -m pviommu.fuzz TARGET --seconds N [--corpus DIR]``: the same as ``pviommu fuzz``."""

from __future__ import annotations

import argparse
import sys

from .cli import add_fuzz_arguments, cmd_fuzz


def main() -> int:
    """Parses the command line and runs the fuzzer."""
    parser = argparse.ArgumentParser(prog="python -m pviommu.fuzz",
                                     description="Fuzz one of pviommu's parsers.")
    add_fuzz_arguments(parser)
    return cmd_fuzz(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
