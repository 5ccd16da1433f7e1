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

The vSMMU part of the section is run the same way: ``vsmmu-serve`` in the
background, then ``guest`` (the same guest image serves) and ``vsmmu-boot`` on
a terminal; at the guest's shell it types the same ``in-guest`` block and
checks what the vSMMU text promises: the SMMUv3 at
``/sys/class/iommu/smmu3.0x0000000009050000`` with the disk and the rng in its
IOMMU groups, the disk's checksum the host's, IOTLB misses on the backend's QMP.
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
VSMMU_SOCKETS = ("qmp.sock", "vblk.sock", "vrng.sock")
SMMU = "/sys/class/iommu/smmu3.0x0000000009050000"
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
    assert list(blocks) == ["serve", "guest", "boot", "in-guest", "vsmmu-serve", "vsmmu-boot"]
    assert "dumpdtb=" in blocks["boot"] and "-dtb virt-pv.dtb" in blocks["boot"]
    assert "--vsmmu-blk" in blocks["vsmmu-serve"] and "iommu=smmuv3" in blocks["vsmmu-boot"]


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


async def _wait_sockets(workdir: Path, serve: subprocess.Popen,
                        sockets: tuple[str, ...] = SOCKETS, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not all((workdir / s).exists() for s in sockets):
        if serve.poll() is not None:
            pytest.fail(f"pviommu serve exited: {(workdir / 'serve.log').read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"pviommu serve did not listen on {sockets} within {timeout}s")
        await asyncio.sleep(0.1)


def _start_serve(block: str, workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    """The first terminal: the README's serve block, in the background."""
    with open(workdir / "serve.log", "w") as log:
        return subprocess.Popen(["bash", "-c", block], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _start_terminal(script_text: str, workdir: Path,
                    env: dict[str, str]) -> tuple[pexpect.spawn, Console]:
    """The second terminal: the given blocks in one shell, on a pty."""
    script = workdir / "second-terminal.sh"
    script.write_text(script_text)
    child = pexpect.spawn("bash", [str(script)], cwd=str(workdir), env=env,
                          encoding="utf-8", codec_errors="replace", echo=False,
                          timeout=None, dimensions=(50, 200))
    child.logfile_read = open(workdir / "terminal.log", "w")  # noqa: SIM115 (closed below)
    console = Console(child)
    console.start()
    return child, console


async def _close_terminal(child: pexpect.spawn | None, console: Console | None) -> None:
    if child is not None:
        _kill_group(child.pid, signal.SIGKILL)  # bash and the QEMU it started
    if console is not None:
        await console.stop()
    if child is not None:
        await asyncio.to_thread(child.close, True)
        if child.logfile_read is not None:
            child.logfile_read.close()


async def _type_in_guest(child: pexpect.spawn, console: Console, lines: list[str]) -> str:
    """Types ``lines`` at the guest's shell; the console text once they succeeded."""
    for line in lines:
        child.sendline(line)
    child.sendline('echo "@@README-STEPS rc=$?"')
    done = await console.wait_line(r"@@README-STEPS rc=\d", 120)
    assert done.endswith("rc=0"), console.text()[-3000:]
    return console.text()


def _check_disk(text: str, workdir: Path) -> None:
    """The guest's md5 of the first 4 KiB it wrote and read back is the host's."""
    sums = re.findall(r"\b([0-9a-f]{32})  -\s*$", text, re.MULTILINE)
    first_4k = (workdir / "disk.img").read_bytes()[:4096]
    assert first_4k.startswith(b"hello from the guest\n")
    assert sums and sums[-1] == hashlib.md5(first_4k).hexdigest()  # noqa: S324


async def _backend_state(workdir: Path, *commands: str) -> list:
    """The answers of the backend's QMP to ``commands``."""
    client = QMPClient("readme-test")
    await client.connect(str(workdir / "qmp.sock"))
    try:
        return [await client.execute(command) for command in commands]
    finally:
        await client.disconnect()


async def test_the_manual_path_as_written(qemu, assets, tmp_path):
    blocks = readme_blocks()
    env = user_env()
    serve = _start_serve(blocks["serve"], tmp_path, env)
    child: pexpect.spawn | None = None
    console: Console | None = None
    try:
        await _wait_sockets(tmp_path, serve)
        assert (tmp_path / "disk.img").stat().st_size == 64 << 20  # size=64M created it
        child, console = _start_terminal(blocks["guest"] + "\n" + blocks["boot"] + "\n",
                                         tmp_path, env)

        loaded = await console.wait_line(r"pviommu-guest: modules loaded:", 600)
        assert re.search(r"loaded: virtio_iommu .*virtio_blk", loaded), loaded
        bound = await console.wait_line(r"pviommu-guest: virtio-iommu:", 30)
        assert bound.endswith("bound to virtio_iommu"), bound
        await console.wait_line(r"pviommu-guest: a shell on the console", 30)
        assert (tmp_path / "virt.dtb").exists() and (tmp_path / "virt-pv.dtb").exists()

        text = await _type_in_guest(child, console, blocks["in-guest"].splitlines())
        assert "0000:00:02.0" in text and "0000:00:03.0" in text  # IOMMU groups listed
        _check_disk(text, tmp_path)
        assert "OF: /pcie@10000000: no iommu-map translation for id 0x8 on (null)" in text
        assert "I/O error" not in text

        domains, devices = await _backend_state(tmp_path, "query-viommu-domains",
                                                "query-endpoint-devices")
        attached = {ep for d in domains for ep in d["endpoints"]}
        assert {BLK, RNG} <= attached, domains
        assert all(d["mappings"] > 0 for d in domains if BLK in d["endpoints"]), domains
        blk = next(d for d in devices if d["id"] == BLK)
        assert blk["connections"] >= 1 and not blk["needs-reset"], blk

        child.sendline("poweroff -f")
        assert await console.wait_closed(60), "QEMU did not exit after poweroff -f"
    finally:
        await _close_terminal(child, console)
        status = _stop_serve(serve)
    assert status == 0, (tmp_path / "serve.log").read_text()
    assert not any((tmp_path / s).exists() for s in SOCKETS)


async def test_the_vsmmu_path_as_written(qemu, assets, tmp_path):
    blocks = readme_blocks()
    env = user_env()
    serve = _start_serve(blocks["vsmmu-serve"], tmp_path, env)
    child: pexpect.spawn | None = None
    console: Console | None = None
    try:
        await _wait_sockets(tmp_path, serve, VSMMU_SOCKETS)
        assert (tmp_path / "disk.img").stat().st_size == 64 << 20
        child, console = _start_terminal(blocks["guest"] + "\n" + blocks["vsmmu-boot"] + "\n",
                                         tmp_path, env)

        loaded = await console.wait_line(r"pviommu-guest: modules loaded:", 600)
        assert "virtio_blk" in loaded, loaded
        await console.wait_line(r"pviommu-guest: a shell on the console", 30)
        # The "@@" word is split in the typed line so that only the output matches.
        text = await _type_in_guest(child, console, [
            *blocks["in-guest"].splitlines(),
            f'echo "@""@SMMU devices:" $(ls {SMMU}/devices)',
        ])
        assert "0000:00:02.0" in text and "0000:00:03.0" in text  # IOMMU groups listed
        smmu = await console.wait_line(r"@@SMMU devices:", 5)
        assert "0000:00:02.0" in smmu and "0000:00:03.0" in smmu, smmu
        _check_disk(text, tmp_path)
        assert "I/O error" not in text

        [devices] = await _backend_state(tmp_path, "query-endpoint-devices")
        vsmmu = {d["id"]: d for d in devices if d["mode"] == "vsmmu"}
        assert set(vsmmu) == {BLK, RNG}, devices
        assert vsmmu[BLK]["iotlb"]["miss"] > 0, vsmmu[BLK]
        assert vsmmu[BLK]["connections"] >= 1 and not vsmmu[BLK]["needs-reset"], vsmmu[BLK]

        child.sendline("poweroff -f")
        assert await console.wait_closed(60), "QEMU did not exit after poweroff -f"
    finally:
        await _close_terminal(child, console)
        status = _stop_serve(serve)
    assert status == 0, (tmp_path / "serve.log").read_text()
    assert not any((tmp_path / s).exists() for s in VSMMU_SOCKETS)


OWN_TEST = re.compile(r"<!-- readme-test: own-test -->\s*\n```python\n(.*?)\n```", re.DOTALL)


def test_write_your_own_test_passes_as_written(tmp_path):
    """The README's "Write your own test" example, in a directory of its own (no
    project configuration: the plugin comes from the installed package), passes."""
    [source] = OWN_TEST.findall(repo_path("README.md").read_text())
    (tmp_path / "test_mine.py").write_text(source + "\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "test_mine.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout
