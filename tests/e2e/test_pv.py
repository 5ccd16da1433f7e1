"""End to end: the backend's PV-IOMMU programmed by a real guest through stock QEMU."""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from qemu.qmp import EventListener, QMPClient

from pviommu.iommu.pv import IommuConfig
from pviommu.machine.qemu import QemuMachine
from pviommu.machine.topology import VirtioRngPci, pci_name, pci_rid
from pviommu.scenarios import pv

pytestmark = pytest.mark.e2e

MSI = {"start": "0x0000000008090000", "end": "0x000000000809ffff", "type": "msi"}
EP = pci_rid(pv.ENDPOINT_ADDR)


def _requests(report):
    return {(r["type"], r["status"]): r["count"] for r in report["iommu"]["requests"]}


async def test_guest_programs_the_pv_iommu_and_sees_an_injected_fault(qemu, assets, tmp_path):
    report = await pv.run(qemu, assets, tmp_path)
    guest = report["guest"]
    # the unmodified virtio_iommu driver bound to the backend's device
    assert guest["viommu_driver"] == "virtio_iommu"
    assert guest["scenario_rc"] == 0
    # the endpoint is attached to a DMA domain, and PROBE gave it the ITS doorbell
    assert guest["group_type"] in ("DMA", "DMA-FQ")
    assert {k: guest["reserved_regions"][0][k] for k in MSI} == MSI
    assert [e for e in report["iommu"]["endpoints"] if e["attached"]] == [
        {"id": EP, "attached": True, "domain": report["iommu"]["domains"][0]["id"],
         "bypass": False}]
    assert _requests(report)[("attach", "ok")] == 1
    assert _requests(report)[("probe", "ok")] == 1
    assert report["iommu"]["domains"][0]["endpoints"] == [EP]
    # the injected fault: the guest logged it, QMP announced it
    assert report["injected"] == {"delivered": True}
    [fault] = report["faults"]
    assert "page fault from EP 16 at 0xdead000 [W]" in fault["guest_log"]
    assert fault["qmp_event"] == {"endpoint": EP, "address": 0xDEAD000, "access": "write",
                                  "reason": "mapping", "delivered": True}
    events = [e["event"] for e in report["qmp_events"]]
    assert events[:2] == ["IOMMU_ENDPOINT_ATTACHED", "IOMMU_FAULT"]
    assert report["backend"]["stats"]["faults-reported"] == 1
    assert report["backend"]["stats"]["faults-dropped"] == 0
    # one connection to dump the DTB, one for the guest
    assert report["backend"]["vhost_user_connections"] == 2
    assert report["qemu"]["exit_status"] == 0


async def test_identity_domain_with_bypass_config_is_a_bypass_attach(qemu, assets, tmp_path):
    report = await pv.run(qemu, assets, tmp_path,
                          pv.PvOptions(passthrough=True, fault=None))
    assert report["guest"]["group_type"] == "identity"
    [domain] = report["iommu"]["domains"]
    assert domain["bypass"] is True and domain["mappings"] == 0
    assert ("map", "ok") not in _requests(report)


async def test_identity_domain_without_bypass_config_maps_guest_memory(qemu, assets,
                                                                        tmp_path):
    options = pv.PvOptions(passthrough=True, fault=None,
                           iommu=IommuConfig(bypass_config=False))
    report = await pv.run(qemu, assets, tmp_path, options)
    assert report["guest"]["group_type"] == "identity"
    [domain] = report["iommu"]["domains"]
    assert domain["bypass"] is False
    mappings = report["iommu"]["mappings"][str(domain["id"])]
    assert _requests(report)[("map", "ok")] == len(mappings) >= 2
    # identity, around the MSI doorbell, covering guest RAM (1 GiB at 0x40000000)
    assert all(m["virt-start"] == m["phys-start"] and m["read"] and m["write"]
               for m in mappings)
    assert not any(m["virt-start"] <= 0x08090000 <= m["virt-end"] for m in mappings)
    assert any(m["virt-start"] <= 0x40000000 and m["virt-end"] >= 0x7FFFFFFF
               for m in mappings)


