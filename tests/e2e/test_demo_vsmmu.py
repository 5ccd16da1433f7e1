"""End to end, as a user runs it: ``pviommu demo --mode vsmmu --json``."""

import json
import re
import subprocess
import sys

import pytest

from pviommu.iommu.smmu_events import SmmuEvent
from pviommu.scenarios.vsmmu import ROGUE_IOVA

pytestmark = pytest.mark.e2e

FAULT_KEYS = {"source", "stage", "endpoint", "address", "access", "reason", "record",
              "guest_log", "qmp_event"}


def test_demo_json_cli_vsmmu(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pviommu.cli", "demo", "--mode", "vsmmu", "--json",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["mode"] == "vsmmu"
    assert report["dma"]["checksums_ok"] is True
    assert report["rng"]["ok"] is True
    assert report["guest"]["smmu_driver"] == "arm-smmu-v3"
    assert report["guest"]["scenario_rc"] == 0
    assert {e["kind"]: e["group_type"] for e in report["endpoints"]} == {"blk": "DMA",
                                                                         "rng": "DMA"}
    s1 = [f for f in report["faults"] if f["stage"] == 1]
    s2 = [f for f in report["faults"] if f["stage"] == 2]
    assert len(s1) == 1 and len(s2) == 1, report["faults"]
    [s1], [s2] = s1, s2
    assert set(s1) >= FAULT_KEYS and set(s2) >= FAULT_KEYS | {"ipa", "io_errors"}
    # stage 1: the guest's arm-smmu-v3 logged QEMU's event for the rogue read
    assert re.search(r"arm-smmu-v3 \S+: event 0x10 received:", s1["guest_log"])
    assert (s1["source"], s1["endpoint"], s1["address"], s1["access"], s1["reason"]) == (
        "guest", 16, ROGUE_IOVA, "read", "F_TRANSLATION")
    assert not SmmuEvent.unpack(bytes.fromhex(s1["record"])).s2
    assert s1["injected"]["translated"] is False and s1["injected"]["fault"]["stage"] == 1
    # stage 2: the host's record and the guest's I/O error; the guest read on
    assert s2["source"] == "host" and s2["qmp_event"]["s2"] is True
    assert s2["qmp_event"]["type"] == "F_TRANSLATION" and s2["access"] == "write"
    assert re.search(r"I/O error, dev vda, sector \d+ op 0x0:\(READ\)", s2["guest_log"])
    assert "VSMMU_EVENT" in [e["event"] for e in report["qmp_events"]]
    vs = report["vsmmu"]
    assert vs["stage2_unmap"]["recovered"] and vs["rogue_dma"]["guest_carried_on"]
    assert vs["events"]["total"] == 1
    assert all(c["miss"] > 0 for c in vs["iotlb"].values())
    assert report["qemu"]["exit_status"] == 0


def test_demo_vsmmu_text_report(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pviommu.cli", "demo", "--mode", "vsmmu",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert "arm-smmu-v3 bound 9050000.smmuv3" in out.stdout
    assert "stage 1, guest: F_TRANSLATION endpoint 0x10 at 0xdead000 (read)" in out.stdout
    assert "stage 2, host VSMMU_EVENT: F_TRANSLATION" in out.stdout
    assert "checksums_ok: true" in out.stdout
