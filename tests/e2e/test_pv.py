"""End to end: the backend's PV-IOMMU programmed by a real guest through stock QEMU."""

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from qemu.qmp import EventListener, QMPClient

from pviommu.iommu.pv import IommuConfig
from pviommu.machine.qemu import QemuMachine
from pviommu.machine.topology import VfioUserPci, VirtioRngPci, pci_name, pci_rid
from pviommu.scenarios import pv

pytestmark = pytest.mark.e2e

MSI = {"start": "0x0000000008090000", "end": "0x000000000809ffff", "type": "msi"}
EP = pci_rid(pv.BLK_ADDR)
RNG_EP = pci_rid(pv.RNG_ADDR)


def _requests(report):
    return {(r["type"], r["status"]): r["count"] for r in report["iommu"]["requests"]}


def _no_dma(**kw):
    """Options of a run whose guest loads no endpoint driver (virtio_pci still binds)."""
    return pv.PvOptions(blk=None, rng_bytes=0, revoke=False, **kw)


async def test_guest_programs_the_pv_iommu_and_sees_an_injected_fault(qemu, assets, tmp_path):
    report = await pv.run(qemu, assets, tmp_path, _no_dma(fault=pv.FaultPlan()))
    guest = report["guest"]
    # the unmodified virtio_iommu driver bound to the backend's device
    assert guest["viommu_driver"] == "virtio_iommu"
    assert guest["scenario_rc"] == 0
    # both vfio-user endpoints are attached to DMA domains; PROBE gave them the ITS doorbell
    assert guest["group_type"] in ("DMA", "DMA-FQ")
    assert {k: guest["reserved_regions"][0][k] for k in MSI} == MSI
    attached = [e for e in report["iommu"]["endpoints"] if e["attached"]]
    assert [e["id"] for e in attached] == [EP, RNG_EP]
    assert _requests(report)[("attach", "ok")] == 2
    assert _requests(report)[("probe", "ok")] == 2
    assert sorted(ep for d in report["iommu"]["domains"] for ep in d["endpoints"]) == [EP, RNG_EP]
    # the injected fault: the guest logged it, QMP announced it
    assert report["injected"] == {"delivered": True}
    [fault] = report["faults"]
    assert "page fault from EP 16 at 0xdead000 [W]" in fault["guest_log"]
    assert fault["qmp_event"] == {"endpoint": EP, "address": 0xDEAD000, "access": "write",
                                  "reason": "mapping", "delivered": True}
    assert "IOMMU_FAULT" in [e["event"] for e in report["qmp_events"]]
    assert report["backend"]["stats"]["faults-reported"] == 1
    assert report["backend"]["stats"]["faults-dropped"] == 0
    # one connection to dump the DTB, one for the guest
    assert report["backend"]["vhost_user_connections"] == 2
    assert [e["vfio_user_connections"] for e in report["endpoints"]] == [2, 2]
    assert report["qemu"]["exit_status"] == 0


async def test_blk_and_rng_dma_through_the_pv_iommu_and_a_revoked_mapping(qemu, assets,
                                                                         tmp_path):
    report = await pv.run(qemu, assets, tmp_path)
    assert report["guest"]["scenario_rc"] == 0
    # real DMA through the translation: the disk's data checked on both sides
    assert report["dma"]["checksums_ok"], report["dma"]
    assert report["guest"]["disk"]["serial"] == "pviommu"  # GET_ID
    assert report["rng"]["ok"], report["rng"]
    blk, rng = report["endpoints"]
    assert (blk["id"], blk["kind"], rng["id"], rng["kind"]) == (EP, "blk", RNG_EP, "rng")
    assert blk["stats"]["requests"]["IN"] > 0 and blk["stats"]["requests"]["OUT"] > 0
    assert rng["stats"]["bytes"] >= 4096
    # the revoked mapping: fault in the guest log, on QMP, an I/O error, then recovery
    rev = report["revocation"]
    assert rev["armed"] == {"armed": True}
    assert rev["memory_unchanged"] is True
    assert rev["qmp_event"]["sha256-before"] is not None
    assert rev["recovered"] is True
    [fault] = report["faults"]
    assert fault["endpoint"] == EP and fault["access"] == "write"
    assert fault["address"] == rev["qmp_event"]["virt-start"] or (
        rev["qmp_event"]["virt-start"] <= fault["address"] <= rev["qmp_event"]["virt-end"])
    assert re.search(r"I/O error, dev vda, sector \d+ op 0x0:\(READ\)", fault["guest_log"])
    assert fault["qmp_event"]["reason"] == "mapping" and fault["qmp_event"]["delivered"]
    assert blk["stats"]["faults"] == 1 and blk["stats"]["errors"] == 1
    assert report["qemu"]["exit_status"] == 0


