"""The vSMMU QMP commands: stage 2 queried and changed, the host's event queue, VSMMU_EVENT;
and the serve options that declare vSMMU endpoints."""

from __future__ import annotations

from typing import Any

import pytest

from pviommu.cli import build_parser
from pviommu.events import EventBus
from pviommu.iommu.faults import Access, FaultReason
from pviommu.iommu.smmu_events import SmmuEvent
from pviommu.iommu.vsmmu import Vsmmu
from pviommu.qmp.server import QmpError, QmpServer
from pviommu.qmp.vsmmu import EVENT_VSMMU, VsmmuCommands

RAM = 0x4000_0000


@pytest.fixture
def qmp() -> tuple[VsmmuCommands, Vsmmu, list[tuple[str, dict[str, Any]]]]:
    bus = EventBus()
    vsmmu = Vsmmu(bus, queue_depth=2)
    vsmmu.stage2.adopt([(RAM, 1 << 30)])
    server = QmpServer({"qemu": {"major": 0, "minor": 0, "micro": 0}, "package": "t"})
    emitted: list[tuple[str, dict[str, Any]]] = []
    server.emit = lambda name, data=None: emitted.append((name, data))  # type: ignore[method-assign]
    cmds = VsmmuCommands(server, vsmmu.stage2, vsmmu.queue, bus, vsmmu.revocations, [0x10])
    return cmds, vsmmu, emitted


def test_query_unmap_protect_and_map_back(qmp: Any) -> None:
    cmds, vsmmu, _ = qmp
    out = cmds.query_stage2({})
    assert (out["ias"], out["granule"]) == (40, 4096)
    assert out["ranges"] == [{"ipa-start": RAM, "ipa-end": RAM + (1 << 30) - 1,
                              "pa-start": RAM, "read": True, "write": True}]
    gen = cmds.unmap({"start": RAM + 0x1000, "size": 0x1000})["generation"]
    assert gen == vsmmu.stage2.generation
    cmds.protect({"start": RAM, "size": 0x1000, "read": True, "write": False})
    ranges = cmds.query_stage2({"start": RAM, "end": RAM + 0x2fff})["ranges"]
    assert [(r["ipa-start"], r["write"]) for r in ranges] == [(RAM, False), (RAM + 0x2000, True)]
    cmds.map({"start": RAM + 0x1000, "size": 0x1000, "pa": RAM + 0x5000, "write": False})
    ranges = cmds.query_stage2({"start": RAM + 0x1000, "end": RAM + 0x1000})["ranges"]
    assert ranges[0]["pa-start"] == RAM + 0x5000 and not ranges[0]["write"]


@pytest.mark.parametrize(("command", "args", "desc"), [
    ("protect", {"start": RAM, "size": 0x1000, "read": True}, "'write' is missing"),
    ("protect", {"start": RAM, "size": 0x1000, "read": 1, "write": True}, "expected: boolean"),
    ("unmap", {"start": RAM + 1, "size": 0x1000}, "not aligned"),
    ("unmap", {"start": 1 << 40, "size": 0x1000}, "40-bit IPA space"),
    ("unmap", {"endpoint": 0x18}, "no vSMMU endpoint"),
    ("unmap", {"endpoint": 0x10, "start": RAM}, "'start' and 'size', or 'endpoint'"),
    ("unmap", {"start": RAM, "size": 0x1000, "min-size": 4}, "only apply with 'endpoint'"),
    ("unmap", {"size": 0x1000}, "'start' is missing"),
    ("query_stage2", {"start": 2, "end": 1}, "above"),
    ("map", {"start": RAM, "size": 0x1000, "colour": 1}, "unexpected"),
])
def test_bad_arguments_are_generic_errors(qmp: Any, command: str, args: dict[str, Any],
                                          desc: str) -> None:
    cmds, _, _ = qmp
    with pytest.raises(QmpError) as err:
        getattr(cmds, command)(args)
    assert err.value.error_class == "GenericError" and desc in err.value.desc


def test_armed_unmap_is_armed_on_the_endpoint(qmp: Any) -> None:
    cmds, vsmmu, _ = qmp
    assert cmds.unmap({"endpoint": 0x10, "min-size": 4096, "access": "write"})["armed"]
    armed = vsmmu.revocations.armed[0x10]
    assert (armed.min_length, armed.access) == (4096, Access.WRITE)


def test_records_are_announced_and_queued_with_a_bound(qmp: Any) -> None:
    cmds, vsmmu, emitted = qmp
    for i in range(3):
        vsmmu.queue.record(SmmuEvent.stage2_fault(FaultReason.F_PERMISSION, 0x10, 0x8000 + i,
                                                  RAM + 0x3000, Access.WRITE), 3)
    assert [name for name, _ in emitted] == [EVENT_VSMMU] * 3
    data = emitted[0][1]
    assert (data["type"], data["event-id"], data["s2"], data["class"], data["rnw"],
            data["ipa"], data["level"]) == ("F_PERMISSION", 0x13, True, "in", False,
                                            RAM + 0x3000, 3)
    assert bytes.fromhex(data["record"])[:8] == bytes([0x13, 0, 0, 0, 0x10, 0, 0, 0])
    q = cmds.query_events({})
    assert (q["total"], q["dropped"], [e["seq"] for e in q["events"]]) == (3, 1, [1, 2])


def test_serve_takes_vsmmu_endpoints_without_viommu() -> None:
    args = build_parser().parse_args([
        "serve", "--vsmmu-blk", "b.sock,endpoint=00:02.0,image=d.img,size=1M,ro",
        "--vsmmu-rng", "r.sock,endpoint=0x18"])
    assert args.viommu is None
    (blk,), (rng,) = args.vsmmu_blk, args.vsmmu_rng
    assert (blk.transport, blk.mode, blk.endpoint, blk.read_only) == ("vhost-user", "vsmmu",
                                                                      0x10, True)
    assert (rng.kind, rng.endpoint, rng.mode) == ("rng", 0x18, "vsmmu")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--vsmmu-rng", "r.sock,image=x,endpoint=1"])
