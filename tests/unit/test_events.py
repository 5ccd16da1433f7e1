"""The event bus: typed events, listeners that filter, one failing listener harms none."""

from pviommu.backend import Backend, BackendConfig
from pviommu.events import (
    DeviceNeedsReset,
    EndpointAttached,
    EndpointDetached,
    EventBus,
    FaultRecorded,
)
from pviommu.iommu.faults import Access, Fault, FaultReason


def test_each_listener_hears_the_types_it_asked_for_in_order():
    bus = EventBus()
    heard = []
    bus.listen(lambda e: heard.append(("attach", e)), EndpointAttached)
    everything = bus.listen(lambda e: heard.append(("all", e)))
    bus.publish(EndpointAttached(1, 0x10))
    bus.publish(EndpointDetached(1, 0x10))
    assert heard == [("attach", EndpointAttached(1, 0x10)), ("all", EndpointAttached(1, 0x10)),
                     ("all", EndpointDetached(1, 0x10))]
    bus.remove(everything)
    bus.publish(EndpointDetached(2, 0x18))
    assert len(heard) == 3


def test_a_listener_that_raises_does_not_stop_the_others(caplog):
    bus = EventBus()
    heard = []

    def broken(event):
        raise RuntimeError("boom")
    bus.listen(broken)
    bus.listen(heard.append)
    bus.publish(EndpointAttached(1, 0x10))
    assert heard == [EndpointAttached(1, 0x10)]
    assert "boom" in caplog.text


def test_the_backend_publishes_on_one_bus_that_anyone_may_listen_to(tmp_path):
    b = Backend(BackendConfig(viommu_socket=tmp_path / "v.sock", endpoints=[0x10]))
    sent, heard = [], []
    b.qmp.emit = lambda event, data=None: sent.append((event, data))
    b.events.listen(heard.append)
    assert b.iommu.attach(1, 0x10, 0) == 0
    b.device.report_fault(Fault(0x10, 0x1000, Access.READ, FaultReason.MAPPING))
    b.device.fail(0, "boom")
    assert heard == [EndpointAttached(1, 0x10),
                     FaultRecorded(Fault(0x10, 0x1000, Access.READ, FaultReason.MAPPING), False),
                     DeviceNeedsReset("iommu", 0, "boom")]
    assert sent == [
        ("IOMMU_ENDPOINT_ATTACHED", {"domain": 1, "endpoint": 0x10}),
        ("IOMMU_FAULT", {"endpoint": 0x10, "address": 0x1000, "access": "read",
                         "reason": "mapping", "delivered": False}),
        ("DEVICE_NEEDS_RESET", {"kind": "iommu", "queue": 0, "reason": "boom"})]
