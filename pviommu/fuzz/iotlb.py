"""The vhost-user device IOTLB: IOTLB_MSG from the front-end, MISS round trips on the
back-end channel, lookups.

The input is a list of operations on a DeviceIotlb over fuzz RAM: resolve a range
(each miss goes out as IOTLB MISS on a real BackendChannel over a socketpair, and a
fake front-end answers it as the input says: an UPDATE then ack 0, ack 1 (the guest
refuses), ack 0 without an UPDATE, a broken reply, no answer, a closed channel),
concurrent resolves, UPDATE and INVALIDATE messages with any fields, lookups.

Checks: resolve gives pieces inside guest memory whose lengths add up to the range,
the same pieces a lookup gives right after, or one of the IOTLB's documented errors;
a message is applied or refused with ValueError or a memory error; after an
INVALIDATE nothing in its range is found; the entries stay sorted, disjoint, inside
guest memory, within ``max_entries``, with a read/write permission each.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from ..dma import Access
from ..memory import MemoryAccessError
from ..transport.vhost_user import protocol as p
from ..transport.vhost_user.backend_channel import BackendChannel
from ..transport.vhost_user.iotlb import PAGE_SIZE, DeviceIotlb, IotlbError
from .common import Bytes, Ram, check, run_async

GPA = 0x40000000
UADDR = 0x7F0000000000
RAM_SIZE = 1 << 16
IOVA_SPAN = 1 << 20
ACCESSES = (Access.READ, Access.WRITE, Access.READ | Access.WRITE)

_ram: Ram | None = None


def ram() -> Ram:
    """The guest RAM (made once)."""
    global _ram
    if _ram is None:
        _ram = Ram(RAM_SIZE, GPA, UADDR)
    return _ram


def _iova(inp: Bytes) -> int:
    raw = inp.u32()
    return raw % IOVA_SPAN if raw < 0xF0000000 else inp.u64()


def _random_msg(inp: Bytes) -> p.IotlbMsg:
    kind = inp.u8()
    mtype = (p.IotlbType.UPDATE, p.IotlbType.INVALIDATE)[kind & 1] if kind < 0xF0 \
        else kind & 7
    if inp.u8() & 1:  # page-aligned and inside the RAM, mostly
        return p.IotlbMsg((_iova(inp) & ~(PAGE_SIZE - 1)), PAGE_SIZE * (inp.u8() % 4 + 1),
                          UADDR + PAGE_SIZE * (inp.u8() % (RAM_SIZE // PAGE_SIZE)),
                          inp.u8() % 4, mtype)
    return p.IotlbMsg(inp.u64(), inp.u64(), inp.u64(), inp.u8(), mtype)


class Frontend:
    """Answers the MISSes read off ``sock`` as the input says."""

    def __init__(self, sock: socket.socket, iotlb: DeviceIotlb, inp: Bytes) -> None:
        self.sock, self.iotlb, self.inp = sock, iotlb, inp

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                msg = await p.read_message(self.sock)
            except (EOFError, OSError, p.ProtocolError):
                return
            check(msg.request == p.BackendRequest.IOTLB_MSG and msg.need_reply,
                  f"back-end request {msg.request} flags {msg.flags:#x} is no IOTLB MISS")
            miss = p.IotlbMsg.unpack(msg.payload)
            check(miss.type == p.IotlbType.MISS and miss.perm in (1, 2, 3),
                  f"a MISS with type {miss.type}, perm {miss.perm}")
            action = self.inp.u8() % 8
            if action in (0, 6):
                update = p.IotlbMsg(miss.iova & ~(PAGE_SIZE - 1), PAGE_SIZE,
                                    UADDR + (miss.iova % RAM_SIZE & ~(PAGE_SIZE - 1)),
                                    self.inp.u8() % 4 or 3, p.IotlbType.UPDATE) \
                    if action == 0 else _random_msg(self.inp)
                with contextlib.suppress(ValueError, MemoryAccessError):
                    self.iotlb.handle_message(update)
                reply = p.encode(msg.request, p.U64.pack(0), reply=True)
            elif action == 1:
                reply = p.encode(msg.request, p.U64.pack(1), reply=True)
            elif action == 2:
                reply = p.encode(msg.request, p.U64.pack(0), reply=True)
            elif action == 3:
                reply = self.inp.take(self.inp.u8() % 24)
            elif action == 4:
                continue  # never answered: the miss times out
            elif action == 5:
                self.sock.close()
                return
            else:
                reply = p.encode(msg.request, p.U64.pack(self.inp.u64()), reply=True)
            try:
                await loop.sock_sendall(self.sock, reply)
            except OSError:
                return


def one_input(data: bytes) -> None:
    """Runs the operations ``data`` holds on a fresh IOTLB."""
    run_async(lambda: _run(Bytes(data)))


async def _run(inp: Bytes) -> None:
    mem = ram()
    iotlb = DeviceIotlb(mem.memory, miss_timeout=0.002, max_entries=8)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    frontend = asyncio.get_running_loop().create_task(
        Frontend(ours, iotlb, inp).run())
    try:
        if not inp.u8() & 0x80:
            iotlb.set_channel(BackendChannel(theirs))
        else:
            theirs.close()
        for _ in range(24):
            if not inp.remaining():
                break
            op = inp.u8() % 6
            if op in (0, 1):
                await _resolve(iotlb, mem, _iova(inp), inp.u16() % (4 * PAGE_SIZE) + 1,
                               inp.pick(ACCESSES))
            elif op == 2:
                iova, access = _iova(inp), inp.pick(ACCESSES)
                await asyncio.gather(
                    _resolve(iotlb, mem, iova, inp.u16() % PAGE_SIZE + 1, access),
                    _resolve(iotlb, mem, iova, inp.u16() % PAGE_SIZE + 1, access))
            elif op == 3:
                msg = _random_msg(inp)
                try:
                    iotlb.handle_message(msg)
                except (ValueError, MemoryAccessError):
                    pass
                else:
                    if msg.type == p.IotlbType.INVALIDATE and msg.size:
                        for e in iotlb.entries():
                            check(e.iova + e.size <= msg.iova or e.iova >= msg.iova + msg.size,
                                  f"entry {e} survived INVALIDATE {msg.iova:#x}+{msg.size:#x}")
            elif op == 4:
                iotlb.invalidate(_iova(inp), inp.u32())
            else:
                try:
                    pieces = iotlb.lookup(_iova(inp), inp.u16() + 1, inp.pick(ACCESSES))
                except ValueError:
                    pieces = None
                for gpa, n in pieces or ():
                    check(mem.memory.contains(gpa, n), f"lookup gave {gpa:#x}+{n:#x}")
            _check_entries(iotlb, mem)
    finally:
        iotlb.close()
        frontend.cancel()
        ours.close()
        theirs.close()


async def _resolve(iotlb: DeviceIotlb, mem: Ram, iova: int, length: int,
                   access: Access) -> None:
    try:
        pieces = await iotlb.resolve(iova, length, access)
    except (IotlbError, ValueError):
        return
    check(sum(n for _, n in pieces) == length,
          f"resolve {iova:#x}+{length:#x} gave pieces of {sum(n for _, n in pieces)} bytes")
    for gpa, n in pieces:
        check(mem.memory.contains(gpa, n), f"resolve gave {gpa:#x}+{n:#x}, outside memory")
    check(iotlb.lookup(iova, length, access) == pieces,
          "lookup right after resolve gives other pieces")


def _check_entries(iotlb: DeviceIotlb, mem: Ram) -> None:
    entries = iotlb.entries()
    check(len(entries) <= iotlb.max_entries, f"{len(entries)} entries, over the limit")
    for e in entries:
        check(e.size > 0 and e.access in (1, 2, 3), f"entry {e}")
        check(mem.memory.contains(e.gpa, e.size), f"entry {e} lies outside guest memory")
    for a, b in zip(entries, entries[1:], strict=False):
        check(a.iova + a.size <= b.iova, f"entries {a} and {b} overlap or are unsorted")
