"""What a lab is: the IOMMU, its endpoints, the guest's CPUs, memory, kernel and files.

A :class:`Topology` is a frozen description; it validates itself as a whole
when it is made, and every error is a :class:`TopologyError` naming the key as
a topology file spells it (``iommu.kind``, ``endpoints[1].size``). The same
description reads from a TOML file (:meth:`Topology.from_toml`) or a dict
(:meth:`Topology.from_dict`), and :meth:`Topology.to_dict` writes it back.
The format is documented in docs/LAB.md.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..devices.blk import DEFAULT_SERIAL, ID_BYTES
from ..endpoints import parse_size
from ..iommu.pv import IommuConfig, ResvRegion
from ..machine.guest_image import ExtraFile
from ..machine.topology import pci_addr, pci_rid

IOMMU_KINDS = ("pv", "vsmmu", "builtin", "smmuv3", "none")
"""pv: the backend's PV-IOMMU (vhost-user) and its vfio-user endpoints; vsmmu:
QEMU's SMMUv3 and the backend's vhost-user endpoints; builtin: QEMU's own
virtio-iommu-pci with virtio-blk-pci/virtio-rng-pci; smmuv3: QEMU's SMMUv3 with
QEMU's own devices (vsmmu's anchor); none: no IOMMU."""
ENDPOINT_KINDS = ("blk", "rng")
PV_ONLY = ("bypass", "bypass-config", "max-domains", "max-mappings", "reserved",
           "page-size-mask", "input-range", "domain-range", "probe-size", "mmio", "msi-region")
"""The iommu keys only the PV-IOMMU has (``pviommu serve``'s device options)."""
IOMMU_DEVICE = ("pv", "builtin")
"""The IOMMU kinds that are a PCI function themselves (and so have an address)."""
IOMMU_ADDR = "1.0"
FIRST_ENDPOINT_ADDR = 2
DEFAULT_DISK = 64 << 20
"""The size of the fresh image a blk endpoint gets without ``image`` or ``size``."""
MiB = 1 << 20
MAX_VCPUS = 512
"""QEMU's virt machine with a GICv3 takes at most 512 vCPUs."""
_DEFAULTS = IommuConfig()


class TopologyError(ValueError):
    """A topology (or, later, a lab built from it) is not valid; ``key`` names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Iommu:
    """The IOMMU and its options.

    ``strict`` becomes the guest's ``iommu.strict=1`` (True) or ``=0`` (lazy
    invalidation); None leaves the kernel's default. ``passthrough`` boots the
    guest with ``iommu.passthrough=1`` (identity domains). The rest are the
    PV-IOMMU's own (``pviommu serve --bypass`` etc.); ``reserved`` regions are
    inclusive (START, END) pairs every endpoint reports in PROBE. ``address`` is
    the IOMMU's PCI address (pv and builtin only); None places it at 1.0.
    """

    kind: str = "pv"
    strict: bool | None = None
    passthrough: bool = False
    bypass: bool = _DEFAULTS.bypass
    bypass_config: bool = _DEFAULTS.bypass_config
    max_domains: int = _DEFAULTS.max_domains
    max_mappings: int = _DEFAULTS.max_mappings
    reserved: tuple[tuple[int, int], ...] = ()
    address: str | None = None
    page_size_mask: int = _DEFAULTS.page_size_mask
    input_range: tuple[int, int] | None = None
    """Inclusive I/O virtual address range; None: all 64 bits."""
    domain_range: tuple[int, int] | None = None
    """Inclusive domain ID range; None: all 32 bits."""
    probe_size: int = _DEFAULTS.probe_size
    mmio: bool = _DEFAULTS.mmio
    msi_region: bool = True
    """Report the GICv3 ITS doorbell as an MSI region in PROBE."""

    def config(self) -> IommuConfig:
        """The PV-IOMMU's device configuration (meaningful for kind "pv")."""
        extra: dict[str, Any] = {}
        if self.input_range is not None:
            extra["input_start"], extra["input_end"] = self.input_range
        if self.domain_range is not None:
            extra["domain_start"], extra["domain_end"] = self.domain_range
        if not self.msi_region:
            extra["msi_doorbell"] = None
        return IommuConfig(bypass=self.bypass, bypass_config=self.bypass_config,
                           max_domains=self.max_domains, max_mappings=self.max_mappings,
                           reserved=[ResvRegion(s, e) for s, e in self.reserved],
                           page_size_mask=self.page_size_mask, probe_size=self.probe_size,
                           mmio=self.mmio, **extra)

    @classmethod
    def pv(cls, config: IommuConfig, **options: Any) -> Iommu:
        """The PV-IOMMU presenting ``config`` (the device configuration ``pviommu
        serve``'s options make); ``options`` are the other fields (strict, ...)."""
        full = (_DEFAULTS.input_start, _DEFAULTS.input_end)
        inputs = (config.input_start, config.input_end)
        domains = (config.domain_start, config.domain_end)
        return cls(kind="pv", bypass=config.bypass, bypass_config=config.bypass_config,
                   max_domains=config.max_domains, max_mappings=config.max_mappings,
                   reserved=tuple((r.start, r.end) for r in config.reserved),
                   page_size_mask=config.page_size_mask, probe_size=config.probe_size,
                   mmio=config.mmio, msi_region=config.msi_doorbell is not None,
                   input_range=None if inputs == full else inputs,
                   domain_range=None if domains == (_DEFAULTS.domain_start,
                                                    _DEFAULTS.domain_end) else domains,
                   **options)

    def kernel_args(self) -> list[str]:
        """The guest kernel arguments these options ask for."""
        args = [] if self.strict is None else [f"iommu.strict={int(self.strict)}"]
        return args + (["iommu.passthrough=1"] if self.passthrough else [])