def _serve(tmp_path, *extra):
    viommu, qmp = tmp_path / "viommu.sock", tmp_path / "qmp.sock"
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pviommu.cli", "-v", "serve", "--viommu", str(viommu),
             "--qmp", str(qmp), *extra],
            stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not (viommu.exists() and qmp.exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"pviommu serve did not start: {log.read_text()}")
        time.sleep(0.05)
    return proc, viommu, qmp


async def test_serve_outlives_a_killed_qemu_and_serves_the_next_guest(qemu, assets, tmp_path):
    proc, viommu, qmp_path = _serve(tmp_path, "--endpoint", "00:02.0")
    client = QMPClient("test")
    try:
        await client.connect(str(qmp_path))
        events = EventListener()
        client.register_listener(events)
        initrd = tmp_path / "initrd.gz"
        pv.pv_initramfs(initrd, assets, pci_name(EP), fault_wait=60)
        # 3.0 is behind the IOMMU but not declared with --endpoint: the guest's
        # PROBE of it gets NOENT, so the guest never attaches it
        topology = await pv.pv_topology(
            qemu, assets, initrd, tmp_path, viommu, "console=ttyAMA0 panic=-1 quiet",
            endpoints=[VirtioRngPci(addr="2.0"), VirtioRngPci(addr="3.0", id="rng1")])

        first = QemuMachine(qemu, topology, tmp_path / "first")
        (tmp_path / "first").mkdir()
        async with first:
            await first.console.wait_marker("READY", 120)
            first.child.kill(signal.SIGKILL)
            assert await first.console.wait_closed(30)
        stats = await client.execute("query-viommu-stats")
        assert stats["vhost-user"]["connections"] == 2
        assert {(r["type"], r["status"]): r["count"] for r in stats["requests"]} == {
            ("probe", "ok"): 1, ("probe", "noent"): 1, ("attach", "ok"): 1}
        assert proc.poll() is None, "the backend died with QEMU"
        fds_between = len(os.listdir(f"/proc/{proc.pid}/fd"))

        second = QemuMachine(qemu, topology, tmp_path / "second")
        (tmp_path / "second").mkdir()
        async with second:
            await second.console.wait_marker("READY", 120)
            endpoints = await client.execute("query-viommu-endpoints")
            assert [e["id"] for e in endpoints if e["attached"]] == [EP]
            events.clear()
            result = await client.execute("inject-fault", {
                "endpoint": EP, "address": 0xBAD000, "access": "read", "reason": "mapping"})
            assert result == {"delivered": True}
            line = await second.console.wait_line(r"fault from EP 16 at 0xbad000 \[R\]", 60)
            assert "virtio_iommu" in line
            event = await asyncio.wait_for(events.get(), 10)
            while event["event"] != "IOMMU_FAULT":
                event = await asyncio.wait_for(events.get(), 10)
            assert event["data"]["address"] == 0xBAD000
            assert event["data"]["delivered"] is True
            await second.console.wait_marker("DONE", 60)
        stats = await client.execute("query-viommu-stats")
        assert stats["vhost-user"]["connections"] == 3
        assert stats["faults-reported"] == 1
        # the second guest's memory fd and eventfds are closed again: nothing leaks
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) == fds_between
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    # SIGTERM is a clean stop: exit status 0, both sockets removed
    assert rc == 0, (tmp_path / "serve.log").read_text()
    assert not viommu.exists() and not qmp_path.exists()


def test_demo_json_cli_pv(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pviommu.cli", "demo", "--json", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["mode"] == "pv"
    assert set(report["iommu"]) >= {"domains", "endpoints", "requests"}
    assert any(e["attached"] for e in report["iommu"]["endpoints"])
    assert any("fault from EP" in f["guest_log"] for f in report["faults"])
