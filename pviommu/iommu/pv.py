"""The paravirtual IOMMU's semantics: endpoints, domains, mappings, translation.

This is the virtio-iommu request semantics (virtio spec, IOMMU device) without
the wire format: each operation validates its arguments in the order the spec's
device requirements imply and returns a :class:`Status`. Nothing is changed by
a request that fails.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..events import EndpointAttached, EndpointDetached, EventBus
from .faults import Access, DmaFault, Fault, FaultReason
from .mappings import MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE, Mapping, MappingTree
from .translation import Revoked, TranslationMiss

log = logging.getLogger(__name__)

ATTACH_F_BYPASS = 1
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
ITS_DOORBELL = (0x08090000, 0x0809FFFF)

_NEEDED_FLAGS = tuple((MAP_F_WRITE if a & Access.WRITE else 0)
                      | (MAP_F_READ if a & (Access.READ | Access.EXEC) else 0) for a in range(8))
"""The MAP flags an access needs, by the access's value (no IntFlag work per DMA)."""


class Status(enum.IntEnum):
    """virtio-iommu request status codes."""

    OK = 0
    IOERR = 1
    UNSUPP = 2
    DEVERR = 3
    INVAL = 4
    RANGE = 5
    NOENT = 6
    FAULT = 7
    NOMEM = 8


class ResvType(enum.IntEnum):
    """RESV_MEM subtypes."""

    RESERVED = 0
    MSI = 1


@dataclass(frozen=True)
class ResvRegion:
    """A reserved region ``[start, end]`` (inclusive) that the driver must not map."""

    start: int
    end: int
    subtype: ResvType = ResvType.RESERVED


@dataclass
class IommuConfig:
    """What the device presents: page sizes, ranges, bypass, reserved regions."""

    page_size_mask: int = ~0xFFF & U64_MAX
    input_start: int = 0
    input_end: int = U64_MAX
    domain_start: int = 0
    domain_end: int = U32_MAX
    probe_size: int = 512
    bypass: bool = False
    bypass_config: bool = True
    mmio: bool = False
    msi_doorbell: tuple[int, int] | None = ITS_DOORBELL
    reserved: list[ResvRegion] = field(default_factory=list)
    # Resource limits: the guest is untrusted, so what it can make the
    # backend allocate is bounded; going over answers S_NOMEM.
    max_domains: int = 1 << 16
    max_mappings: int = 1 << 18

    def __post_init__(self) -> None:
        if self.max_domains < 1 or self.max_mappings < 1:
            raise ValueError("max_domains and max_mappings must be at least 1")
        if not 0 < self.page_size_mask <= U64_MAX:
            raise ValueError("page_size_mask needs at least one bit and must fit in 64 bits")
        if not 0 <= self.input_start <= self.input_end <= U64_MAX:
            raise ValueError("input range must be 0 <= start <= end < 2^64")
        if not 0 <= self.domain_start <= self.domain_end <= U32_MAX:
            raise ValueError("domain range must be 0 <= start <= end < 2^32")
        if self.probe_size % 8 or not 0 <= self.probe_size <= U32_MAX:
            raise ValueError("probe_size must be a multiple of 8 that fits in 32 bits")
        regions = self.resv_regions()
        for r in regions:
            if r.start > r.end:
                raise ValueError(f"reserved region {r.start:#x}-{r.end:#x} is empty")
            if r.start < 0 or r.end > U64_MAX:
                raise ValueError(f"reserved region {r.start:#x}-{r.end:#x} is not in 64 bits")
        ordered = sorted(regions, key=lambda r: r.start)
        for a, b in zip(ordered, ordered[1:], strict=False):
            if a.end >= b.start:
                raise ValueError(f"reserved regions {a.start:#x} and {b.start:#x} overlap")
        if 24 * len(regions) > self.probe_size:
            raise ValueError(f"{len(regions)} reserved regions do not fit in probe_size")

    @property
    def granule(self) -> int:
        """The smallest page size."""
        mask = self.page_size_mask & U64_MAX
        return mask & -mask

    def resv_regions(self) -> list[ResvRegion]:
        """Every endpoint's reserved regions: the MSI doorbell, then the user's."""
        out = []
        if self.msi_doorbell is not None:
            out.append(ResvRegion(*self.msi_doorbell, ResvType.MSI))
        return out + list(self.reserved)


@dataclass
class Domain:
    """A domain: its endpoints and, unless it is a bypass domain, its mappings."""

    id: int
    bypass: bool
    endpoints: set[int] = field(default_factory=set)
    mappings: MappingTree = field(default_factory=MappingTree)


@dataclass(frozen=True)
class Negotiated:
    """The feature bits the driver accepted that change request semantics."""

    map_unmap: bool = True
    bypass_config: bool = True
    mmio: bool = False
    domain_range: bool = True
    input_range: bool = True