@dataclass(frozen=True)
class Endpoint:
    """``count`` endpoint devices of one ``kind``, behind the topology's IOMMU.

    A blk endpoint reads and writes ``image``; with ``size`` a missing image is
    created sparse (an existing one must have that size); with neither, the lab
    gives it a fresh image of :data:`DEFAULT_DISK` bytes. ``address`` is the
    PCI address ("DEV.FN"; only with ``count`` 1); None places it after the
    IOMMU and the endpoints before it. ``reconnect_ms`` (vsmmu blk only) makes
    QEMU reconnect to a restarted backend that often (its chardev's
    ``reconnect-ms``); None: the disk dies with the backend.
    """

    kind: str
    image: Path | None = None
    size: int | None = None
    read_only: bool = False
    serial: str = DEFAULT_SERIAL
    count: int = 1
    address: str | None = None
    reconnect_ms: int | None = None


@dataclass(frozen=True)
class Placed:
    """One endpoint device where the lab puts it: its PCI address and description."""

    address: str
    endpoint: Endpoint
    index: int
    """The position in :attr:`Topology.endpoints` of its description."""

    @property
    def endpoint_id(self) -> int:
        """Its IOMMU endpoint ID (PCI requester ID; the StreamID under the vSMMU)."""
        return pci_rid(self.address)


def _default_endpoints() -> tuple[Endpoint, ...]:
    return (Endpoint("blk", size=DEFAULT_DISK), Endpoint("rng"))


