"""The QMP server against qemu.qmp's real client and against raw sockets."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from pviommu.qmp import QmpError, QmpServer
from pviommu.qmp import server as qmp_server
from tests.fakes.qmp import RawQmp

VERSION = {"qemu": {"major": 9, "minor": 2, "micro": 1}, "package": "pviommu-test"}
NOT_NEGOTIATED = "Expecting capabilities negotiation with 'qmp_capabilities'"
TIMEOUT = 2.0


def _pair(a: int, b: int) -> dict[str, int]:
    return {"sum": a + b}


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "qmp.sock"


@pytest.fixture
async def server(sock: Path) -> AsyncIterator[QmpServer]:
    release = asyncio.Event()

    async def echo(args: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"echo": args}

    async def block(_: dict[str, Any]) -> str:
        await release.wait()
        return "released"

    def fail(args: dict[str, Any]) -> None:
        raise QmpError("DeviceNotFound", f"Device '{args.get('id')}' not found")

    def crash(_: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    srv = QmpServer(VERSION)
    srv.register("add", lambda a: a["a"] + a["b"], doc="Add two numbers.")
    srv.register("pair", lambda a: _pair(**a))
    srv.register("echo", echo)
    srv.register("nothing", lambda _: None)
    srv.register("fail", fail)
    srv.register("crash", crash)
    srv.register("not-json", lambda _: {"x": object()})
    srv.register("block", block)
    srv.register("release", lambda _: release.set())
    await srv.start_unix(str(sock))
    yield srv
    await srv.close()


@pytest.fixture
async def connect(
    server: QmpServer, sock: Path
) -> AsyncIterator[Callable[[], Awaitable[QMPClient]]]:
    clients: list[QMPClient] = []

    async def make() -> QMPClient:
        client = QMPClient(f"test{len(clients)}")
        await asyncio.wait_for(client.connect(str(sock)), TIMEOUT)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.disconnect()


async def test_greeting_and_negotiation(connect: Callable[[], Awaitable[QMPClient]]) -> None:
    client = await connect()
    assert client.greeting is not None
    assert client.greeting._asdict() == {"QMP": {"version": VERSION, "capabilities": []}}
    with pytest.raises(ExecuteError) as err:
        await client.execute("qmp_capabilities")
    assert err.value.error_class == "CommandNotFound"
    assert str(err.value) == "Capabilities negotiation is already complete, command ignored"
    assert await client.execute("query-version") == VERSION


async def test_sync_and_async_commands(connect: Callable[[], Awaitable[QMPClient]]) -> None:
    client = await connect()
    assert await client.execute("add", {"a": 2, "b": 40}) == 42
    assert await client.execute("pair", {"a": 1, "b": 2}) == {"sum": 3}
    args = {"s": "ünïcode", "n": [1, None, True], "o": {"k": 1.5}}
    assert await client.execute("echo", args) == {"echo": args}
    assert await client.execute("echo") == {"echo": {}}
    assert await client.execute("nothing") == {}


async def test_errors(connect: Callable[[], Awaitable[QMPClient]]) -> None:
    client = await connect()
    with pytest.raises(ExecuteError) as err:
        await client.execute("fail", {"id": "vda"})
    assert err.value.error.error.class_ == "DeviceNotFound"
    assert str(err.value) == "Device 'vda' not found"

    with pytest.raises(ExecuteError) as err:
        await client.execute("nope")
    assert err.value.error_class == "CommandNotFound"
    assert str(err.value) == "The command nope has not been found"

    with pytest.raises(ExecuteError) as err:
        await client.execute("crash")
    assert err.value.error_class == "GenericError"
    assert str(err.value) == "Command crash failed: RuntimeError: boom"

    with pytest.raises(ExecuteError) as err:
        await client.execute("pair", {"a": 1, "c": 2})
    assert err.value.error_class == "GenericError"
    assert "TypeError" in str(err.value) and "'c'" in str(err.value)

    with pytest.raises(ExecuteError) as err:
        await client.execute("not-json")
    assert str(err.value) == "Command not-json returned a non-JSON value"

    assert await client.execute("add", {"a": 1, "b": 1}) == 2


async def test_query_commands(
    server: QmpServer, connect: Callable[[], Awaitable[QMPClient]]
) -> None:
    client = await connect()
    names = [c["name"] for c in await client.execute("query-commands")]  # type: ignore[union-attr]
    assert names[:3] == ["qmp_capabilities", "query-commands", "query-version"]
    assert set(names[3:]) == {"add", "pair", "echo", "nothing", "fail", "crash", "not-json",
                              "block", "release"}
    assert server.commands["add"] == "Add two numbers."
    with pytest.raises(ValueError):
        server.register("add", lambda _: None)


async def test_events(server: QmpServer, connect: Callable[[], Awaitable[QMPClient]]) -> None:
    client = await connect()
    with client.listener("PVIOMMU_FAULT") as faults:
        before = time.time()
        server.emit("PVIOMMU_FAULT", {"endpoint": 8, "address": 0xDEAD000})
        server.emit("STOP")
        event = await asyncio.wait_for(faults.get(), TIMEOUT)
    assert event["event"] == "PVIOMMU_FAULT"
    assert event["data"] == {"endpoint": 8, "address": 0xDEAD000}
    stamp = event["timestamp"]
    assert set(stamp) == {"seconds", "microseconds"}
    assert 0 <= stamp["microseconds"] < 1_000_000
    assert abs(stamp["seconds"] + stamp["microseconds"] / 1e6 - before) < 1.0

    first = await asyncio.wait_for(client.events.get(), TIMEOUT)
    stop = await asyncio.wait_for(client.events.get(), TIMEOUT)
    assert first["event"] == "PVIOMMU_FAULT"
    assert stop["event"] == "STOP" and "data" not in stop

    thread = threading.Thread(target=server.emit, args=("FROM_THREAD", {}))
    thread.start()
    thread.join()
    event = await asyncio.wait_for(client.events.get(), TIMEOUT)
    assert (event["event"], event["data"]) == ("FROM_THREAD", {})


async def test_two_clients(server: QmpServer, connect: Callable[[], Awaitable[QMPClient]]) -> None:
    one, two = await connect(), await connect()
    blocked = asyncio.create_task(one.execute("block"))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    assert await two.execute("add", {"a": 3, "b": 4}) == 7
    assert await two.execute("release") == {}
    assert await asyncio.wait_for(blocked, TIMEOUT) == "released"
    server.emit("BOTH")
    for client in (one, two):
        assert (await asyncio.wait_for(client.events.get(), TIMEOUT))["event"] == "BOTH"


async def test_raw_protocol(server: QmpServer, sock: Path) -> None:
    raw = await RawQmp.connect(sock)
    assert await raw.line() == {"QMP": {"version": VERSION, "capabilities": []}}
    server.emit("EARLY")

    assert await raw.ask(b'{"execute": }\n') == {
        "error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}
    assert await raw.ask(b"[1, 2]\n") == {
        "error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
    assert await raw.ask(b'{"execute": "add", "id": {"x": [1]}}\n') == {
        "error": {"class": "CommandNotFound", "desc": NOT_NEGOTIATED}, "id": {"x": [1]}}
    assert await raw.ask(b'{"execute": "nope", "id": 1}\n') == {
        "error": {"class": "CommandNotFound", "desc": NOT_NEGOTIATED}, "id": 1}
    assert await raw.ask(b'{"id": 3}\n') == {
        "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": 3}
    assert await raw.ask(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}') == {
        "error": {"class": "GenericError", "desc": "Capability oob not available"}}
    assert await raw.ask(b'{"execute": "qmp_capabilities", "id": "neg"}') == {
        "return": {}, "id": "neg"}

    assert await raw.ask(b'{"execute": "add", "arguments": [1], "id": "a"}\n') == {
        "error": {"class": "GenericError",
                  "desc": "QMP input member 'arguments' must be an object"}, "id": "a"}
    assert await raw.ask(b'{"execute": 5}\n') == {
        "error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}
    assert await raw.ask(b'{"execute": "add", "bogus": 1}\n') == {
        "error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}
    assert await raw.ask(b'{"exec-oob": "add", "id": null}\n') == {
        "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"},
        "id": None}
    assert await raw.ask(b'{"execute": "nope", "id": 1.5}') == {
        "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
        "id": 1.5}
    assert await raw.ask(b'{"execute": "add", "id": NaN}\n') == {
        "error": {"class": "GenericError", "desc": "JSON parse error, invalid token 'NaN'"}}

    # A lexical error (a control character) resyncs the parser mid-line.
    assert await raw.ask(b'{"execute": "add", \x00') == {"error": {
        "class": "GenericError",
        "desc": "JSON parse error, expecting property name enclosed in double quotes"}}
    # Requests split anywhere, or several per write, without newlines.
    await raw.send(b'{"execute": "add", "argu')
    await asyncio.sleep(0.01)
    await raw.send(b'ments": {"a": 1, "b": 2}, "id": 1}{"execute": "add", "arguments"'
                   b': {"a": 3, "b": 4}, "id": 2}\n\n  {"execute": "nothing"}')
    assert [await raw.line() for _ in range(3)] == [
        {"return": 3, "id": 1}, {"return": 7, "id": 2}, {"return": {}}]
    await raw.send(b'{\n  "execute": "add",\n  "arguments": {"a": 5,\n "b": 6},\n  "id": "pretty"')
    await asyncio.sleep(0.01)
    assert await raw.ask(b"\n}\n") == {"return": 11, "id": "pretty"}
    assert await raw.ask('{"execute": "echo", "arguments": {"s": "é"}}'.encode()) == {
        "return": {"echo": {"s": "é"}}}

    server.emit("LATE", {"n": 1})
    event = await raw.line()
    assert (event["event"], event["data"]) == ("LATE", {"n": 1})
    raw.writer.close()


async def test_oversized_request(sock: Path) -> None:
    server = QmpServer(VERSION, max_request_size=1024)
    server.register("add", lambda a: a["a"] + a["b"])
    await server.start_unix(str(sock))
    try:
        big, small = await RawQmp.connect(sock), await RawQmp.connect(sock)
        await big.negotiate()
        await small.negotiate()
        await big.send(b'{"execute": "add", "arguments": {"s": "' + b"x" * 2000)
        assert await big.line() == {"error": {
            "class": "GenericError", "desc": "QMP request exceeds 1024 bytes"}}
        assert await asyncio.wait_for(big.reader.read(), TIMEOUT) == b""
        assert await small.ask(b'{"execute": "add", "arguments": {"a": 1, "b": 2}}') == {
            "return": 3}
        small.writer.close()
    finally:
        await server.close()


async def test_an_incomplete_request_does_not_swallow_the_next(
    server: QmpServer, sock: Path
) -> None:
    raw = await RawQmp.connect(sock)
    await raw.negotiate()
    await raw.send(b"{\n")
    await asyncio.sleep(0.01)
    assert await raw.ask(b'{"execute": "add", "arguments": {"a": 1, "b": 2}, "id": 7}\n') == {
        "error": {"class": "GenericError",
                  "desc": "JSON parse error, expecting property name enclosed in double quotes"}}
    assert await raw.line() == {"return": 3, "id": 7}
    raw.writer.close()


async def test_ids_that_cannot_be_echoed(server: QmpServer, sock: Path) -> None:
    raw = await RawQmp.connect(sock)
    await raw.negotiate()
    for bad_id, reason in [(b"1e999", "number '1e999' is out of range"),
                           (b"-1e999", "number '-1e999' is out of range"),
                           (b"[" * 1000 + b"]" * 1000, "nesting deeper than 128 levels"),
                           (b"1" * 5000, "exceeds the limit (4300 digits) for integer string "
                                         "conversion: value has 5000 digits; use "
                                         "sys.set_int_max_str_digits() to increase the limit")]:
        assert await raw.ask(b'{"execute": "nothing", "id": ' + bad_id + b"}\n") == {
            "error": {"class": "GenericError", "desc": "JSON parse error, " + reason}}
    deepest: list[Any] = []
    for _ in range(126):  # with the request's braces: 128 levels
        deepest = [deepest]
    assert await raw.ask(b'{"execute": "nothing", "id": ' + json.dumps(deepest).encode()
                         + b"}") == {"return": {}, "id": deepest}
    assert await raw.ask(b'{"execute": "nothing", "id": -1.5e300}') == {
        "return": {}, "id": -1.5e300}
    raw.writer.close()


async def test_max_clients(sock: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError):
        QmpServer(VERSION, max_clients=0)
    server = QmpServer(VERSION, max_clients=2)
    await server.start_unix(str(sock))
    try:
        one, two = await RawQmp.connect(sock), await RawQmp.connect(sock)
        await one.negotiate()
        await two.negotiate()
        for _ in range(3):
            over = await RawQmp.connect(sock)
            assert await over.line() == {"error": {
                "class": "GenericError", "desc": "Too many QMP clients (at most 2)"}}
            assert await asyncio.wait_for(over.reader.read(), TIMEOUT) == b""
        assert "qmp#3 refused: 2 QMP clients are connected, the limit" in caplog.text
        one.writer.close()
        await asyncio.wait_for(one.writer.wait_closed(), TIMEOUT)
        for _ in range(100):  # the server notices the disconnection
            if len(server._sessions) < 2:
                break
            await asyncio.sleep(0.01)
        three = await RawQmp.connect(sock)
        await three.negotiate()
        assert await two.ask(b'{"execute": "query-version"}') == {"return": VERSION}
        two.writer.close()
        three.writer.close()
    finally:
        await server.close()


async def test_close_with_clients_logs_no_traceback(
    sock: Path, caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
    server = QmpServer(VERSION)
    await server.start_unix(str(sock))
    idle, busy = await RawQmp.connect(sock), await RawQmp.connect(sock)
    await idle.negotiate()
    await busy.send(b'{"execute": "qmp_cap')
    await asyncio.sleep(0.01)
    await server.close()
    await asyncio.sleep(0.01)
    assert errors == []
    assert "Traceback" not in caplog.text and not any(
        r.levelname in ("ERROR", "CRITICAL") for r in caplog.records)
    for raw in (idle, busy):
        raw.writer.close()


async def test_dead_and_slow_clients(
    server: QmpServer, sock: Path, connect: Callable[[], Awaitable[QMPClient]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(qmp_server, "_MAX_WRITE_BUFFER", 256 << 10)
    dead, slow = await RawQmp.connect(sock), await RawQmp.connect(sock)
    await dead.negotiate()
    await slow.negotiate()
    client = await connect()
    dead.writer.transport.abort()
    await asyncio.sleep(0.01)

    payload = {"blob": "y" * (64 << 10)}
    for n in range(100):
        server.emit("BIG", {**payload, "n": n})
        event = await asyncio.wait_for(client.events.get(), TIMEOUT)
        assert event["data"] == {**payload, "n": n}
    assert await client.execute("add", {"a": 1, "b": 1}) == 2

    received = b""
    while chunk := await asyncio.wait_for(slow.reader.read(1 << 20), TIMEOUT):
        received += chunk
    assert 0 < received.count(b'"BIG"') < 100


async def test_close_and_stale_socket(sock: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    server = QmpServer(VERSION)
    await server.start_unix(str(sock))
    raw = await RawQmp.connect(sock)
    await raw.negotiate()
    await server.close()
    assert await asyncio.wait_for(raw.reader.read(), TIMEOUT) == b""
    assert not sock.exists()
    server.emit("AFTER_CLOSE")

    sock.write_text("not a socket")
    with pytest.raises(OSError):
        await QmpServer(VERSION).start_unix(str(sock))
    assert not stat.S_ISSOCK(os.lstat(sock).st_mode)
