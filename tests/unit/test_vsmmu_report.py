"""The vSMMU demo's report: the guest's arm-smmu-v3 lines and the host's records joined
into ``faults`` with their stage, the verdict and the terminal summary."""

import copy

from pviommu.cli import demo_ok
from pviommu.iommu.smmu_events import SmmuEvent
from pviommu.lab.faults import vsmmu_faults
from pviommu.machine.guestlog import guest_smmu_faults
from pviommu.report import format_report

# As a Linux 6.12 guest printed them for a refused IOTLB miss at 0xdead000 (QEMU 10.2.2).
SMMU = "arm-smmu-v3 9050000.smmuv3: "
S1_LINES = [
    f"[    7.339583] {SMMU}event 0x10 received:",
    f"[    7.339981] {SMMU}\t0x0000001000000010",
    "@@PVIOMMU S1_WAIT",
    f"[    7.340765] {SMMU}\t0x0000020800000000",
    f"[    7.341454] {SMMU}\t0x000000000dead000",
    f"[    7.342405] {SMMU}\t0x0000000000000000",
]
IO_ERROR = ("[    6.324528] I/O error, dev vda, sector 0 op 0x0:(READ) flags 0x800 "
            "phys_seg 15 prio class 2")
RECORD = "100000001000000000000000800200000030f4ff0000000000105e4200000000"
S2_EVENT = {"seq": 0, "type": "F_TRANSLATION", "event-id": 16, "stream-id": 16, "s2": True,
            "class": "in", "rnw": False, "ind": False, "pnu": False,
            "input-address": 0xFFF43000, "ipa": 0x425E1000, "level": 3, "record": RECORD}
S1_QMP = {"endpoint": 16, "address": 0xDEAD000, "access": "read", "reason": "f_translation",
          "delivered": True}
INJECTED = {"translated": False, "fault": {"endpoint": 16, "address": 0xDEAD000,
                                           "access": "read", "reason": "f_translation",
                                           "stage": 1}}


def test_the_guest_stage1_event_decodes_from_its_logged_words():
    [fault] = guest_smmu_faults(S1_LINES)
    assert {k: fault[k] for k in ("source", "stage", "endpoint", "address", "access",
                                  "reason")} == {
        "source": "guest", "stage": 1, "endpoint": 16, "address": 0xDEAD000,
        "access": "read", "reason": "F_TRANSLATION"}
    event = SmmuEvent.unpack(bytes.fromhex(fault["record"]))
    assert (event.s2, event.event_class.name, event.rnw) == (False, "IN", True)
    assert fault["guest_log"].splitlines() == [line for line in S1_LINES if "@@" not in line]


def test_an_event_without_its_four_words_keeps_its_line_and_no_record():
    [fault] = guest_smmu_faults(S1_LINES[:2])
    assert fault["record"] is None and fault["address"] is None
    assert fault["reason"] == "F_TRANSLATION"
    assert guest_smmu_faults([IO_ERROR, "virtio_iommu virtio0: page fault from EP 16"]) == []


def test_faults_join_both_stages():
    events = [{"event": "IOMMU_FAULT", "data": {**S1_QMP, "address": 0xFFF43000,
                                                "delivered": False}},
              {"event": "VSMMU_EVENT", "data": S2_EVENT},
              {"event": "IOMMU_FAULT", "data": S1_QMP}]
    s1, s2 = vsmmu_faults([IO_ERROR, *S1_LINES], events, INJECTED)
    assert s1["stage"] == 1 and s1["qmp_event"] == S1_QMP and s1["injected"] == INJECTED
    assert s2 == {"source": "host", "stage": 2, "endpoint": 16, "address": 0xFFF43000,
                  "ipa": 0x425E1000, "access": "write", "reason": "F_TRANSLATION",
                  "record": RECORD, "qmp_event": S2_EVENT, "io_errors": [IO_ERROR],
                  "guest_log": IO_ERROR}
    # a rogue DMA that translated is no stage-1 fault of it
    [s1] = vsmmu_faults(S1_LINES, [], {"translated": True, "fault": None, "data": "00"})
    assert s1["injected"] is None


def _report():
    faults = vsmmu_faults([IO_ERROR, *S1_LINES], [
        {"event": "VSMMU_EVENT", "data": S2_EVENT},
        {"event": "IOMMU_FAULT", "data": S1_QMP}], INJECTED)
    ok = {"guest_sha256": "a", "host_sha256": "a", "ok": True}
    return {
        "mode": "vsmmu",
        "faults": faults,
        "dma": {"bytes_read": 4 << 20, "bytes_written": 4 << 20, "checksums_ok": True,
                "read": ok, "write": ok},
        "rng": {"current": "virtio_rng.0", "bytes": 4096, "distinct_in_64": 50, "ok": True},
        "endpoints": [{"id": 16, "kind": "blk", "pci": "0000:00:02.0", "iommu_group": "0",
                       "group_type": "DMA", "iotlb": {"miss": 7, "update": 7,
                                                      "invalidate": 9}}],
        "vsmmu": {"smmu": {"dev": "9050000.smmuv3", "driver": "arm-smmu-v3"},
                  "stage2": {"ias": 40, "oas": 48, "granule": 4096, "generation": 2,
                             "ranges": 1, "mapped_bytes": 1 << 30},
                  "events": {"total": 1, "dropped": 0, "events": [S2_EVENT]},
                  "stage2_unmap": {"qmp_event": S2_EVENT, "ipa": 0x425E1000,
                                   "guest_io_error": IO_ERROR, "recovered": True},
                  "rogue_dma": {"address": 0xDEAD000, "result": INJECTED,
                                "guest_carried_on": True}},
        "guest": {"smmu_driver": "arm-smmu-v3"},
        "timings": {"boot_s": 2.7, "total_s": 10.1},
        "logs": {"console": "/tmp/console.log"},
    }


def test_demo_ok_needs_both_stages_checksums_rng_and_recovery():
    assert demo_ok(_report())
    for spoil in (
        lambda r: r["dma"].update(checksums_ok=False),
        lambda r: r["rng"].update(ok=False),
        lambda r: r["faults"].pop(0),
        lambda r: r["faults"].pop(1),
        lambda r: r["faults"][0].update(address=None),
        lambda r: r["faults"][1].update(io_errors=[]),
        lambda r: r["vsmmu"]["stage2_unmap"].update(recovered=False),
        lambda r: r["vsmmu"]["rogue_dma"].update(guest_carried_on=False),
        lambda r: r["vsmmu"]["smmu"].update(driver="none"),
    ):
        report = copy.deepcopy(_report())
        spoil(report)
        assert not demo_ok(report)


def test_the_summary_shows_each_stage():
    text = format_report(_report())
    assert "pviommu demo, mode vsmmu" in text
    assert "arm-smmu-v3 bound 9050000.smmuv3" in text
    assert "stage 1" in text and "stage 2" in text
    assert "event 0x10 received" in text and "I/O error, dev vda" in text
    assert "checksums_ok: true" in text
