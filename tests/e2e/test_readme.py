"""The README's "Running the backend yourself", done word for word as a new user would.

The shell blocks of that section are marked with ``<!-- readme-test: NAME -->``
comments; this test runs them as written, in an empty directory, with the
venv's ``bin`` on PATH (what the README's ``. .venv/bin/activate`` does):
``serve`` in the background (the user's first terminal), then ``guest`` and
``boot`` in one shell on a terminal (the second one), whose last command boots
QEMU with the guest's console on that terminal. At the guest's shell it types
the ``in-guest`` block. It checks that the guest booted, loaded virtio_iommu
(bound to the backend's device) before its endpoints' drivers, that the disk
works through the PV-IOMMU (the guest's checksum of what it wrote and read
back is the host's, the backend's QMP shows both endpoints attached with
mappings), and that the line the README calls expected is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from qemu.qmp import QMPClient

from pviommu.machine.console import Console
from pviommu.resources import repo_path

pytestmark = pytest.mark.e2e

BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\s*\n```sh\n(.*?)\n```", re.DOTALL)
SOCKETS = ("viommu.sock", "qmp.sock", "blk.sock", "rng.sock")
BLK, RNG = 0x10, 0x18


def readme_blocks() -> dict[str, str]:
    """The marked shell blocks of the README, by name."""
    text = repo_path("README.md").read_text()
    section = text[text.index("### Running the backend yourself"):]
    section = section[:section.index("\n### ", 1)]
    return dict(BLOCK.findall(section))


def user_env() -> dict[str, str]:
    """The environment of a user who activated the venv."""
    venv_bin = Path(sys.executable).parent
    return dict(os.environ, PATH=f"{venv_bin}:{os.environ['PATH']}",
                VIRTUAL_ENV=str(venv_bin.parent))


def test_the_section_has_its_blocks():
    blocks = readme_blocks()
    assert list(blocks) == ["serve", "guest", "boot", "in-guest"]
    assert "dumpdtb=" in blocks["boot"] and "-dtb virt-pv.dtb" in blocks["boot"]


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _stop_serve(serve: subprocess.Popen) -> int | None:
    """SIGTERM (what the README's Ctrl-C does), SIGKILL if it lingers; its status."""
    _kill_group(serve.pid, signal.SIGTERM)
    try:
        return serve.wait(15)
    except subprocess.TimeoutExpired:
        _kill_group(serve.pid, signal.SIGKILL)
        serve.wait(5)
        return None


async def _wait_sockets(workdir: Path, serve: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not all((workdir / s).exists() for s in SOCKETS):
        if serve.poll() is not None:
            pytest.fail(f"pviommu serve exited: {(workdir / 'serve.log').read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"pviommu serve did not listen on {SOCKETS} within {timeout}s")
        await asyncio.sleep(0.1)


async def _backend_state(workdir: Path) -> tuple[list, list]:
    client = QMPClient("readme-test")
    await client.connect(str(workdir / "qmp.sock"))
    try:
        return (await client.execute("query-viommu-domains"),
                await client.execute("query-endpoint-devices"))
    finally:
        await client.disconnect()


async def test_the_manual_path_as_written(qemu, assets, tmp_path):
    blocks = readme_blocks()
    env = user_env()
    with open(tmp_path / "serve.log", "w") as log:
        serve = subprocess.Popen(["bash", "-c", blocks["serve"]], cwd=tmp_path, env=env,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    child: pexpect.spawn | None = None
    console: Console | None = None
    try:
        await _wait_sockets(tmp_path, serve)
        assert (tmp_path / "disk.img").stat().st_size == 64 << 20  # size=64M created it
        script = tmp_path / "second-terminal.sh"
        script.write_text(blocks["guest"] + "\n" + blocks["boot"] + "\n")
        child = pexpect.spawn("bash", [str(script)], cwd=str(tmp_path), env=env,
                              encoding="utf-8", codec_errors="replace", echo=False,
                              timeout=None, dimensions=(50, 200))
        child.logfile_read = open(tmp_path / "terminal.log", "w")  # noqa: SIM115 (closed below)
        console = Console(child)
        console.start()

        loaded = await console.wait_line(r"pviommu-guest: modules loaded:", 600)
        assert re.search(r"loaded: virtio_iommu .*virtio_blk", loaded), loaded
        bound = await console.wait_line(r"pviommu-guest: virtio-iommu:", 30)
        assert bound.endswith("bound to virtio_iommu"), bound
        await console.wait_line(r"pviommu-guest: a shell on the console", 30)
        assert (tmp_path / "virt.dtb").exists() and (tmp_path / "virt-pv.dtb").exists()

        for line in blocks["in-guest"].splitlines():
            child.sendline(line)
        child.sendline('echo "@@README-STEPS rc=$?"')
        done = await console.wait_line(r"@@README-STEPS rc=\d", 120)
        assert done.endswith("rc=0"), console.text()[-3000:]
        text = console.text()
        assert "0000:00:02.0" in text and "0000:00:03.0" in text  # IOMMU groups listed
        sums = re.findall(r"\b([0-9a-f]{32})  -\s*$", text, re.MULTILINE)
        first_4k = (tmp_path / "disk.img").read_bytes()[:4096]
        assert first_4k.startswith(b"hello from the guest\n")
        assert sums and sums[-1] == hashlib.md5(first_4k).hexdigest()  # noqa: S324
        assert "OF: /pcie@10000000: no iommu-map translation for id 0x8 on (null)" in text
        assert "I/O error" not in text

        domains, devices = await _backend_state(tmp_path)
        attached = {ep for d in domains for ep in d["endpoints"]}
        assert {BLK, RNG} <= attached, domains
        assert all(d["mappings"] > 0 for d in domains if BLK in d["endpoints"]), domains
        blk = next(d for d in devices if d["id"] == BLK)
        assert blk["connections"] >= 1 and not blk["needs-reset"], blk

        child.sendline("poweroff -f")
        assert await console.wait_closed(60), "QEMU did not exit after poweroff -f"
    finally:
        if child is not None:
            _kill_group(child.pid, signal.SIGKILL)  # bash and the QEMU it started
        if console is not None:
            await console.stop()
        if child is not None:
            await asyncio.to_thread(child.close, True)
            if child.logfile_read is not None:
                child.logfile_read.close()
        status = _stop_serve(serve)
    assert status == 0, (tmp_path / "serve.log").read_text()
    assert not any((tmp_path / s).exists() for s in SOCKETS)