@dataclass(frozen=True)
class Topology:
    """A lab's machine; ``Topology()`` is the PV demo's (PV-IOMMU, one blk, one rng).

    ``memory`` is in bytes (a multiple of 1 MiB). ``kernel`` and ``modules``
    (the /lib/modules/VERSION directory that goes with it) replace Debian's
    kernel, as provisioned, and go together. ``kernel_args`` are appended to
    the guest's command line; ``files`` are copied into the guest's image.
    Raises :class:`TopologyError` if any part is not valid.
    """

    iommu: Iommu = field(default_factory=Iommu)
    endpoints: tuple[Endpoint, ...] = field(default_factory=_default_endpoints)
    vcpus: int = 2
    memory: int = 1 << 30
    kernel: Path | None = None
    modules: Path | None = None
    kernel_args: tuple[str, ...] = ()
    files: tuple[ExtraFile, ...] = ()
    load_modules: tuple[str, ...] | None = None
    """The modules the guest loads at boot, by name (with their dependencies, the
    IOMMU's driver first); None: the IOMMU's driver and the endpoints' drivers."""

    def __post_init__(self) -> None:
        _check_topology(self)

    @property
    def iommu_address(self) -> str | None:
        """The IOMMU's PCI address, or None if it is no PCI function (vsmmu, none)."""
        if self.iommu.kind not in IOMMU_DEVICE:
            return None
        return self.iommu.address or IOMMU_ADDR

    def placed(self) -> list[Placed]:
        """Every endpoint device (``count`` expanded) with its PCI address.

        Given addresses are kept; the others take the free device numbers from
        2 up, in order (the demos' layout: blk at 2.0, rng at 3.0).
        """
        taken = {_normal_addr(e.address) for e in self.endpoints if e.address}
        if self.iommu_address:
            taken.add(_normal_addr(self.iommu_address))
        dev = FIRST_ENDPOINT_ADDR
        out = []
        for i, ep in enumerate(self.endpoints):
            for _ in range(ep.count):
                if ep.address:
                    addr = _normal_addr(ep.address)
                else:
                    while f"{dev:x}.0" in taken:
                        dev += 1
                    addr = f"{dev:x}.0"
                    dev += 1
                out.append(Placed(addr, ep, i))
        return out

    def guest_kernel_args(self) -> list[str]:
        """The guest's extra kernel arguments: the IOMMU's options', then the user's."""
        return self.iommu.kernel_args() + list(self.kernel_args)

    @classmethod
    def from_toml(cls, path: str | Path) -> Topology:
        """Reads a topology file; relative paths in it are relative to its directory."""
        path = Path(path)
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise TopologyError("", f"cannot read topology file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise TopologyError("", f"{path} is not valid TOML: {e}") from None
        return cls.from_dict(data, base=path.parent)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path | None = None) -> Topology:
        """A topology from a topology file's content as a dict; relative paths are
        taken relative to ``base`` if given. Keys that are missing take their
        defaults; unknown keys, wrong types and bad values raise TopologyError."""
        return _Reader(base).topology(data)

    def to_dict(self) -> dict[str, Any]:
        """The topology as a topology file's dict (``from_dict`` reads it back equal).

        Keys with their default value are left out, except ``iommu.kind`` and
        the endpoints.
        """
        out: dict[str, Any] = {}
        if self.vcpus != 2:
            out["vcpus"] = self.vcpus
        if self.memory != 1 << 30:
            out["memory"] = format_size(self.memory)
        if self.kernel is not None:
            out["kernel"] = str(self.kernel)
        if self.modules is not None:
            out["modules"] = str(self.modules)
        if self.kernel_args:
            out["kernel-args"] = list(self.kernel_args)
        if self.files:
            out["files"] = [f"{f.src}:{f.dest}" for f in self.files]
        if self.load_modules is not None:
            out["load-modules"] = list(self.load_modules)
        out["iommu"] = _iommu_dict(self.iommu)
        out["endpoints"] = [_endpoint_dict(e) for e in self.endpoints]
        return out


