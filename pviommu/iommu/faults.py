"""What a DMA access is and why its translation failed, for every translation mode.

One vocabulary for all layers: a translator raises :class:`DmaFault` carrying a
:class:`Fault` record; the DMA space reports that same record; the virtio-iommu
event queue and QMP encode it. Nothing is turned into a string and back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Access(enum.IntFlag):
    """The kind of DMA access (the values are virtio-iommu's fault flags)."""

    READ = 1
    WRITE = 2
    EXEC = 4


class FaultReason(enum.StrEnum):
    """Why a translation failed; each value is its name.

    The PV-IOMMU's reasons are those of virtio-iommu fault records; the
    ``F_*`` ones are the SMMUv3 event types a nested (stage 1 + stage 2)
    translation reports, with the :class:`Stage` that refused the access.
    """

    UNKNOWN = "UNKNOWN"
    """The endpoint is not one of the IOMMU's."""
    DOMAIN = "DOMAIN"
    """The endpoint is in no domain and does not bypass."""
    MAPPING = "MAPPING"
    """No mapping with the needed permission holds the address."""
    F_TRANSLATION = "F_TRANSLATION"
    F_ADDR_SIZE = "F_ADDR_SIZE"
    F_ACCESS = "F_ACCESS"
    F_PERMISSION = "F_PERMISSION"


class Stage(enum.IntEnum):
    """The translation stage that faulted (nested translation only)."""

    S1 = 1
    S2 = 2


@dataclass(frozen=True)
class Fault:
    """A failed translation: which endpoint, where, what access, why, at which stage."""

    endpoint: int
    address: int
    access: Access
    reason: FaultReason
    stage: Stage | None = None

    def __str__(self) -> str:
        stage = f" at stage {int(self.stage)}" if self.stage is not None else ""
        return (f"{self.reason} fault endpoint {self.endpoint:#x} at {self.address:#x} "
                f"({self.access.name}){stage}")


class DmaFault(Exception):
    """A translation failed; ``fault`` says how."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(str(fault))
        self.fault = fault

    @property
    def endpoint(self) -> int:
        """The endpoint whose access faulted."""
        return self.fault.endpoint

    @property
    def address(self) -> int:
        """The first address that did not translate."""
        return self.fault.address

    @property
    def access(self) -> Access:
        """The kind of access that faulted."""
        return self.fault.access

    @property
    def reason(self) -> FaultReason:
        """Why it faulted."""
        return self.fault.reason

    @property
    def stage(self) -> Stage | None:
        """The stage that faulted (nested translation), else None."""
        return self.fault.stage
