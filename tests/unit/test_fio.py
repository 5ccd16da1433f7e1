"""The guest's fio without a guest: the ELF check, the file list, the cached
provisioning and the JSON report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pviommu import provision
from pviommu.machine import fio
from pviommu.machine.guest_image import ExtraFile
from pviommu.resources import repo_path

CROSS_GCC = "aarch64-linux-gnu-gcc"
needs_cross = pytest.mark.skipif(shutil.which(CROSS_GCC) is None,
                                 reason=f"{CROSS_GCC} is not installed")


@pytest.fixture(scope="module")
def arm64_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A static and a dynamic arm64 executable, built with Debian's cross compiler."""
    if shutil.which(CROSS_GCC) is None:
        pytest.skip(f"{CROSS_GCC} is not installed")
    d = tmp_path_factory.mktemp("arm64")
    src = d / "hello.c"
    src.write_text('#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n')
    out = {"static": d / "hello-static", "dynamic": d / "hello-dynamic"}
    subprocess.run([CROSS_GCC, "-static", "-o", out["static"], src], check=True)
    subprocess.run([CROSS_GCC, "-o", out["dynamic"], src], check=True)
    return out


@needs_cross
def test_a_static_arm64_program_can_run_alone(arm64_programs: dict[str, Path]) -> None:
    assert fio.static_arm64_problems(arm64_programs["static"]) == []


@needs_cross
def test_a_dynamic_arm64_program_names_its_loader_and_libraries(
        arm64_programs: dict[str, Path]) -> None:
    problems = fio.static_arm64_problems(arm64_programs["dynamic"])
    assert problems == ["needs a dynamic loader (PT_INTERP)",
                        "needs shared libraries: libc.so.6"]


def test_a_host_program_is_not_arm64() -> None:
    true = Path(shutil.which("true") or "/bin/true")
    problems = fio.static_arm64_problems(true)
    assert problems[0].startswith("built for EM_X86_64")
    assert "needs a dynamic loader (PT_INTERP)" in problems


def test_a_file_that_is_no_elf_or_missing_is_named(tmp_path: Path) -> None:
    text = tmp_path / "fio"
    text.write_text("#!/bin/sh\n")
    assert fio.static_arm64_problems(text)[0].startswith("not an ELF file")
    assert fio.static_arm64_problems(tmp_path / "missing") == [
        "cannot read it: No such file or directory"]


@needs_cross
def test_fio_files_put_the_binary_on_the_guests_path(
        monkeypatch: pytest.MonkeyPatch, arm64_programs: dict[str, Path]) -> None:
    monkeypatch.setattr(fio, "fetch_fio", lambda: arm64_programs["static"])
    assert fio.fio_files() == (ExtraFile(arm64_programs["static"], "/bin/fio"),)
    assert fio.FIO_GUEST_PATH == "/bin/fio"


@needs_cross
def test_fio_files_refuse_a_cached_binary_that_needs_libraries(
        monkeypatch: pytest.MonkeyPatch, arm64_programs: dict[str, Path]) -> None:
    monkeypatch.setattr(fio, "fetch_fio", lambda: arm64_programs["dynamic"])
    with pytest.raises(provision.ProvisionError, match="PT_INTERP.*remove"):
        fio.fio_files()


def test_a_cached_fio_is_used_without_the_network(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """The script finds the cached build under the cache lock and never asks the mirror
    (an unreachable mirror would fail the run)."""
    cached = tmp_path / "fio" / "3.33-3" / "bin" / "fio"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x7fELF")
    cached.chmod(0o755)
    env = dict(os.environ, PVIOMMU_CACHE=str(tmp_path),
               PVIOMMU_DEBIAN_MIRROR="http://127.0.0.1:9/debian")
    out = subprocess.run(["bash", str(repo_path("qemu-scripts", "fetch-fio.sh"))],
                         env=env, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"FIO={cached}\n", "")
    assert (tmp_path / ".fio.lock").exists()
    monkeypatch.setenv("PVIOMMU_CACHE", str(tmp_path))
    monkeypatch.setenv("PVIOMMU_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    assert provision.fetch_fio() == cached


def test_fio_json_skips_warnings_before_the_report() -> None:
    report = {"fio version": "fio-3.33", "jobs": [{"jobname": "t", "read": {"iops": 5.0}}]}
    output = "fio: file hash not empty on exit\n" + json.dumps(report, indent=2) + "\n"
    assert fio.fio_json(output) == report


@pytest.mark.parametrize("output", ["", "fio: engine libaio not loadable\n", '{"x": 1}\n'])
def test_fio_json_without_a_report_says_so(output: str) -> None:
    with pytest.raises(ValueError, match="no JSON|no jobs"):
        fio.fio_json(output)
