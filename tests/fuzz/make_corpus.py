"""Writes the seed corpus of every fuzz target: small valid inputs, in each target's
own encoding (see the target modules' one_input).

``python -m tests.fuzz.make_corpus`` rewrites tests/fuzz/corpus/TARGET/*; the files
are committed, so this only runs again when an encoding changes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from pviommu.fuzz.iotlb import UADDR
from pviommu.transport.vfio_user import protocol as vfu
from pviommu.transport.vhost_user import protocol as vhu
from pviommu.vmsa.builder import Builder
from pviommu.vmsa.config import OA_SIZES, Granule, VmsaConfig
from pviommu.vmsa.descriptors import s1_attrs, s2_attrs
from pviommu.vmsa.faults import Perm
from pviommu.vmsa.memory import BufferMemory, PoolAllocator

CORPUS = Path(__file__).parent / "corpus"
GPA = 0x40000000
U8, U16, U32, U64 = (struct.Struct(f"<{c}").pack for c in "BHIQ")


def virtqueue() -> dict[str, bytes]:
    """A queue of 8: a direct chain (readable, writable) and an indirect one."""
    size = 8
    descs = [(0x1000, 64, 1, 1), (0x2000, 64, 2, 0), (0x300, 32, 4, 0)]
    table = b"".join(struct.pack("<QIHH", *d) for d in descs).ljust(16 * size, b"\0")
    avail = U16(0) + U16(2) + U16(0) + U16(2) + bytes(2 * size - 4) + U16(0)
    used = bytes(4 + 8 * size + 2)
    end = 222  # after the used ring of a queue of 8 at the RAM's start
    indirect = struct.pack("<QIHH", 0x4000, 16, 1, 1) + struct.pack("<QIHH", 0x5000, 16, 2, 0)
    rest = bytes(0x300 - end) + indirect
    seeds = {}
    for name, mode in (("direct-and-indirect", 2), ("event-idx", 3), ("no-views", 6)):
        seeds[name] = U8(mode) + U8(3) + U8(0x07) + table + avail + used + rest
    return seeds


def _viommu_request(choice: int, body: bytes) -> bytes:
    return U8(choice) + U8(0) + body


def viommu() -> dict[str, bytes]:
    """ATTACH, MAP, PROBE, UNMAP, DETACH in one kick; then an event buffer and a fault."""
    reqs = [
        _viommu_request(0, struct.pack("<III4x", 1, 0x10, 0)),  # ATTACH domain 1
        _viommu_request(2, struct.pack("<IQQQI", 1, 0x100000, 0x1FFFFF, GPA, 3)),  # MAP
        _viommu_request(4, struct.pack("<I64x", 0x10)),  # PROBE
        _viommu_request(3, struct.pack("<IQQ4x", 1, 0x100000, 0x1FFFFF)),  # UNMAP
        _viommu_request(1, struct.pack("<II8x", 1, 0x10)),  # DETACH
    ]
    events = U8(1) + U8(24) + U8(0) + U8(1) + U64(0x100000)
    seeds = {}
    for name, cfg in (("loop", 0), ("kick-thread", 16), ("probe-512-event-idx", 2 | 8)):
        seeds[name] = U8(cfg) + U64((1 << 64) - 1) + U8(0) + U8(len(reqs) - 1) + \
            b"".join(reqs) + events
    return seeds


def _vhu(request: int, payload: bytes = b"", need_reply: bool = False, nfds: int = 0,
         kind: int = 0) -> bytes:
    return (U8(nfds | kind << 2) + U8(request - 1) + U8(0x88 if need_reply else 0x80)
            + U8(len(payload)) + payload)


def vhost_user() -> dict[str, bytes]:
    """The handshake QEMU makes, rings set up and started, then queries."""
    R = vhu.Request
    seeds = {}
    for name, which in (("viommu", 0), ("rng-access-platform", 1)):
        pf = (1 << 0) | (1 << 3) | (1 << 9) | (1 << 13) | (1 << 16) | (which << 5)
        features = (1 << 32) | (1 << 30) | (which << 33)
        uaddr = UADDR
        msgs = [
            _vhu(R.GET_FEATURES), _vhu(R.GET_PROTOCOL_FEATURES),
            _vhu(R.SET_PROTOCOL_FEATURES, U64(pf)),
            _vhu(R.SET_OWNER, need_reply=True),
            _vhu(R.SET_FEATURES, U64(features), need_reply=True),
            _vhu(R.SET_MEM_TABLE, U32(1) + U32(0) + struct.pack("<QQQQ", GPA, 0x10000, uaddr, 0),
                 need_reply=True, nfds=1, kind=1),
            _vhu(R.SET_VRING_NUM, U32(0) + U32(16)),
            _vhu(R.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, uaddr, uaddr + 0x200,
                                               uaddr + 0x100, 0)),
            _vhu(R.SET_VRING_BASE, U32(0) + U32(0)),
            _vhu(R.SET_VRING_CALL, U64(0), nfds=1, kind=0),
            _vhu(R.SET_VRING_KICK, U64(0), nfds=1, kind=0),
            _vhu(R.SET_VRING_ENABLE, U32(0) + U32(1), need_reply=True),
            _vhu(R.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8)),
            _vhu(R.SET_STATUS, U64(0xF), need_reply=True),
            _vhu(R.GET_STATUS),
        ]
        if which:
            msgs.insert(5, _vhu(R.SET_BACKEND_REQ_FD, nfds=1, kind=3, need_reply=True))
            msgs.append(_vhu(R.IOTLB_MSG, vhu.IotlbMsg(0x1000, 0x1000, uaddr, 3, 2).pack(),
                             need_reply=True))
            msgs.append(_vhu(R.IOTLB_MSG, vhu.IotlbMsg(0, 0, 0, 0, 3).pack(),
                             need_reply=True))
        msgs += [_vhu(R.GET_VRING_BASE, U32(0) + U32(0)), _vhu(R.RESET_DEVICE)]
        seeds[name] = U8(which) + b"".join(msgs)
    return seeds


def iotlb() -> dict[str, bytes]:
    """Misses answered with UPDATEs, a refused one, a lookup, an INVALIDATE."""
    page = 0x3000
    resolve = U8(0) + U32(page) + U16(0x1FFF) + U8(2)  # two pages, read-write
    answer = U8(0) + U8(3)  # UPDATE rw, ack 0
    refused = U8(0) + U32(0x9000) + U16(0) + U8(0) + U8(1)
    lookup = U8(5) + U32(page) + U16(0xFFF) + U8(0)
    invalidate = U8(3) + U8(1) + U8(1) + U32(page) + U8(0) + U8(3) + U8(3)
    return {"resolve-lookup-invalidate": U8(0) + resolve + answer + answer + refused +
            lookup + invalidate + resolve + answer + answer}


def _spec(nfds: int, kind: int) -> int:
    for spec in range(0x40, 0x80):
        if spec % 3 == nfds and (spec >> 2) % 3 == kind:
            return spec
    raise AssertionError("no spec byte")


def _vfu(command: int, payload: bytes, msg_id: int, nfds: int = 0, kind: int = 0,
         flags: int = 0x80) -> bytes:
    spec = _spec(nfds, kind) if nfds else 0
    return (U8(spec) + U8(command - 1) + U8(flags) + U16(msg_id) + U8(len(payload))
            + payload)


def vfio_user() -> dict[str, bytes]:
    """VERSION, DMA_MAP of a memfd, the device queries, config-space accesses, IRQs."""
    C = vfu.Command
    caps = json.dumps({"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20,
                                        "pgsizes": 4096, "max_dma_maps": 16}},
                      separators=(",", ":")).encode() + b"\0"
    msgs = [
        _vfu(C.VERSION, struct.pack("<HH", 0, 0) + caps, 1),
        _vfu(C.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, GPA, 0x10000), 2, nfds=1, kind=1),
        _vfu(C.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0), 3),
        _vfu(C.DEVICE_GET_REGION_INFO, struct.pack("<IIIIQQ", 32, 0, 7, 0, 0, 0), 4),
        _vfu(C.DEVICE_GET_REGION_INFO, struct.pack("<IIIIQQ", 32, 0, 4, 0, 0, 0), 5),
        _vfu(C.REGION_READ, struct.pack("<QII", 0, 7, 4), 6),
        _vfu(C.REGION_WRITE, struct.pack("<QII", 4, 7, 2) + U16(6), 7),
        _vfu(C.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 16, 0, 2, 0), 8),
        _vfu(C.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x24, 2, 0, 1), 9, nfds=1, kind=0),
        _vfu(C.REGION_READ, struct.pack("<QII", 0, 4, 4), 10),
        _vfu(C.REGION_WRITE_MULTI, U64(1) + struct.pack("<QII8s", 0x14, 4, 1, b"\x0f"), 11,
             flags=0x80 | vfu.FLAG_NO_REPLY),
        _vfu(C.DMA_UNMAP, struct.pack("<IIQQ", 24, 0, GPA, 0x10000), 12),
        _vfu(C.DEVICE_RESET, b"", 13),
    ]
    return {"session": b"".join(msgs)}


def qmp() -> dict[str, bytes]:
    """A session with every command, bad input, and built requests."""
    cmds = [
        {"execute": "query-commands", "id": 1},
        {"execute": "query-viommu-domains"},
        {"execute": "query-viommu-mappings", "arguments": {"domain": 1}, "id": "m"},
        {"execute": "query-viommu-endpoints"}, {"execute": "query-viommu-stats"},
        {"execute": "query-viommu-config"},
        {"execute": "inject-dma", "arguments": {"endpoint": 16, "address": 4096, "size": 8}},
        {"execute": "inject-dma", "arguments": {"endpoint": 16, "address": 4096,
                                                "access": "write"}},
        {"execute": "inject-fault", "arguments": {"endpoint": 16, "address": 4096}},
        {"execute": "revoke-mapping", "arguments": {"endpoint": 16}},
    ]
    text = "\n".join(json.dumps(c) for c in cmds).encode()
    return {
        "session": U8(0x32) + bytes([5, 40, 3]) + text,
        "bad-input": U8(0x02) + b'{"execute": 1}\x00{"x":\n[1,2}{"execute":"query-version"}'
                     b' 12 "str" {"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}',
        "built": U8(0x03) + bytes(range(1, 64)),
    }


def vmsa() -> dict[str, bytes]:
    """Tables built by the Builder for stage 1 and 2 in each granule."""
    seeds = {}
    for name, mode, ias in (("s1-4k", 0, 39), ("s2-4k", 1 | 8, 40), ("s1-16k", 2, 36),
                            ("s2-64k", 1 | 4 | 8, 42), ("s1-4k-ha", 0x80, 39)):
        stage = 1 + (mode & 1)
        granule = (Granule.G4K, Granule.G16K, Granule.G64K, Granule.G4K)[(mode >> 1) & 3]
        cfg = VmsaConfig(stage, granule, ias, 48)
        mem = BufferMemory(1 << 18)
        builder = Builder(cfg, mem, PoolAllocator.over(mem))
        g = granule.size
        attrs = s1_attrs(af=not mode & 0x80) if stage == 1 else s2_attrs(Perm.R | Perm.W)
        builder.map(0x10 * g, 0x2000000, 4 * g, attrs)
        words = [(i, w) for i in range(len(mem.buffer) // 8)
                 if (w := struct.unpack_from("<Q", mem.buffer, 8 * i)[0])]
        walks = [0x10 * g + 8, 0x12 * g + 0x10, 0x20 * g, 1 << 50]
        seeds[name] = (U8(mode) + U8(ias - 25) + U8(OA_SIZES.index(48)) + U8(len(words))
                       + b"".join(U16(i) + U64(w) for i, w in words)
                       + U8(len(walks) - 1) + b"".join(U64(ia << 1) + U8(k)
                                                       for k, ia in enumerate(walks)))
    return seeds


SEEDS = {"virtqueue": virtqueue, "viommu": viommu, "vhost-user": vhost_user,
         "iotlb": iotlb, "vfio-user": vfio_user, "qmp": qmp, "vmsa": vmsa}


def main() -> None:
    """Rewrites every target's seed directory."""
    for target, make in SEEDS.items():
        out = CORPUS / target
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            old.unlink()
        for name, data in make().items():
            (out / name).write_bytes(data)
            print(f"{target}/{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
