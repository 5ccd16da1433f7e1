"""Hostile QMP clients against a real backend: each attack gets an answer or a clean
disconnect, never a traceback, and the other sockets keep serving."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

from pviommu.transport.vhost_user.protocol import Request as R
from tests.fakes.qmp import RawQmp
from tests.fakes.served import ServedBackend
from tests.fakes.vfio_user import FakeQemu
from tests.fakes.vhost_user import FakeFrontend

TIMEOUT = 5.0


@contextlib.asynccontextmanager
async def raws(path: Path, count: int, negotiate: bool = True) -> AsyncIterator[list[RawQmp]]:
    clients: list[RawQmp] = []
    try:
        for _ in range(count):
            clients.append(await RawQmp.connect(path, negotiate))
        yield clients
    finally:
        for client in clients:
            client.close()


def assert_no_traceback(served: ServedBackend) -> None:
    text = served.log_text()
    assert "Traceback" not in text, text


async def test_an_incomplete_request_does_not_swallow_the_next(tmp_path: Path) -> None:
    async with ServedBackend.start(tmp_path) as served:
        baseline = served.resources()
        async with raws(served.qmp, 1) as (raw,):
            await raw.send(b"{\n")
            await asyncio.sleep(0.05)
            await raw.send(b'{"execute": "query-version", "id": "v"}\n')
            error = await raw.line()
            assert error["error"]["class"] == "GenericError"
            assert error["error"]["desc"].startswith("JSON parse error"), error
            answer = await raw.line()
            assert answer["id"] == "v" and "qemu" in answer["return"]
            # The same with no newline at all, and after a value that expected a comma.
            assert (await raw.ask(b'{"execute": "x"{"execute": "query-version", "id": 2}'))[
                "error"]["class"] == "GenericError"
            assert (await raw.line())["id"] == 2
        await served.assert_serving()
        await served.assert_back_to(baseline)
        assert_no_traceback(served)


async def test_ids_that_cannot_be_echoed_get_an_error(tmp_path: Path) -> None:
    deep = b"[" * 1000 + b"]" * 1000
    async with ServedBackend.start(tmp_path) as served:
        baseline = served.resources()
        async with raws(served.qmp, 1) as (raw,):
            for bad_id in (b"1e999", b"-1e999", deep):
                answer = await raw.ask(b'{"execute": "query-version", "id": ' + bad_id + b"}\n")
                assert answer["error"]["class"] == "GenericError", answer
                assert "id" not in answer
            assert (await raw.ask(b'{"execute": "query-version", "id": 1e300}\n'))["id"] == 1e300
        await served.assert_serving()
        await served.assert_back_to(baseline)
        assert_no_traceback(served)


async def _round_trips(served: ServedBackend, seconds: float) -> list[float]:
    """QMP, vhost-user and vfio-user round trips, repeated for ``seconds``."""
    times: list[float] = []
    qmp = await RawQmp.connect(served.qmp, negotiate=True)
    fe = await FakeFrontend.connect(served.viommu)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            start = time.monotonic()
            assert "return" in await qmp.ask(b'{"execute": "query-viommu-stats"}\n')
            await asyncio.wait_for(fe.call(R.GET_FEATURES), TIMEOUT)
            qemu = await FakeQemu.connect(served.rng)
            try:
                qemu.accept_version(await qemu.version())
            finally:
                await qemu.close()
            times.append(time.monotonic() - start)
            await asyncio.sleep(0.02)
    finally:
        fe.close()
        qmp.close()
    return times


async def test_slow_drip_clients_do_not_slow_the_backend(tmp_path: Path) -> None:
    async with ServedBackend.start(tmp_path) as served:
        baseline = served.resources()
        async with raws(served.qmp, 10) as drips:
            for raw in drips:  # dense JSON: costly to parse again
                await raw.send(b'{"execute": "query-version", "arguments": {"n": ['
                               + b"1," * (256 << 10))

            async def drip() -> None:
                while True:
                    for raw in drips:
                        raw.writer.write(b"1,")
                    await asyncio.sleep(0.01)

            dripping = asyncio.create_task(drip())
            try:
                await asyncio.sleep(0.2)
                times = await _round_trips(served, 1.0)
            finally:
                dripping.cancel()
            assert max(times) < 0.25, f"round trips {min(times):.3f}..{max(times):.3f} s"
            for raw in drips:  # the dripped requests still complete
                assert "return" in await raw.ask(b'1]}}\n')
        await served.assert_serving()
        await served.assert_back_to(baseline)
        assert_no_traceback(served)


async def test_qmp_clients_are_capped(tmp_path: Path) -> None:
    async with ServedBackend.start(tmp_path, extra=["--qmp-max-clients", "4"]) as served:
        baseline = served.resources()
        async with raws(served.qmp, 4) as held, raws(served.qmp, 100, negotiate=False) as over:
            for raw in over:
                refused = await raw.line()
                assert refused["error"]["class"] == "GenericError", refused
                assert "QMP clients" in refused["error"]["desc"], refused
                assert await asyncio.wait_for(raw.reader.read(), TIMEOUT) == b""
            assert served.resources().fds <= baseline.fds + 4 + 2
            for raw in held:  # the clients within the cap are untouched
                assert "return" in await raw.ask(b'{"execute": "query-viommu-stats"}\n')
            fe = await FakeFrontend.connect(served.viommu)
            try:
                assert (await fe.call(R.GET_FEATURES)).u64 & (1 << 32)
            finally:
                fe.close()
            qemu = await FakeQemu.connect(served.blk)
            try:
                qemu.accept_version(await qemu.version())
            finally:
                await qemu.close()
        await served.assert_serving()
        await served.assert_back_to(baseline)
        assert "refused" in served.log_text()
        assert_no_traceback(served)


async def test_default_cap_admits_sixteen_clients(tmp_path: Path) -> None:
    async with ServedBackend.start(tmp_path) as served:
        async with raws(served.qmp, 16), raws(served.qmp, 1, negotiate=False) as (over,):
            assert (await over.line())["error"]["class"] == "GenericError"
        await served.assert_serving()


async def test_sigterm_with_clients_connected_logs_no_traceback(tmp_path: Path) -> None:
    async with ServedBackend.start(tmp_path) as served:
        client = await served.qmp_client()
        try:
            async with raws(served.qmp, 1) as (raw,), raws(served.qmp, 1, negotiate=False):
                await raw.send(b'{"execute": "query-ver')
                await asyncio.sleep(0.05)
                assert served.stop(signal.SIGTERM) == 0
        finally:
            await client.disconnect()
        assert_no_traceback(served)
    async with ServedBackend.start(tmp_path) as served:
        async with raws(served.qmp, 1):
            assert served.stop(signal.SIGINT) == 0
        assert_no_traceback(served)
