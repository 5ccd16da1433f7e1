"""``--trace``: the Trace Event Format writer, its validity (checked against the format's
rules, written out here), a killed writer's file, the hot path's gate, and a real
backend's requests on the timeline (docs/TRACING.md)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pviommu.backend import Backend, BackendConfig
from pviommu.devices.viommu import VirtioIommu
from pviommu.dma import PhysicalDma
from pviommu.endpoints import EndpointSpec
from pviommu.events import (
    EndpointAttached,
    EventBus,
    FaultRecorded,
    IommuRequestDone,
)
from pviommu.iommu.pv import IommuConfig, PvIommu
from pviommu.trace import TraceWriter
from tests.fakes.vhost_user import FakeFrontend, RingFds, Stage1
from tests.fakes.virtio_driver import (
    DEFAULT_GPA,
    DEFAULT_UADDR,
    FakeDriver,
    RecordingTransport,
    memfd_memory,
)

# -- the format's rules ---------------------------------------------------------------------

PHASES = set("BEXiIbneSTpFsftPCMNODR(),=")
METADATA = {"process_name": "name", "process_labels": "labels", "thread_name": "name",
            "process_sort_index": "sort_index", "thread_sort_index": "sort_index"}


def load_trace(text: str) -> list[dict[str, Any]]:
    """The events of a Trace Event Format file: the JSON Object Format ({"traceEvents":
    [...]}) or the JSON Array Format, whose closing ``]`` may be missing."""
    text = text.strip()
    if text.startswith("{"):
        events = json.loads(text)["traceEvents"]
    else:
        assert text.startswith("["), "neither the array nor the object format"
        if not text.endswith("]"):
            text += "]"  # the array format's rule: the trailing ] is optional
        events = json.loads(text)
    assert isinstance(events, list)
    return events


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(events: list[dict[str, Any]]) -> None:
    """Asserts every event follows the Trace Event Format's rules for its phase."""
    for e in events:
        where = f"in {e!r}"
        assert isinstance(e, dict), where
        ph = e.get("ph")
        assert isinstance(ph, str) and ph in PHASES, f"phase {ph!r} {where}"
        assert isinstance(e.get("name"), str), where
        assert _int(e.get("pid")) and _int(e.get("tid")), f"pid/tid not ints {where}"
        if "cat" in e:
            assert isinstance(e["cat"], str), where
        if "args" in e:
            assert isinstance(e["args"], dict), where
        if ph != "M":
            assert _number(e.get("ts")), f"ts {where}"
        if ph == "X":
            assert _number(e.get("dur")) and e["dur"] >= 0, f"dur {where}"
        elif ph in "iI":
            assert e.get("s", "t") in ("g", "p", "t"), f"instant scope {where}"
        elif ph == "C":
            assert e.get("args") and all(_number(v) for v in e["args"].values()), where
        elif ph == "M":
            key = METADATA.get(e["name"])
            assert key is not None, f"unknown metadata {where}"
            assert key in e.get("args", {}), where
            if key == "name":
                assert isinstance(e["args"]["name"], str), where
            if key == "sort_index":
                assert _int(e["args"]["sort_index"]), where


def tracks(events: list[dict[str, Any]]) -> dict[int, str]:
    """tid -> thread_name."""
    return {e["tid"]: e["args"]["name"] for e in events
            if e["ph"] == "M" and e["name"] == "thread_name"}


