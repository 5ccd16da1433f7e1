"""The libFuzzer process of one target: ``python -m pviommu.fuzz.worker TARGET ARGS...``.

libFuzzer owns the process (it exits when the run ends), so
:func:`pviommu.fuzz.engine.run` starts this module as a child and reads its report.
Only ``pviommu`` code imported after atheris's import hook is instrumented: this
module imports nothing of pviommu's before it (the registry needs nothing).
"""

from __future__ import annotations

import pkgutil
import sys

from . import __path__
from .registry import TARGETS


def main(argv: list[str]) -> None:
    """Fuzzes ``argv[1]`` with the libFuzzer arguments that follow it."""
    import atheris

    target = TARGETS[argv[1]]
    # The harness itself is not what is measured: exclude takes module names, not prefixes.
    own = [f"pviommu.fuzz.{m.name}" for m in pkgutil.iter_modules(__path__)]
    with atheris.instrument_imports(include=["pviommu"], exclude=own):
        one_input = target.load()
    from .common import quiet_logging, run_input

    quiet_logging()

    def test_one_input(data: bytes) -> None:
        run_input(one_input, data)

    atheris.Setup([argv[0], *argv[2:]], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
