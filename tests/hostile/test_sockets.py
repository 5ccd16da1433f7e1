"""Socket files of a real ``pviommu serve``: never over a user's file or a live backend,
owner-only whatever the umask, and only its own removed when it exits."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.served import ServedBackend

RUN_TIMEOUT = 20.0


@dataclass
class Exited:
    returncode: int
    output: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.output.splitlines() if "error" in line.lower()]


async def run_serve(command: list[str]) -> Exited:
    """Runs a ``pviommu serve`` expected to stop on its own; killed if it does not."""
    proc = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        raise AssertionError("pviommu serve kept running:\n" + out.decode()) from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode is not None
    return Exited(proc.returncode, out.decode(errors="replace"))


def backend_in(workdir: Path, extra: list[str] | None = None) -> ServedBackend:
    workdir.mkdir(exist_ok=True)
    served = ServedBackend(workdir, extra or [])
    if not served.image.exists():
        served.image.write_bytes(bytes(1 << 20))
    return served


def sockets_of(served: ServedBackend) -> list[Path]:
    return [served.viommu, served.qmp, served.blk, served.rng]


def assert_refused(exited: Exited, message: str) -> None:
    assert exited.returncode != 0, exited.output
    assert "Traceback" not in exited.output, exited.output
    assert exited.errors == [f"pviommu: error: {message}"], exited.output


def identity(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino, st.st_mode


@pytest.mark.parametrize("which", ["viommu", "qmp", "blk", "rng"])
async def test_a_regular_file_at_a_socket_path_is_refused_and_kept(tmp_path: Path,
                                                                   which: str) -> None:
    served = backend_in(tmp_path)
    victim = getattr(served, which)
    victim.write_text("the user's notes")
    exited = await run_serve(served.command())
    assert_refused(exited, f"{victim} exists and is not a socket")
    assert victim.read_text() == "the user's notes"
    assert [p for p in sockets_of(served) if p.exists()] == [victim]  # bound ones removed


async def test_a_directory_at_a_socket_path_is_refused(tmp_path: Path) -> None:
    served = backend_in(tmp_path)
    served.blk.mkdir()
    exited = await run_serve(served.command())
    assert_refused(exited, f"{served.blk} exists and is not a socket")
    assert served.blk.is_dir() and not served.viommu.exists()


async def test_a_second_backend_on_a_live_ones_paths_is_refused(tmp_path: Path) -> None:
    async with ServedBackend.start(tmp_path) as first:
        baseline = await first.baseline()
        before = {p: identity(p) for p in sockets_of(first)}
        exited = await run_serve(backend_in(tmp_path).command())
        assert_refused(exited, f"{first.viommu}: a pviommu/other server is already listening "
                               "there")
        assert {p: identity(p) for p in sockets_of(first)} == before
        await first.assert_serving()
        await first.assert_back_to(baseline)


async def test_a_second_backend_removes_only_the_sockets_it_bound(tmp_path: Path) -> None:
    (tmp_path / "first").mkdir()
    async with ServedBackend.start(tmp_path / "first") as first:
        baseline = await first.baseline()
        second = backend_in(tmp_path / "second")
        # Its own vhost-user, blk and rng sockets bind; the live QMP socket stops it.
        command = second.command()
        command[command.index(str(second.qmp))] = str(first.qmp)
        before = identity(first.qmp)
        exited = await run_serve(command)
        assert_refused(exited, f"{first.qmp}: a pviommu/other server is already listening "
                               "there")
        assert [p.name for p in (tmp_path / "second").iterdir()] == ["disk.img"]
        assert identity(first.qmp) == before
        await first.assert_serving()
        await first.assert_back_to(baseline)


async def test_on_exit_only_its_own_sockets_are_removed(tmp_path: Path) -> None:
    async with ServedBackend.start(tmp_path) as served:
        served.rng.unlink()
        served.rng.write_text("someone else's file, made while the backend ran")
        assert served.stop() == 0
    assert served.rng.read_text().startswith("someone else's")
    assert not any(p.exists() for p in (served.viommu, served.qmp, served.blk))


async def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    async with ServedBackend.start(tmp_path) as served:
        served.stop(sig=signal.SIGKILL)  # killed: its sockets stay behind, stale
    assert all(p.exists() for p in sockets_of(served))
    async with ServedBackend.start(tmp_path) as again:
        await again.assert_serving()


async def test_sockets_are_owner_only_even_with_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)  # the backend inherits it when it starts
    try:
        async with ServedBackend.start(tmp_path) as served:
            os.umask(old)
            for path in sockets_of(served):
                assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600, path
            await served.assert_serving()
    finally:
        os.umask(old)


async def test_socket_group_opens_every_socket_to_that_group(tmp_path: Path) -> None:
    gid = os.getgid()
    old = os.umask(0o077)
    try:
        async with ServedBackend.start(
                tmp_path, extra=["--socket-group", grp.getgrgid(gid).gr_name]) as served:
            os.umask(old)
            for path in sockets_of(served):
                st = os.lstat(path)
                assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid), path
            await served.assert_serving()
    finally:
        os.umask(old)


async def test_an_unknown_socket_group_is_a_clear_error(tmp_path: Path) -> None:
    served = backend_in(tmp_path, ["--socket-group", "no-such-group-pviommu"])
    exited = await run_serve(served.command())
    assert_refused(exited, "socket group 'no-such-group-pviommu' does not exist")
    assert not any(p.exists() for p in sockets_of(served))
