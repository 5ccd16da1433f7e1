"""fio in the guest: the files a lab adds to its guest to run it, and its output.

The guest's fio is a static arm64 build of Debian bookworm's fio source
(qemu-scripts/fetch-fio.sh): one file, no shared libraries and no dynamic
loader, so it costs the initramfs 0.8 MB and the boot about 0.4 s, where
Debian's binary package would bring 63 libraries, 31 MB gzipped, and about 2 s
(BENCHMARKS.md, "fio in the guest"). It has the engines a block benchmark
uses: libaio, io_uring, psync, sync, mmap and posixaio; ``--iomem=shmhuge``
works once the guest has huge pages (``echo N > /proc/sys/vm/nr_hugepages``).
Use it as::

    async with Lab(Topology(files=fio_files())) as lab:
        result = await lab.run(f"fio ... --output-format=json", check=True)
        job = fio_json(result.output)["jobs"][0]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

from ..provision import ProvisionError, fetch_fio
from .guest_image import ExtraFile

FIO_GUEST_PATH = "/bin/fio"
"""Where the guest finds fio (on its PATH, which is /bin)."""


def static_arm64_problems(path: Path) -> list[str]:
    """Why ``path`` cannot run alone in the guest: not an arm64 ELF executable, or
    one that needs a dynamic loader or shared libraries (empty when it can)."""
    try:
        with path.open("rb") as fh:
            elf = ELFFile(fh)
            problems = []
            if elf["e_machine"] != "EM_AARCH64":
                problems.append(f"built for {elf['e_machine']}, not EM_AARCH64")
            if elf["e_type"] not in ("ET_EXEC", "ET_DYN"):
                problems.append(f"not an executable ({elf['e_type']})")
            if any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments()):
                problems.append("needs a dynamic loader (PT_INTERP)")
            dynamic = elf.get_section_by_name(".dynamic")
            tags = dynamic.iter_tags() if isinstance(dynamic, DynamicSection) else ()
            needed = [str(tag.needed) for tag in tags  # type: ignore[attr-defined]
                      if tag.entry.d_tag == "DT_NEEDED"]
            if needed:
                problems.append(f"needs shared libraries: {', '.join(needed)}")
            return problems
    except OSError as exc:
        return [f"cannot read it: {exc.strerror}"]
    except ELFError as exc:
        return [f"not an ELF file: {exc}"]


def fio_files() -> tuple[ExtraFile, ...]:
    """The files that put fio in a lab's guest (``Topology(files=...)``), at
    :data:`FIO_GUEST_PATH`; builds fio into the cache first if it is missing.

    Raises ProvisionError if it cannot be built or what the cache holds is not a
    static arm64 executable.
    """
    fio = fetch_fio()
    problems = static_arm64_problems(fio)
    if problems:
        raise ProvisionError(f"{fio} cannot run in the guest: {'; '.join(problems)}; "
                             f"remove {fio.parent.parent} to build it again")
    return (ExtraFile(fio, FIO_GUEST_PATH),)


def fio_json(output: str) -> dict[str, Any]:
    """The report of ``fio --output-format=json`` from a guest command's output.

    fio prints warnings (``fio: ...``) before the JSON on the same stream; they
    are skipped. Raises ValueError if there is no JSON report with jobs.
    """
    start = output.find("{")
    if start < 0:
        raise ValueError(f"no JSON in fio's output: {output[-500:]!r}")
    report, _ = json.JSONDecoder().raw_decode(output, start)
    if not isinstance(report, dict) or not isinstance(report.get("jobs"), list):
        raise ValueError(f"fio's JSON has no jobs: {output[start:start + 500]!r}")
    return report
