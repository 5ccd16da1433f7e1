"""QMP input: the JSON streamer, then a server session with the PV-IOMMU commands.

The input is either raw bytes or (first byte odd) requests built from it: a command
name (a registered one mostly), an id, arguments with known and unknown names and
values of every JSON type (huge and negative integers, floats, strings, nulls,
nested containers). It is fed to a QMP session in chunks the input cuts. The
commands are the server's own, ``qmp_capabilities``, the PV-IOMMU's
(:class:`~pviommu.qmp.viommu.ViommuCommands`: queries, inject-fault,
revoke-mapping) and ``inject-dma`` over a domain's DMA space in fuzz RAM.

Checks (QMP spec, as QEMU behaves): the greeting comes first; every line out is a
JSON object: a ``return``, an ``error`` whose class is one QEMU uses and whose
``desc`` is a string, or an event; each request or piece of bad input gets exactly
one answer (counted by a second streamer fed the input whole, which must also
cut it into the same values as the chunked one); the id comes back as sent; no
command fails with an internal error.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ..devices.viommu import VirtioIommu
from ..iommu.dma_space import DomainDma
from ..iommu.pv import IommuConfig, PvIommu
from ..qmp.dma import DmaCommands
from ..qmp.server import QmpServer, _decode
from ..qmp.streamer import Invalid, JsonStreamer, TooLarge, Value
from ..qmp.viommu import ViommuCommands
from .common import Bytes, Ram, check, run_async

MAX_REQUEST = 2048
GPA = 0x40000000
RAM_SIZE = 1 << 16
ENDPOINTS = (0x10, 0x18)
_CLASSES = {"GenericError", "CommandNotFound"}
_NAMES = ["qmp_capabilities", "query-commands", "query-version", "query-viommu-domains",
          "query-viommu-mappings", "query-viommu-endpoints", "query-viommu-stats",
          "query-viommu-config", "inject-fault", "revoke-mapping", "inject-dma", "nope"]
_ARGS = ["domain", "start", "end", "endpoint", "address", "access", "reason", "min-size",
         "size", "enable", "stage", "x"]

_ram: Ram | None = None


class _Transport:
    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        pass


class Writer:
    """What the server writes to its client, kept."""

    def __init__(self) -> None:
        self.transport = _Transport()
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


def _value(inp: Bytes, depth: int = 0) -> Any:
    kind = inp.u8() % 12
    if kind < 4:
        return (inp.u8(), inp.u64(), -inp.u32(), (1 << 64) + inp.u8())[kind]
    if kind == 4:
        return inp.pick(("read", "write", "domain", "mapping", "", "1", "\u00e9\x00"))
    if kind == 5:
        return inp.pick((True, False, None, 1.5, -0.0, 1e300))
    if kind == 6 and depth < 3:
        return [_value(inp, depth + 1) for _ in range(inp.u8() % 3)]
    if kind == 7 and depth < 3:
        return {inp.pick(_ARGS): _value(inp, depth + 1) for _ in range(inp.u8() % 3)}
    return inp.u16() % 0x40


def _requests(inp: Bytes) -> bytes:
    out = []
    for _ in range(inp.u8() % 8 + 1):
        req: dict[str, Any] = {"execute": inp.pick(_NAMES)}
        shape = inp.u8()
        if shape & 1:
            req["arguments"] = {inp.pick(_ARGS): _value(inp) for _ in range(inp.u8() % 5)}
        if shape & 2:
            req["id"] = _value(inp)
        if shape & 4:
            req[inp.pick(("execute", "arguments", "oob", "exec-oob"))] = _value(inp)
        out.append(json.dumps(req).encode())
    return b"\n".join(out)


def _chunks(data: bytes, cuts: bytes) -> list[bytes]:
    out, pos = [], 0
    for c in cuts:
        if pos >= len(data):
            break
        out.append(data[pos:pos + c + 1])
        pos += c + 1
    out.append(data[pos:])
    return [c for c in out if c]


def one_input(data: bytes) -> None:
    """Feeds a QMP session what ``data`` holds and checks every answer."""
    inp = Bytes(data)
    mode = inp.u8()
    cuts = inp.take(mode >> 4)
    text = _requests(inp) if mode & 1 else inp.rest()
    if mode & 2:
        text = b'{"execute":"qmp_capabilities"}' + text
    chunks = _chunks(text, cuts)
    whole = JsonStreamer(MAX_REQUEST).feed(text)
    streamer = JsonStreamer(MAX_REQUEST)
    chunked = [item for c in chunks for item in streamer.feed(c)]
    check(chunked == whole, f"chunks {chunks!r} give {chunked}, the whole input {whole}")
    out = run_async(lambda: _session(chunks))
    _check_output(whole, out)


async def _session(chunks: list[bytes]) -> bytes:
    global _ram
    if _ram is None:
        _ram = Ram(RAM_SIZE, GPA)
    iommu = PvIommu(IommuConfig(), ENDPOINTS)
    device = VirtioIommu(iommu)
    server = QmpServer({"qemu": {"major": 10, "minor": 2, "micro": 0}, "package": ""},
                       max_request_size=MAX_REQUEST)
    ViommuCommands(server, iommu, device)
    memory = _ram.memory
    spaces = {ep: DomainDma(iommu, ep, memory, lambda fault: None) for ep in ENDPOINTS}
    DmaCommands(server, spaces.get)
    iommu.attach(1, ENDPOINTS[0], 0)
    iommu.map(1, 0x1000, 0x2FFF, GPA + 0x1000, 3)
    reader = asyncio.StreamReader()
    for c in chunks:
        reader.feed_data(c)
    reader.feed_eof()
    writer = Writer()
    await server._serve(reader, writer)  # type: ignore[arg-type]  # the stream's duck type
    return bytes(writer.out)


def _check_output(items: list[Value | Invalid | TooLarge], out: bytes) -> None:
    lines = out.split(b"\r\n")
    check(lines[-1] == b"", "the output does not end with a line end")
    messages = []
    for line in lines[:-1]:
        try:
            msg = json.loads(line)
        except ValueError:
            raise AssertionError(f"a line out is not JSON: {line[:80]!r}") from None
        check(isinstance(msg, dict), f"a line out is not an object: {line[:80]!r}")
        messages.append(msg)
    check(messages and "QMP" in messages[0], "no greeting first")
    answers = [m for m in messages[1:] if "event" not in m]
    expected = 0
    for item in items:
        expected += 1
        if isinstance(item, TooLarge):
            break
    check(len(answers) == expected, f"{expected} requests and errors in, {len(answers)} "
                                    "answers out")
    for item, m in zip(items, answers, strict=False):
        if isinstance(item, Value):
            try:
                request = _decode(item.data)
            except ValueError:
                request = None
            if isinstance(request, dict) and "id" in request:
                check(m.get("id") == request["id"], f"answer {m} to a request with id "
                                                    f"{request['id']!r}")
        if "error" in m:
            err = m["error"]
            check(isinstance(err, dict) and err.get("class") in _CLASSES
                  and isinstance(err.get("desc"), str), f"error answer {m}")
        else:
            check("return" in m, f"answer {m} is neither a return nor an error")