def on_track(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The non-metadata events on the tracks whose name starts with ``name``."""
    tids = {tid for tid, n in tracks(events).items() if n.startswith(name)}
    return [e for e in events if e["ph"] != "M" and e["tid"] in tids]


# -- the writer -------------------------------------------------------------------------------


def test_the_writer_streams_one_event_a_line_and_closes_the_array(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t.json", pid=7, origin_ns=1_000_000)
    w.metadata("thread_name", 1, {"name": "queue"})
    w.complete("MAP", "viommu", 1, 1_002_500, 1_004_000, {"domain": 1})
    w.instant("fault", "fault", 1, 1_003_000, {"address": "0x1000"})
    w.counter("mappings", 1_004_000, {"mappings": 1})
    w.complete("early", "x", 1, 999_000, 999_500)  # before the start: clamped to 0
    w.close()
    text = (tmp_path / "t.json").read_text()
    lines = text.splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and len(lines) == 7
    assert all(line.startswith(",") for line in lines[2:-1])
    events = json.loads(text)
    validate(events)
    assert events[1] == {"name": "MAP", "cat": "viommu", "ph": "X", "ts": 2.5, "dur": 1.5,
                         "pid": 7, "tid": 1, "args": {"domain": 1}}
    assert events[2]["s"] == "t" and events[2]["ts"] == 3.0
    assert (events[4]["ts"], events[4]["dur"]) == (0.0, 0.0)


def test_a_killed_writers_trace_still_loads_after_the_formats_rule(tmp_path: Path) -> None:
    """No closing ]: the format allows it missing; the file holds whole lines only."""
    path = tmp_path / "killed.json"
    w = TraceWriter(path, flush_bytes=700)
    for i in range(20):
        w.complete("MAP", "viommu", 1, w.origin_ns + i * 1000, w.origin_ns + i * 1000 + 500,
                   {"i": i})
    # as if SIGKILLed now: what reached the file is all there is
    text = path.read_text()
    assert text.endswith("\n") and not text.rstrip().endswith("]")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    events = load_trace(text)
    validate(events)
    assert 0 < len(events) < 20 and [e["args"]["i"] for e in events] == list(
        range(len(events)))
    w.close()
    assert len(load_trace(path.read_text())) == 20


def test_an_unwritable_trace_stops_the_trace_not_the_backend(tmp_path: Path, caplog) -> None:
    w = TraceWriter(tmp_path / "t.json")
    os.close(w._fd)  # type: ignore[arg-type]
    w._fd = os.open("/dev/full", os.O_WRONLY)
    w.instant("x", "x", 1, w.origin_ns)
    w.flush()
    assert w.failed and w.closed and "cannot write" in caplog.text
    w.instant("y", "y", 1, w.origin_ns)  # ignored
    w.close()


# -- the hot path's gate ------------------------------------------------------------------------


def test_wants_is_cached_and_follows_register_and_remove() -> None:
    bus = EventBus()
    assert not bus.wants(IommuRequestDone)
    faults = bus.listen(lambda e: None, FaultRecorded)
    assert not bus.wants(IommuRequestDone) and bus.wants(FaultRecorded)
    everything = bus.listen(lambda e: None)
    assert bus.wants(IommuRequestDone)
    bus.remove(everything)
    assert not bus.wants(IommuRequestDone)
    bus.remove(faults)
    assert not bus.wants(FaultRecorded)


def test_nobody_tracing_no_request_event_is_built(monkeypatch) -> None:
    memory, fd = memfd_memory(1 << 20)
    try:
        bus = EventBus()
        bus.listen(lambda e: None, EndpointAttached)  # someone, but not for requests
        dev = VirtioIommu(PvIommu(IommuConfig(), [0x10], bus))
        built, published = [], []
        monkeypatch.setattr("pviommu.devices.viommu._Seen.__init__",
                            lambda self: built.append(self))
        real_publish = bus.publish
        monkeypatch.setattr(bus, "publish", lambda e: (published.append(e), real_publish(e)))
        dev.transport = RecordingTransport()
        dev.set_driver_features(dev.offered_features())
        driver = FakeDriver(memory, DEFAULT_GPA, 8)
        dev.start_queue(0, driver.queue(PhysicalDma(memory)))
        driver.add([struct.pack("<B3xIII4s", 1, 1, 0x10, 0, bytes(4))], [4])
        driver.publish()
        dev.kick(0)
        assert len(driver.used()) == 1 and dev.iommu.attached == {0x10: 1}
        assert built == [] and published == [EndpointAttached(1, 0x10)]
    finally:
        memory.clear()
        os.close(fd)


# -- a real backend's requests on the timeline --------------------------------------------------

PV_EP, BLK = 0x20, 0x8
MEM = 1 << 20
PAGE = 0x1000


def attach(domain: int, endpoint: int) -> bytes:
    return struct.pack("<B3xIII4s", 1, domain, endpoint, 0, bytes(4))


def map_(domain: int, vstart: int, vend: int, pstart: int, flags: int = 3) -> bytes:
    return struct.pack("<B3xIQQQI", 3, domain, vstart, vend, pstart, flags)


def unmap(domain: int, vstart: int, vend: int) -> bytes:
    return struct.pack("<B3xIQQ4s", 4, domain, vstart, vend, bytes(4))


class Queue:
    """One vring of a fake front-end: post a chain, kick, wait for its completion."""

    def __init__(self, driver: FakeDriver, ring: RingFds) -> None:
        self.driver = driver
        self.ring = ring

    async def request(self, readable: list[bytes], writable: list[int]) -> tuple[int, bytes]:
        head = self.driver.add(readable, writable)
        self.driver.used_event = self.driver.used_idx()
        self.driver.publish()
        self.ring.kick_ring()
        await self.ring.wait_call()
        [(done, n)] = self.driver.used()
        assert done == head
        return n, self.driver.read_writable(head)


@pytest.fixture
def guest() -> Iterator[tuple[Any, int]]:
    memory, fd = memfd_memory(MEM)
    yield memory, fd
    memory.clear()
    os.close(fd)


async def test_a_backends_requests_are_on_its_trace(sock_dir: Path, tmp_path: Path,
                                                    guest: tuple[Any, int]) -> None:
    memory, fd = guest
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xa5" * (64 << 10))
    trace = tmp_path / "trace.json"
    config = BackendConfig(viommu_socket=sock_dir / "viommu.sock", endpoints=[PV_EP],
                           devices=[EndpointSpec("blk", sock_dir / "blk.sock", BLK,
                                                 image=image, transport="vhost-user")],
                           trace=trace)
    fes: list[FakeFrontend] = []
    rings: list[RingFds] = []
    try:
        async with Backend(config) as backend:
            # The PV-IOMMU's request queue, as QEMU's vhost-user-iommu would drive it.
            fe = await FakeFrontend.connect(config.viommu_socket)  # type: ignore[arg-type]
            fes.append(fe)
            await fe.negotiate()
            assert await fe.set_mem_table([(DEFAULT_GPA, MEM, DEFAULT_UADDR, 0)], [fd]) == 0
            req = FakeDriver(memory, DEFAULT_GPA, 16, span=0x10000)
            rings.append(await fe.start_vring(0, req))
            iommu = Queue(req, rings[-1])
            for request in (attach(1, PV_EP), map_(1, 0x10000, 0x10FFF, DEFAULT_GPA + 0x8000),
                            unmap(1, 0x10000, 0x10FFF), attach(1, 0x99)):
                await iommu.request([request], [4])

            # A vSMMU blk endpoint: QEMU's vhost-user-blk with iommu_platform=on; the
            # guest's stage 1 maps IOVA == GPA.
            blk_fe = await FakeFrontend.connect(sock_dir / "blk.sock")
            fes.append(blk_fe)
            await blk_fe.negotiate()
            channel = await blk_fe.set_backend_channel()
            assert await blk_fe.set_mem_table([(DEFAULT_GPA, MEM, DEFAULT_UADDR, 0)],
                                              [fd]) == 0
            base = DEFAULT_GPA + 0x40000
            stage1 = Stage1({base + i * PAGE: DEFAULT_UADDR + 0x40000 + i * PAGE
                             for i in range(16)})
            channel.serve(stage1.on_miss(blk_fe))
            blk_driver = FakeDriver(memory, base, 8, span=0x10000)
            rings.append(await blk_fe.start_vring(0, blk_driver, gpa_to_uaddr=0))
            blk = Queue(blk_driver, rings[-1])
            n, data = await blk.request([struct.pack("<IIQ", 0, 0, 0)], [4096, 1])
            assert n == 4097 and data == b"\xa5" * 4096 + b"\0"
            assert await blk_fe.invalidate(base, 0x10000) == 0
            # A read into memory the guest's stage 1 does not map: a stage-1 fault.
            head = blk_driver.add([struct.pack("<IIQ", 0, 0, 8)], [512, 1])
            descs = blk_driver._posted[head].descs
            blk_driver.write_desc(descs[1], DEFAULT_GPA + 0x90000, 512, 3, descs[2])
            blk_driver.used_event = blk_driver.used_idx()
            blk_driver.publish()
            rings[-1].kick_ring()
            await rings[-1].wait_call()
            assert backend.trace is not None
            channel.close()
        assert backend.trace is None
    finally:
        for ring in rings:
            ring.close()
        for f in fes:
            f.close()

    text = trace.read_text()
    assert text.rstrip().endswith("]")
    events = load_trace(text)
    validate(events)
    names = set(tracks(events).values())
    assert {"PV-IOMMU request queue", "PV-IOMMU domains", "blk 0x8", "IOTLB 0x8"} <= names

    queue = on_track(events, "PV-IOMMU request queue")
    requests = [(e["name"], e["args"]) for e in queue if e["ph"] == "X"]
    assert requests == [
        ("ATTACH", {"status": "OK", "domain": 1, "endpoint": "0x20", "flags": 0}),
        ("MAP", {"status": "OK", "domain": 1, "virt_start": "0x10000",
                 "virt_end": "0x10fff", "phys_start": f"{DEFAULT_GPA + 0x8000:#x}",
                 "flags": 3}),
        ("UNMAP", {"status": "OK", "domain": 1, "virt_start": "0x10000",
                   "virt_end": "0x10fff"}),
        ("ATTACH", {"status": "NOENT", "domain": 1, "endpoint": "0x99", "flags": 0})]
    assert all(e["dur"] >= 0 and e["cat"] == "viommu" for e in queue if e["ph"] == "X")
    counters = [e["args"]["mappings"] for e in events if e["ph"] == "C"]
    assert counters == [0, 1, 0]
    domains = on_track(events, "PV-IOMMU domains")
    assert [(e["name"], e["args"]) for e in domains] == [
        ("attach", {"domain": 1, "endpoint": "0x20"}),
        ("detach", {"domain": 1, "endpoint": "0x20"})]  # the reset as the backend closed

    device = on_track(events, "blk 0x8")
    reads = [e for e in device if e["ph"] == "X"]
    assert [(e["name"], e["cat"], e["args"]) for e in reads] == [
        ("IN", "blk", {"endpoint": "0x8", "status": "OK", "sector": 0, "length": 4096}),
        ("IN", "blk", {"endpoint": "0x8", "status": "IOERR", "sector": 8, "length": 512})]
    [fault] = [e for e in device if e["name"] == "fault"]
    assert fault["args"] == {"endpoint": "0x8", "address": f"{DEFAULT_GPA + 0x90000:#x}",
                             "access": "WRITE", "reason": "F_TRANSLATION", "stage": 1,
                             "delivered": True}

    iotlb = on_track(events, "IOTLB 0x8")
    misses = [e for e in iotlb if e["name"] == "MISS"]
    data_miss = [e for e in misses if e["args"]["access"] == "WRITE"
                 and e["args"]["result"] == "ok"]
    assert data_miss
    # the data page's round trip lies inside the read that needed it
    read = reads[0]
    assert any(read["ts"] <= e["ts"] and e["ts"] + e["dur"] <= read["ts"] + read["dur"] + 1e-3
               for e in data_miss)
    assert misses[-1]["args"] == {"endpoint": "0x8", "iova": f"{DEFAULT_GPA + 0x90000:#x}",
                                  "access": "WRITE", "result": "refused"}
    updates = [e for e in iotlb if e["name"] == "UPDATE"]
    assert len(updates) == len([e for e in misses if e["args"]["result"] == "ok"])
    [invalidate] = [e for e in iotlb if e["name"] == "INVALIDATE"]
    assert invalidate["args"] == {"endpoint": "0x8", "iova": f"{base:#x}", "size": "0x10000"}


async def test_a_backend_that_cannot_start_still_finishes_its_trace(sock_dir: Path,
                                                                     tmp_path: Path) -> None:
    taken = sock_dir / "viommu.sock"
    taken.write_text("not a socket")
    trace = tmp_path / "trace.json"
    backend = Backend(BackendConfig(viommu_socket=taken, trace=trace))
    with pytest.raises(Exception):  # noqa: B017 - whichever refusal, the trace is closed
        await backend.start()
    assert backend.trace is None
    events = load_trace(trace.read_text())
    validate(events)
    assert trace.read_text().rstrip().endswith("]")
    assert "PV-IOMMU request queue" in tracks(events).values()