async def test_identity_domain_with_bypass_config_is_a_bypass_attach(qemu, assets, tmp_path):
    options = pv.PvOptions(passthrough=True, rng_bytes=64, revoke=False)
    report = await pv.run(qemu, assets, tmp_path, options)
    assert report["guest"]["group_type"] == "identity"
    assert report["iommu"]["domains"]
    assert all(d["bypass"] and d["mappings"] == 0 for d in report["iommu"]["domains"])
    assert ("map", "ok") not in _requests(report)
    # DMA through the bypass domains works
    assert report["dma"]["checksums_ok"] and report["rng"]["ok"]


async def test_identity_domain_without_bypass_config_maps_guest_memory(qemu, assets,
                                                                        tmp_path):
    options = pv.PvOptions(passthrough=True, rng_bytes=64, revoke=False,
                           iommu=IommuConfig(bypass_config=False))
    report = await pv.run(qemu, assets, tmp_path, options)
    assert report["guest"]["group_type"] == "identity"
    domain = report["iommu"]["domains"][0]
    assert domain["bypass"] is False
    mappings = report["iommu"]["mappings"][str(domain["id"])]
    assert _requests(report)[("map", "ok")] >= len(mappings) >= 2
    # identity, around the MSI doorbell, covering guest RAM (1 GiB at 0x40000000)
    assert all(m["virt-start"] == m["phys-start"] and m["read"] and m["write"]
               for m in mappings)
    assert not any(m["virt-start"] <= 0x08090000 <= m["virt-end"] for m in mappings)
    assert any(m["virt-start"] <= 0x40000000 and m["virt-end"] >= 0x7FFFFFFF
               for m in mappings)
    # DMA through the identity mappings works
    assert report["dma"]["checksums_ok"] and report["rng"]["ok"]


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
    rng_sock = tmp_path / "rng.sock"
    proc, viommu, qmp_path = _serve(tmp_path, "--rng", f"{rng_sock},endpoint=00:02.0")
    client = QMPClient("test")
    try:
        await client.connect(str(qmp_path))
        events = EventListener()
        client.register_listener(events)
        initrd = tmp_path / "initrd.gz"
        # the guest reads the backend's rng at 2.0 (DMA through the PV-IOMMU) and
        # waits for an injected fault
        pv.pv_initramfs(initrd, assets, [pci_name(EP)],
                        pv.PvOptions(blk=None, rng_bytes=256, revoke=False,
                                     fault=pv.FaultPlan(), step_timeout=60))
        # 3.0 is behind the IOMMU but not one of the backend's endpoints: the
        # guest's PROBE of it gets NOENT, so the guest never attaches it
        topology = await pv.pv_topology(
            qemu, assets, initrd, tmp_path, viommu, "console=ttyAMA0 panic=-1 quiet",
            endpoints=[VfioUserPci(socket=rng_sock, addr="2.0"),
                       VirtioRngPci(addr="3.0", id="rng1")])

        first = QemuMachine(qemu, topology, tmp_path / "first")
        (tmp_path / "first").mkdir()
        async with first:
            await first.console.wait_marker("READY", 120)
            first.child.kill(signal.SIGKILL)
            assert await first.console.wait_closed(30)
        stats = await client.execute("query-viommu-stats")
        assert stats["vhost-user"]["connections"] == 2
        counts = {(r["type"], r["status"]): r["count"] for r in stats["requests"]}
        assert {k: counts[k] for k in (("probe", "ok"), ("probe", "noent"), ("attach", "ok"))} \
            == {("probe", "ok"): 1, ("probe", "noent"): 1, ("attach", "ok"): 1}
        # the rng's DMA went through the PV-IOMMU: the guest mapped its buffers
        assert counts[("map", "ok")] > 0
        assert not [k for k in counts if k[1] != "ok" and k != ("probe", "noent")]
        assert proc.poll() is None, "the backend died with QEMU"
        [rng] = await client.execute("query-endpoint-devices")
        assert rng["kind"] == "rng" and rng["connections"] == 2
        assert rng["stats"]["requests"] > 0 and rng["stats"]["faults"] == 0
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
        [rng] = await client.execute("query-endpoint-devices")
        assert rng["connections"] == 3
        assert stats["faults-reported"] == 1
        # the second guest's memory fds and eventfds (vhost-user and vfio-user) are
        # closed again: nothing leaks
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
    assert report["dma"]["checksums_ok"] is True
    assert any("fault from EP" in f["guest_log"] and "I/O error, dev vda" in f["guest_log"]
               for f in report["faults"])
