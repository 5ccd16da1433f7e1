"""The lab API end to end: real backend processes, QEMU and guests.

What a user relies on: commands with their status and output, whatever they
contain; timeouts that say what the guest did and leave the shell usable; every
IOMMU kind; events, faults and traces; and no process left behind, whatever
way the lab ends.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from pviommu.lab import (
    CommandFailed,
    CommandTimeout,
    Endpoint,
    Iommu,
    Lab,
    Topology,
)
from tests.unit.test_trace import load_trace, on_track, validate

pytestmark = pytest.mark.e2e
PVIOMMU = [sys.executable, "-m", "pviommu"]


def alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    if pid is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def test_commands_give_status_and_exact_output(tmp_path: Path) -> None:
    async with Lab(Topology(iommu=Iommu(kind="none"), endpoints=()),
                   workdir=tmp_path / "lab") as lab:
        r = await lab.run("echo one; echo two >&2; printf 'no newline'")
        assert (r.status, r.output) == (0, "one\ntwo\nno newline")
        assert (await lab.run("exit 7")).status == 7
        # Quotes, a syntax error and a long command do not desynchronize the shell.
        assert (await lab.run("echo \"it's\" '$HOME' @@PVE x 0")).output == "it's $HOME @@PVE x 0\n"
        bad = await lab.run("echo 'unterminated")
        assert bad.status != 0 and "unterminated" in bad.output
        long = "x" * 5000
        assert (await lab.run(f"v={long}; echo ${{#v}}")).output == "5000\n"
        with pytest.raises(CommandFailed, match="status 3"):
            await lab.run("echo oops; exit 3", check=True)
        with pytest.raises(CommandTimeout, match=r"within 2s; it was interrupted.*\nstarted"):
            await lab.run("echo started; sleep 30", timeout=2)
        assert (await lab.run("echo still here")).output == "still here\n"
        assert any("Linux version" in line for line in await lab.kernel_log())


@pytest.mark.parametrize("kind", ["pv", "vsmmu", "builtin"])
async def test_every_iommu_kind_puts_the_disk_behind_it(kind: str, tmp_path: Path) -> None:
    topology = Topology(iommu=Iommu(kind=kind),
                        endpoints=(Endpoint("blk", size=8 << 20, serial="disk-" + kind),
                                   Endpoint("rng")))
    async with Lab(topology, workdir=tmp_path / "lab") as lab:
        disk = lab.endpoint("blk")
        group = await lab.run(f"basename $(readlink /sys/bus/pci/devices/{disk.pci}/iommu_group)")
        assert group.ok and group.output.strip().isdigit()
        assert (await lab.run("cat /sys/block/vda/serial")).output.strip() == f"disk-{kind}"
        data = await lab.run("head -c 1048576 /dev/urandom > /tmp/d && "
                             "dd if=/tmp/d of=/dev/vda bs=65536 oflag=direct 2>/dev/null && "
                             "dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null | "
                             "sha256sum && sha256sum < /tmp/d", check=True)
        first, second = data.lines()
        assert first.split()[0] == second.split()[0]
        rng = await lab.run("cat /sys/class/misc/hw_random/rng_current")
        assert rng.output.startswith("virtio_rng")
        if kind in ("pv", "vsmmu"):
            counters = await lab.counters()
            assert counters.get("map" if kind == "pv" else "miss", 0) > 0
            state = await lab.iommu_state()
            assert {d["kind"] for d in state["devices"]} == {"blk", "rng"}
        else:
            assert lab.backend is None and await lab.counters() == {}


async def test_events_stream_and_faults_join_guest_and_backend(tmp_path: Path) -> None:
    trace = tmp_path / "lab.trace.json"
    async with Lab(Topology(), workdir=tmp_path / "lab", trace=trace) as lab:
        disk = lab.endpoint("blk")
        faults = []

        async def watch() -> None:
            async for event in lab.events("IOMMU_FAULT"):
                faults.append(event)
                return
        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)
        await lab.backend_qmp.execute("inject-fault", {
            "endpoint": disk.endpoint_id, "address": 0xDEAD000, "access": "write",
            "reason": "mapping"})
        await asyncio.wait_for(watcher, 30)
        assert faults[0]["data"]["address"] == 0xDEAD000
        await lab.run("dd if=/dev/vda of=/dev/null bs=4096 count=4 iflag=direct", check=True)
        for _ in range(50):  # the guest logs the fault when its event queue is served
            found = await lab.faults()
            if found:
                break
            await asyncio.sleep(0.1)
        [fault] = found
        assert fault["address"] == 0xDEAD000 and fault["qmp_event"]["endpoint"] == 0x10
    events = load_trace(trace.read_text())
    validate(events)
    assert on_track(events, "PV-IOMMU request queue")
    assert any(e["name"] == "fault" for e in events)


async def test_a_failing_script_stops_every_process_and_keeps_the_files() -> None:
    lab = Lab(Topology(iommu=Iommu(kind="vsmmu")))
    with pytest.raises(RuntimeError, match="the user's bug"):
        async with lab:
            pids = [lab.backend.pid, lab.machine.pid]
            assert all(alive(p) for p in pids)
            raise RuntimeError("the user's bug")
    assert not any(alive(p) for p in pids)
    assert (lab.workdir / "console.log").exists()  # kept for the post-mortem
    assert not lab.backend_qmp_socket.exists()
    shutil.rmtree(lab.workdir)


async def test_a_clean_exit_removes_the_temporary_workdir() -> None:
    async with Lab(Topology(iommu=Iommu(kind="builtin"))) as lab:
        assert (await lab.run("true")).ok
        pids = [lab.machine.pid]
    assert not lab.workdir.exists() and not alive(pids[0])


def test_run_exits_with_the_guest_commands_status(tmp_path: Path) -> None:
    topo = tmp_path / "t.toml"
    topo.write_text('files = ["data.txt:/root/data.txt"]\n[iommu]\nkind = "vsmmu"\n')
    (tmp_path / "data.txt").write_text("from the host\n")
    out = subprocess.run([*PVIOMMU, "run", str(topo), "--", "cat data.txt; exit 5"],
                         capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert (out.stdout, out.returncode) == ("from the host\n", 5), out.stderr
    # Several words are quoted as words.
    out = subprocess.run([*PVIOMMU, "run", "--", "printf", "%s|", "a b", "c"],
                         capture_output=True, text=True, timeout=240)
    assert (out.stdout, out.returncode) == ("a b|c|\n", 0), out.stderr
    out = subprocess.run([*PVIOMMU, "run", "--timeout", "2", "--", "echo begun; sleep 60"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 124 and out.stdout == "begun\n"
    assert "did not finish within 2s" in out.stderr


def test_run_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    child = pexpect.spawn(PVIOMMU[0], [*PVIOMMU[1:], "-v", "run", "--workdir",
                                       str(tmp_path / "w"), "--", "sleep 300"],
                          encoding="utf-8", timeout=240)
    try:
        child.expect("starting .*qemu-system-aarch64")
        backend = int(next(p for p in os.listdir("/proc") if p.isdigit()
                           and b"serve" in Path(f"/proc/{p}/cmdline").read_bytes()
                           and str(tmp_path).encode() in Path(f"/proc/{p}/cmdline")
                           .read_bytes()))
        console = tmp_path / "w" / "console.log"
        for _ in range(1200):  # the guest's shell runs the command
            # The second framed command is `sleep 300` (the first sets the shell up).
            text = console.read_text(errors="replace") if console.exists() else ""
            if len(re.findall(r"@@PVB [0-9a-f]+\r?$", text, re.M)) >= 2:
                break
            time.sleep(0.1)
        child.kill(signal.SIGINT)
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close(force=True)
    assert child.exitstatus == 130
    assert not alive(backend)
    assert not any(b"qemu-system" in Path(f"/proc/{p}/cmdline").read_bytes()
                   and str(tmp_path).encode() in Path(f"/proc/{p}/cmdline").read_bytes()
                   for p in os.listdir("/proc") if p.isdigit() and alive(int(p)))


def test_shell_is_a_console_for_a_person(tmp_path: Path) -> None:
    child = pexpect.spawn(PVIOMMU[0], [*PVIOMMU[1:], "shell", "--workdir", str(tmp_path / "w")],
                          encoding="utf-8", timeout=240)
    try:
        child.expect(r"backend QMP: (\S+)")
        backend_qmp = child.match.group(1)
        child.expect(r"QEMU QMP: +(\S+)")
        qemu_qmp = child.match.group(1)
        child.expect("Leave with Ctrl-]")
        child.expect("guest:/root# ")
        child.sendline("echo $((6 * 7)) > /tmp/x; cat /tmp/x")
        child.expect("42")
        # Both QMP sockets take a person's client while the lab runs.
        for path in (backend_qmp, qemu_qmp):
            out = pexpect.run(f"{sys.executable} -c \"import asyncio; from qemu.qmp import "
                              f"QMPClient; c = QMPClient(); asyncio.run(c.connect('{path}')); "
                              "print('connected')\"", timeout=30, encoding="utf-8")
            assert "connected" in out
        child.send("sleep 100\r")
        child.expect("sleep 100")
        child.send("\x03")  # Ctrl-C reaches the guest's command, not QEMU
        child.expect("guest:/root# ")
        child.sendline("echo alive")
        child.expect("alive")
        child.send("\x1d")  # Ctrl-]
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "echo alive" in (tmp_path / "w" / "console.log").read_text()
