"""The translation seam: what every IOMMU mode offers the DMA spaces and revocation.

A mode (the PV-IOMMU's domains, a nested stage-1 + stage-2 path, a shadow of
another IOMMU's tables) implements :class:`Translator`; the one DMA space
(:class:`~pviommu.iommu.dma_space.TranslatedDma`) and everything above it
(virtqueues, device models, transports) stay as they are. A mode that can take
a mapping away behind the guest's back also implements :class:`Revocable`, and
:class:`~pviommu.iommu.revocation.Revocations` does the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .faults import Access, Fault


class TranslationMiss(Exception):
    """The translation of ``iova`` for ``endpoint`` and ``access`` is not at hand and
    must be fetched asynchronously (:meth:`Translator.fill`).

    Nothing was changed by the access that raised it: a caller in an async
    context awaits the fill and runs the access again. It is not a fault (not
    in ``DMA_ERRORS``); code that cannot wait lets it propagate.

    ``length`` is how much of the access lies from ``iova`` on, and ``also``
    further ``(iova, length, access)`` ranges the same request needs (see
    :meth:`widened`): a fill may fetch them all at once, so that the retry does
    not miss page after page. Only ``iova`` for ``access`` must be filled.
    """

    def __init__(self, endpoint: int, iova: int, access: Access, length: int = 1,
                 also: tuple[tuple[int, int, Access], ...] = ()) -> None:
        super().__init__(endpoint, iova, access)
        self.endpoint = endpoint
        self.iova = iova
        self.access = access
        self.length = length
        self.also = also

    def __str__(self) -> str:  # formatted only when shown: raising it stays cheap
        return (f"translation miss endpoint {self.endpoint:#x} at {self.iova:#x} "
                f"({Access(self.access).name})")

    def widened(self, also: list[tuple[int, int, Access]]) -> TranslationMiss:
        """This miss, with ``also`` the further ranges its request needs."""
        return TranslationMiss(self.endpoint, self.iova, self.access, self.length,
                               self.also + tuple(also))


class Translator(Protocol):
    """An IOMMU mode as the DMA spaces see it.

    ``generation`` is the epoch of cached views: it changes whenever a
    translation given out before may no longer hold (an unmap, a detach, an
    invalidation, a revocation, a reset); adding translations need not change it.
    """

    @property
    def generation(self) -> int:
        """The epoch of cached views (read only: the mode alone moves it)."""
        ...

    def translate(self, endpoint: int, iova: int, length: int, access: Access
                  ) -> list[tuple[int, int]]:
        """The guest-physical ``(address, length)`` pieces of ``[iova, iova+length)``
        as ``endpoint`` sees it, for ``access``.

        Raises, for the first byte that does not translate,
        :class:`~pviommu.iommu.faults.DmaFault` (it faults) or
        :class:`TranslationMiss` (its translation is not at hand). Changes
        nothing that a retry would see differently.
        """
        ...

    async def fill(self, miss: TranslationMiss) -> Sequence[Fault] | None:
        """Fetches the translation ``miss`` lacks; afterwards the same access does not
        miss again unless the translation was invalidated meanwhile. Raises
        :class:`~pviommu.iommu.faults.DmaFault` when there is none to fetch (a guest
        stage-1 fault, say).

        A mode may fetch the rest of the miss's ranges (``length``, ``also``) too;
        it returns the faults it found there (each at the address where the
        retry will miss, for that access), which the DMA space raises when the
        same task meets them instead of asking again."""
        ...


@dataclass(frozen=True)
class Revoked:
    """A range taken away from ``endpoint`` behind the guest's back: I/O virtual
    ``[virt_start, virt_end]`` (inclusive) that translated to ``phys_start`` in
    ``domain`` (the translation context it was removed from)."""

    endpoint: int
    domain: int
    virt_start: int
    virt_end: int
    phys_start: int

    @property
    def size(self) -> int:
        """The length of the range in bytes."""
        return self.virt_end - self.virt_start + 1


class Revocable(Protocol):
    """A mode whose mappings the host can take away."""

    def revoke(self, endpoint: int, iova: int) -> Revoked | None:
        """Removes, behind the guest's back, the mapping through which ``endpoint``
        reaches ``iova`` (and whatever cached it; ``generation`` changes); returns what
        went, or None if nothing maps ``iova``."""
        ...
