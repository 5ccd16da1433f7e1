"""Signals: SIGHUP, SIGTERM and SIGINT stop the backend cleanly, sockets removed, no
traceback, even with clients connected."""

import signal

import pytest

from tests.fakes.served import ServedBackend
from tests.fakes.vfio_user import FakeQemu
from tests.fakes.vhost_user import FakeFrontend


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_the_backend_cleanly_with_clients_connected(tmp_path, sig):
    async with ServedBackend.start(tmp_path) as served:
        qmp = await served.qmp_client()
        fe = await FakeFrontend.connect(served.viommu)
        await fe.negotiate()
        qemu = await FakeQemu.connect(served.rng)
        qemu.accept_version(await qemu.version())
        try:
            assert served.stop(sig) == 0, served.log_text()
        finally:
            await qmp.disconnect()
            fe.close()
            await qemu.close()
        for path in (served.viommu, served.qmp, served.blk, served.rng):
            assert not path.exists(), f"{path} left behind"
        log = served.log_text()
        assert "Traceback" not in log, log
        assert served.image.exists()