class PvIommu:
    """Endpoints and domains of one PV-IOMMU: a
    :class:`~pviommu.iommu.translation.Translator` (that never misses) and a
    :class:`~pviommu.iommu.translation.Revocable`.

    ``endpoints`` lists the endpoint IDs that exist (ATTACH of another gets
    NOENT); None means every ID exists. ``events`` hears
    :class:`~pviommu.events.EndpointAttached` and
    :class:`~pviommu.events.EndpointDetached`.
    """

    def __init__(self, config: IommuConfig | None = None,
                 endpoints: Iterable[int] | None = None,
                 events: EventBus | None = None) -> None:
        self.config = config or IommuConfig()
        self.known = None if endpoints is None else set(endpoints)
        self.events = events if events is not None else EventBus()
        self.attached: dict[int, int] = {}  # endpoint ID -> domain ID
        self.domains: dict[int, Domain] = {}
        self.negotiated = Negotiated(mmio=self.config.mmio,
                                     bypass_config=self.config.bypass_config)
        self._bypass = self.config.bypass
        self.mapping_count = 0
        self.resv = self.config.resv_regions()  # MAP checks them on every request
        # Changes whenever a translation may have gone (UNMAP, DETACH, ATTACH
        # elsewhere, revocation, reset, a bypass change): cached ones are then stale.
        self.generation = 0

    @property
    def bypass(self) -> bool:
        """Whether unattached endpoints bypass translation (the config's ``bypass``)."""
        return self._bypass

    @bypass.setter
    def bypass(self, value: bool) -> None:
        if value != self._bypass:
            self._bypass = value
            self.generation += 1

    # -- lifecycle --------------------------------------------------------------

    def reset(self, system: bool = False) -> None:
        """Device reset: no domain, no attachment. A system reset also restores bypass."""
        self.generation += 1
        for endpoint in list(self.attached):
            self._detach(endpoint)
        self.domains.clear()
        self.mapping_count = 0
        if system:
            self.bypass = self.config.bypass

    def endpoint_exists(self, endpoint: int) -> bool:
        """Whether ``endpoint`` is an endpoint of this IOMMU."""
        return self.known is None or endpoint in self.known

    def _domain_in_range(self, domain: int) -> bool:
        if not self.negotiated.domain_range:
            return True
        return self.config.domain_start <= domain <= self.config.domain_end

    def _mapped_domain(self, domain: int) -> Domain | Status:
        """The domain a MAP or UNMAP names, or the status that refuses it."""
        if not self._domain_in_range(domain):
            return Status.RANGE
        dom = self.domains.get(domain)
        if dom is None:
            return Status.NOENT
        if dom.bypass:
            return Status.INVAL
        return dom

    # -- requests ---------------------------------------------------------------

    def attach(self, domain: int, endpoint: int, flags: int, reserved_zero: bool = True
               ) -> Status:
        """ATTACH ``endpoint`` to ``domain`` (created if new)."""
        allowed = ATTACH_F_BYPASS if self.negotiated.bypass_config else 0
        if not reserved_zero or flags & ~allowed:
            return Status.INVAL
        if not self._domain_in_range(domain):
            return Status.RANGE
        if not self.endpoint_exists(endpoint):
            return Status.NOENT
        bypass = bool(flags & ATTACH_F_BYPASS)
        dom = self.domains.get(domain)
        if dom is not None and dom.bypass != bypass:
            return Status.INVAL
        if self.attached.get(endpoint) == domain:
            return Status.OK
        if dom is None and len(self.domains) >= self.config.max_domains:
            log.warning("ATTACH: %d domains already exist; domain %d refused",
                        len(self.domains), domain)
            return Status.NOMEM
        if endpoint in self.attached:
            self._detach(endpoint)
        self.generation += 1
        if dom is None:
            dom = self.domains[domain] = Domain(domain, bypass)
        dom.endpoints.add(endpoint)
        self.attached[endpoint] = domain
        log.info("endpoint %#x attached to domain %d%s", endpoint, domain,
                 " (bypass)" if bypass else "")
        self.events.publish(EndpointAttached(domain, endpoint))
        return Status.OK

    def detach(self, domain: int, endpoint: int) -> Status:
        """DETACH ``endpoint`` from ``domain``."""
        if not self.endpoint_exists(endpoint):
            return Status.NOENT
        if not self._domain_in_range(domain):
            return Status.RANGE
        if self.attached.get(endpoint) != domain:
            return Status.INVAL
        self._detach(endpoint)
        return Status.OK

    def _detach(self, endpoint: int) -> None:
        self.generation += 1
        domain = self.attached.pop(endpoint)
        dom = self.domains[domain]
        dom.endpoints.discard(endpoint)
        if not dom.endpoints:
            # A domain without endpoints ceases to exist, mappings included.
            self.mapping_count -= len(dom.mappings)
            del self.domains[domain]
        log.info("endpoint %#x detached from domain %d", endpoint, domain)
        self.events.publish(EndpointDetached(domain, endpoint))

    def map(self, domain: int, virt_start: int, virt_end: int, phys_start: int,
            flags: int) -> Status:
        """MAP ``[virt_start, virt_end]`` to ``phys_start`` in ``domain``."""
        negotiated, config = self.negotiated, self.config
        if not negotiated.map_unmap:
            return Status.UNSUPP
        allowed = MAP_F_READ | MAP_F_WRITE | (MAP_F_MMIO if negotiated.mmio else 0)
        if flags & ~allowed:
            return Status.INVAL
        dom = self._mapped_domain(domain)
        if isinstance(dom, Status):
            return dom
        mask = config.page_size_mask & U64_MAX
        g = mask & -mask  # the granule
        if virt_start % g or phys_start % g or (virt_end + 1) % g:
            return Status.RANGE
        if virt_end < virt_start:
            return Status.INVAL
        if (negotiated.input_range
                and not config.input_start <= virt_start <= virt_end <= config.input_end):
            return Status.RANGE
        if phys_start + (virt_end - virt_start) > U64_MAX:
            return Status.RANGE
        slot = dom.mappings.slot(virt_start, virt_end)
        if slot is None:
            return Status.INVAL
        for r in self.resv:
            if r.start <= virt_end and virt_start <= r.end:
                return Status.INVAL
        if self.mapping_count >= config.max_mappings:
            log.warning("MAP: the limit of %d mappings is reached", config.max_mappings)
            return Status.NOMEM
        dom.mappings.insert(slot, Mapping(virt_start, virt_end, phys_start, flags))
        self.mapping_count += 1
        return Status.OK

    def unmap(self, domain: int, virt_start: int, virt_end: int) -> Status:
        """UNMAP every mapping inside ``[virt_start, virt_end]``; none if one would split."""
        if not self.negotiated.map_unmap:
            return Status.UNSUPP
        dom = self._mapped_domain(domain)
        if isinstance(dom, Status):
            return dom
        if virt_end < virt_start:
            return Status.INVAL
        removed = dom.mappings.remove_range(virt_start, virt_end)
        if removed is None:
            return Status.RANGE
        if removed:
            self.generation += 1
        self.mapping_count -= len(removed)
        return Status.OK

    def probe(self, endpoint: int) -> tuple[Status, list[ResvRegion]]:
        """PROBE: the endpoint's reserved regions."""
        if not self.endpoint_exists(endpoint):
            return Status.NOENT, []
        return Status.OK, self.resv

    # -- host-side revocation ------------------------------------------------------

    def revoke(self, endpoint: int, iova: int) -> Revoked | None:
        """Takes away, behind the guest's back, the mapping that holds ``iova`` in
        ``endpoint``'s domain; returns it (None if there is none). Announcing it is
        :class:`~pviommu.iommu.revocation.Revocations`' job."""
        domain = self.attached.get(endpoint)
        dom = self.domains.get(domain) if domain is not None else None
        if dom is None or dom.bypass:
            return None
        m = dom.mappings.find(iova)
        if m is None:
            return None
        dom.mappings.remove_range(m.virt_start, m.virt_end)
        self.mapping_count -= 1
        self.generation += 1
        log.warning("revoked mapping %#x-%#x -> %#x of domain %d (endpoint %#x)",
                    m.virt_start, m.virt_end, m.phys_start, dom.id, endpoint)
        return Revoked(endpoint, dom.id, m.virt_start, m.virt_end, m.phys_start)

    # -- translation --------------------------------------------------------------

    def translate(self, endpoint: int, iova: int, length: int, access: Access
                  ) -> list[tuple[int, int]]:
        """The guest-physical pieces of ``[iova, iova+length)`` as seen by ``endpoint``.

        Raises :class:`DmaFault` with the virtio-iommu reason if any byte fails.
        """
        if not self.endpoint_exists(endpoint):
            raise DmaFault(Fault(endpoint, iova, access, FaultReason.UNKNOWN))
        domain = self.attached.get(endpoint)
        if domain is None:
            # Bypass mode needs BYPASS_CONFIG *offered*, not negotiated (spec 1.3).
            if self.bypass and self.config.bypass_config:
                return [(iova, length)]
            raise DmaFault(Fault(endpoint, iova, access, FaultReason.DOMAIN))
        dom = self.domains[domain]
        if dom.bypass:
            return [(iova, length)]
        need = _NEEDED_FLAGS[access]
        out: list[tuple[int, int]] = []
        addr, end = iova, iova + length
        while addr < end:
            m = dom.mappings.find(addr)
            if m is None or m.flags & need != need:
                raise DmaFault(Fault(endpoint, addr, access, FaultReason.MAPPING))
            n = min(end, m.virt_end + 1) - addr
            out.append((m.translate(addr), n))
            addr += n
        return out

    async def fill(self, miss: TranslationMiss) -> None:
        """Nothing to fetch: every translation is at hand, so :meth:`translate` never
        misses."""