def format_size(size: int) -> str | int:
    """``size`` in bytes as "1G"/"64M"/"512K" when it is a whole number of those, else int."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return size


def _iommu_dict(iommu: Iommu) -> dict[str, Any]:
    default = Iommu(kind=iommu.kind)
    out: dict[str, Any] = {"kind": iommu.kind}
    for key, name in _IOMMU_KEYS.items():
        value = getattr(iommu, name)
        if name == "kind" or value == getattr(default, name):
            continue
        if name == "reserved":
            value = [f"{s:#x}:{e:#x}" for s, e in value]
        elif name in ("input_range", "domain_range"):
            value = f"{value[0]:#x}:{value[1]:#x}"
        elif name == "page_size_mask":
            value = f"{value:#x}"
        out[key] = value
    return out


def _endpoint_dict(ep: Endpoint) -> dict[str, Any]:
    default = Endpoint(ep.kind)
    out: dict[str, Any] = {"kind": ep.kind}
    for key, name in _ENDPOINT_KEYS.items():
        value = getattr(ep, name)
        if name == "kind" or value == getattr(default, name):
            continue
        if name == "image":
            value = str(value)
        elif name == "size":
            value = format_size(value)
        out[key] = value
    return out


_TOP_KEYS = {"vcpus": "vcpus", "memory": "memory", "kernel": "kernel", "modules": "modules",
             "kernel-args": "kernel_args", "files": "files", "iommu": "iommu",
             "endpoints": "endpoints", "load-modules": "load_modules"}
_IOMMU_KEYS = {"kind": "kind", "strict": "strict", "passthrough": "passthrough",
               "bypass": "bypass", "bypass-config": "bypass_config",
               "max-domains": "max_domains", "max-mappings": "max_mappings",
               "reserved": "reserved", "address": "address",
               "page-size-mask": "page_size_mask", "input-range": "input_range",
               "domain-range": "domain_range", "probe-size": "probe_size", "mmio": "mmio",
               "msi-region": "msi_region"}
_ENDPOINT_KEYS = {"kind": "kind", "image": "image", "size": "size", "ro": "read_only",
                  "serial": "serial", "count": "count", "address": "address",
                  "reconnect-ms": "reconnect_ms"}


class _Reader:
    """Turns a topology file's dict into a Topology, checking keys and types."""

    def __init__(self, base: Path | None) -> None:
        self.base = base

    def topology(self, data: dict[str, Any]) -> Topology:
        fields = self._fields(data, "", _TOP_KEYS)
        for name in ("kernel", "modules"):
            if name in fields:
                fields[name] = self._path(fields[name], name)
        if "vcpus" in fields:
            fields["vcpus"] = _typed(fields["vcpus"], "vcpus", int, "an integer")
        if "memory" in fields:
            fields["memory"] = _size(fields["memory"], "memory")
        if "kernel-args" in data:
            fields["kernel_args"] = tuple(
                _typed(a, f"kernel-args[{i}]", str, "a string")
                for i, a in enumerate(_typed(data["kernel-args"], "kernel-args", list,
                                             "a list of strings")))
        if "load-modules" in data:
            fields["load_modules"] = tuple(
                _typed(m, f"load-modules[{i}]", str, "a module name")
                for i, m in enumerate(_typed(data["load-modules"], "load-modules", list,
                                             "a list of module names")))
        if "files" in data:
            fields["files"] = tuple(
                self._file(f, f"files[{i}]")
                for i, f in enumerate(_typed(data["files"], "files", list,
                                             'a list of "SRC[:DEST]" strings')))
        if "iommu" in data:
            fields["iommu"] = self.iommu(_typed(data["iommu"], "iommu", dict, "a table"))
        if "endpoints" in data:
            eps = _typed(data["endpoints"], "endpoints", list, "an array of tables")
            fields["endpoints"] = tuple(
                self.endpoint(_typed(e, f"endpoints[{i}]", dict, "a table"), f"endpoints[{i}]")
                for i, e in enumerate(eps))
        return Topology(**fields)

    def iommu(self, data: dict[str, Any]) -> Iommu:
        fields = self._fields(data, "iommu", _IOMMU_KEYS)
        for name in ("kind", "address"):
            if name in fields:
                fields[name] = _typed(fields[name], f"iommu.{name}", str, "a string")
        for name, key in (("strict", "strict"), ("passthrough", "passthrough"),
                          ("bypass", "bypass"), ("bypass_config", "bypass-config"),
                          ("mmio", "mmio"), ("msi_region", "msi-region")):
            if name in fields:
                fields[name] = _typed(fields[name], f"iommu.{key}", bool, "true or false")
        for name, key in (("max_domains", "max-domains"), ("max_mappings", "max-mappings"),
                          ("probe_size", "probe-size")):
            if name in fields:
                fields[name] = _typed(fields[name], f"iommu.{key}", int, "an integer")
        if "page_size_mask" in fields:
            fields["page_size_mask"] = _wide_int(fields["page_size_mask"],
                                                 "iommu.page-size-mask")
        for name, key in (("input_range", "input-range"), ("domain_range", "domain-range")):
            if name in fields:
                fields[name] = _region(fields[name], f"iommu.{key}")
        if "reserved" in fields:
            regions = _typed(fields["reserved"], "iommu.reserved", list,
                             'a list of "START:END" strings')
            fields["reserved"] = tuple(_region(r, f"iommu.reserved[{i}]")
                                       for i, r in enumerate(regions))
        return Iommu(**fields)

    def endpoint(self, data: dict[str, Any], where: str) -> Endpoint:
        fields = self._fields(data, where, _ENDPOINT_KEYS)
        if "kind" not in fields:
            raise TopologyError(f"{where}.kind", "missing: every endpoint needs a kind "
                                f"({_choices(ENDPOINT_KINDS)})")
        for name in ("kind", "serial", "address"):
            if name in fields:
                fields[name] = _typed(fields[name], f"{where}.{name}", str, "a string")
        if "image" in fields:
            fields["image"] = self._path(fields["image"], f"{where}.image")
        if "size" in fields:
            fields["size"] = _size(fields["size"], f"{where}.size")
        if "read_only" in fields:
            fields["read_only"] = _typed(fields["read_only"], f"{where}.ro", bool,
                                         "true or false")
        for name, key in (("count", "count"), ("reconnect_ms", "reconnect-ms")):
            if name in fields:
                fields[name] = _typed(fields[name], f"{where}.{key}", int, "an integer")
        return Endpoint(**fields)

    def _fields(self, data: dict[str, Any], where: str, known: dict[str, str]) -> dict[str, Any]:
        """``data``'s keys as field names; TopologyError on the first unknown key."""
        for key in data:
            if key not in known:
                raise TopologyError(_join(where, key),
                                    f"unknown key (known: {', '.join(known)})")
        return {known[k]: v for k, v in data.items()}

    def _path(self, value: Any, key: str) -> Path:
        path = Path(_typed(value, key, str, "a path (string)"))
        if not value:
            raise TopologyError(key, "empty path")
        return self.base / path if self.base is not None else path

    def _file(self, value: Any, key: str) -> ExtraFile:
        text = _typed(value, key, str, 'a "SRC[:DEST]" string')
        try:
            extra = ExtraFile.parse(text)
        except ValueError as e:
            raise TopologyError(key, str(e)) from None
        if self.base is not None:
            extra = replace(extra, src=self.base / extra.src)
        return extra


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _choices(values: tuple[str, ...]) -> str:
    return "one of " + ", ".join(f'"{v}"' for v in values)


