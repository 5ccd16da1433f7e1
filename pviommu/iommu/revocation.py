"""Host-side revocation for every translation mode: now, or armed for the next DMA.

Works over any :class:`~pviommu.iommu.translation.Revocable`; each revocation
is published as :class:`~pviommu.events.MappingRevoked`. An armed revocation
waits for the endpoint's next DMA of at least ``min_length`` bytes, so it picks
the data buffer of a request in flight: the DMA space calls
:meth:`Revocations.before_dma` before translating a DMA (never for a lookup
such as caching a ring's view).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..events import EventBus, MappingRevoked
from .faults import Access
from .translation import Revocable, Revoked


@dataclass(frozen=True)
class ArmedRevocation:
    """Revoke the mapping under ``endpoint``'s next DMA of at least ``min_length`` bytes
    (of kind ``access``, if given)."""

    endpoint: int
    min_length: int = 512
    access: Access | None = None

    def matches(self, length: int, access: Access) -> bool:
        """Whether an access of ``length`` bytes and kind ``access`` triggers it."""
        return length >= self.min_length and (self.access is None or bool(self.access & access))


class Revocations:
    """Revocations of one translator's mappings, announced on ``events``."""

    def __init__(self, target: Revocable, events: EventBus) -> None:
        self.target = target
        self.events = events
        self.armed: dict[int, ArmedRevocation] = {}

    def revoke(self, endpoint: int, iova: int) -> Revoked | None:
        """Takes away now the mapping through which ``endpoint`` reaches ``iova``."""
        revoked = self.target.revoke(endpoint, iova)
        if revoked is not None:
            self.events.publish(MappingRevoked(revoked))
        return revoked

    def arm(self, armed: ArmedRevocation) -> None:
        """The next matching DMA of ``armed.endpoint`` loses its mapping, then faults
        (replaces one armed before for that endpoint)."""
        self.armed[armed.endpoint] = armed

    def before_dma(self, endpoint: int, iova: int, length: int, access: Access) -> None:
        """A DMA of ``length`` bytes at ``iova`` is about to be translated: fires the
        armed revocation it matches. One that finds no mapping at ``iova`` (the
        endpoint is unattached, bypasses, or the address is unmapped) stays armed."""
        armed = self.armed.get(endpoint)
        if armed is not None and armed.matches(length, access) and self.revoke(endpoint, iova):
            del self.armed[endpoint]