def _typed(value: Any, key: str, kind: type, what: str) -> Any:
    # TOML booleans are Python bools, and bool is a subclass of int.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TopologyError(key, f"must be {what}, not {_toml_type(value)} {value!r}")
    return value


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


def _size(value: Any, key: str) -> int:
    """A size: bytes (an integer) or a string like "64M" (binary units K, M, G, T)."""
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as e:
            raise TopologyError(key, str(e)) from None
    return int(_typed(value, key, int, 'a number of bytes or a string like "64M"'))


def _wide_int(value: Any, key: str) -> int:
    """An integer that may not fit TOML's 64-bit signed ones: also as a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = _typed(value, key, str, 'an integer or a string such as "0xfffffffffffff000"')
    try:
        return int(text, 0)
    except ValueError:
        raise TopologyError(key, f"{text!r} is not an integer") from None


def _region(value: Any, key: str) -> tuple[int, int]:
    text = _typed(value, key, str, 'a "START:END" string')
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(start, 0), int(end, 0)
    except ValueError:
        raise TopologyError(key, f'{text!r} is not "START:END" (inclusive, e.g. '
                            '"0x8000000:0x80fffff")') from None


def _normal_addr(addr: str) -> str:
    return pci_addr(pci_rid(addr))


def _check_addr(addr: str, key: str) -> str:
    """``addr`` ("DEV.FN") normalized; TopologyError unless it is a usable slot."""
    dev, sep, fn = addr.partition(".")
    try:
        d, f = int(dev, 16), int(fn, 16)
    except ValueError:
        d, f = -1, -1
    if not sep or not 1 <= d <= 0x1F or f != 0:
        raise TopologyError(key, f'{addr!r} is not a PCI address "DEV.0" with DEV 1 to 1f '
                            "(hex; 0 is the host bridge; functions other than 0 are not "
                            "built)")
    return f"{d:x}.0"


def _check_topology(t: Topology) -> None:
    _check_int(t.vcpus, "vcpus", 1, MAX_VCPUS)
    _check_int(t.memory, "memory", MiB, None)
    if t.memory % MiB:
        raise TopologyError("memory", f"{t.memory} is not a whole number of MiB")
    if (t.kernel is None) != (t.modules is None):
        raise TopologyError("modules" if t.modules is None else "kernel",
                            "kernel and modules go together: give both or neither")
    for i, a in enumerate(t.kernel_args):
        if not a.strip():
            raise TopologyError(f"kernel-args[{i}]", "empty argument")
    for i, m in enumerate(t.load_modules or ()):
        if not m or "/" in m or m.endswith(".ko"):
            raise TopologyError(f"load-modules[{i}]", f"{m!r} is not a module name "
                                '(e.g. "virtio_iommu": no path, no .ko)')
    _check_iommu(t.iommu)
    addrs: dict[str, str] = {}
    if t.iommu_address:
        addrs[_check_addr(t.iommu_address, "iommu.address")] = "iommu.address"
    for i, ep in enumerate(t.endpoints):
        where = f"endpoints[{i}]"
        _check_endpoint(ep, where)
        if ep.reconnect_ms is not None and t.iommu.kind != "vsmmu":
            raise TopologyError(f"{where}.reconnect-ms", "only a vsmmu disk reconnects (QEMU "
                                "10.2 reconnects vhost-user-blk-pci alone), not "
                                f'kind = "{t.iommu.kind}"')
        if ep.address:
            addr = _check_addr(ep.address, f"{where}.address")
            if addr in addrs:
                raise TopologyError(f"{where}.address",
                                    f"{addr} is taken by {addrs[addr]}")
            addrs[addr] = f"{where}.address"
    last = t.placed()[-1:] if t.endpoints else []
    if last and pci_rid(last[0].address) >> 3 > 0x1F:
        raise TopologyError("endpoints", "more endpoints than the root bus has slots (31)")


def _check_int(value: int, key: str, low: int, high: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TopologyError(key, f"must be an integer, not {value!r}")
    if value < low or (high is not None and value > high):
        top = f" to {high}" if high is not None else " or more"
        raise TopologyError(key, f"{value} is out of range ({low}{top})")


def _check_iommu(iommu: Iommu) -> None:
    if iommu.kind not in IOMMU_KINDS:
        raise TopologyError("iommu.kind", f"unknown IOMMU {iommu.kind!r} "
                            f"({_choices(IOMMU_KINDS)})")
    default = Iommu(kind=iommu.kind)
    if iommu.kind != "pv":
        for key in PV_ONLY:
            name = _IOMMU_KEYS[key]
            if getattr(iommu, name) != getattr(default, name):
                raise TopologyError(f"iommu.{key}", f'only the PV-IOMMU has it (kind = "pv", '
                                    f'not "{iommu.kind}")')
    if iommu.kind == "none":
        for key in ("strict", "passthrough"):
            if getattr(iommu, key) != getattr(default, key):
                raise TopologyError(f"iommu.{key}", 'means nothing without an IOMMU '
                                    '(kind = "none")')
    if iommu.address is not None and iommu.kind not in IOMMU_DEVICE:
        raise TopologyError("iommu.address", f'the {iommu.kind} IOMMU is no PCI function '
                            f"(only {_choices(IOMMU_DEVICE)} have an address)")
    if iommu.kind != "pv":
        return
    _check_int(iommu.max_domains, "iommu.max-domains", 1, None)
    _check_int(iommu.max_mappings, "iommu.max-mappings", 1, None)
    for i, (start, end) in enumerate(iommu.reserved):
        if not 0 <= start <= end < 1 << 64:
            raise TopologyError(f"iommu.reserved[{i}]", f"{start:#x}:{end:#x} is not "
                                "START <= END in 64 bits")
    try:
        iommu.config()
    except ValueError as e:
        key = next((f"iommu.{k}" for k, word in _CONFIG_WORDS.items() if word in str(e)),
                   "iommu")
        raise TopologyError(key, str(e)) from None


_CONFIG_WORDS = {"reserved": "reserved region", "page-size-mask": "page_size_mask",
                 "input-range": "input", "domain-range": "domain", "probe-size": "probe"}
"""Which key an IommuConfig error is about, by a word of its message."""


def _check_endpoint(ep: Endpoint, where: str) -> None:
    if ep.kind not in ENDPOINT_KINDS:
        raise TopologyError(f"{where}.kind", f"unknown endpoint {ep.kind!r} "
                            f"({_choices(ENDPOINT_KINDS)})")
    _check_int(ep.count, f"{where}.count", 1, 0x1E)
    if ep.address is not None and ep.count != 1:
        raise TopologyError(f"{where}.address", "only an endpoint with count = 1 has an "
                            "address (the others are placed one after the other)")
    if ep.kind != "blk":
        if ep.reconnect_ms is not None:
            raise TopologyError(f"{where}.reconnect-ms", "only a blk endpoint reconnects: "
                                "QEMU 10.2 does not even start a vhost-user-rng-pci whose "
                                "chardev has reconnect-ms")
        default = Endpoint(ep.kind)
        for key in ("image", "size", "ro", "serial"):
            name = _ENDPOINT_KEYS[key]
            if getattr(ep, name) != getattr(default, name):
                raise TopologyError(f"{where}.{key}", f"only a blk endpoint has it, "
                                    f'not "{ep.kind}"')
        return
    if ep.image is not None and ep.count != 1:
        raise TopologyError(f"{where}.image", "endpoints with count > 1 cannot share one "
                            "image: leave it out (each gets a fresh one of size) or list "
                            "them one by one")
    if ep.reconnect_ms is not None:
        _check_int(ep.reconnect_ms, f"{where}.reconnect-ms", 1, None)
    if ep.size is not None:
        _check_int(ep.size, f"{where}.size", 1, None)
        if ep.size % 512:
            raise TopologyError(f"{where}.size", f"{ep.size} is not a multiple of 512 bytes")
    try:
        ident = ep.serial.encode("ascii")
    except UnicodeEncodeError:
        raise TopologyError(f"{where}.serial", f"{ep.serial!r} is not ASCII") from None
    if len(ident) > ID_BYTES:
        raise TopologyError(f"{where}.serial", f"{ep.serial!r} is longer than {ID_BYTES} "
                            "bytes")
