"""What a VMSAv8-64 walk can refuse: the fault kinds, accesses and permissions.

Fault kinds carry the SMMUv3 event numbers (F_TRANSLATION 0x10 ...), so a
fault can be turned into an event record without a table in between.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class FaultKind(IntEnum):
    """Why a walk stopped, named and numbered as the SMMUv3 event records are."""

    F_WALK_EABT = 0x0B  # a descriptor read hit memory the table memory does not back
    F_TRANSLATION = 0x10
    F_ADDR_SIZE = 0x11
    F_ACCESS = 0x12
    F_PERMISSION = 0x13


class Perm(IntFlag):
    """Effective permissions of a translation."""

    NONE = 0
    R = 1
    W = 2
    X = 4


class Access(IntEnum):
    """The access a walk checks; the value is the :class:`Perm` it needs."""

    READ = Perm.R
    WRITE = Perm.W
    EXEC = Perm.X  # an instruction fetch needs X only, as in the Arm ARM


class VmsaFault(Exception):
    """A walk that ended in a fault: its kind, the level it was found at, the stage.

    ``ia`` is the input address of the walk (a VA at stage 1, an IPA at
    stage 2); ``access`` is None for a walk that checked no permission.
    """

    def __init__(self, kind: FaultKind, level: int, stage: int, ia: int,
                 access: Access | None = None, privileged: bool = False) -> None:
        super().__init__(kind, level, stage, ia)
        self.kind = kind
        self.level = level
        self.stage = stage
        self.ia = ia
        self.access = access
        self.privileged = privileged

    def __str__(self) -> str:
        acc = "" if self.access is None else f" on {self.access.name}"
        return (f"stage {self.stage} {self.kind.name} at level {self.level} "
                f"for {self.ia:#x}{acc}")

    def __repr__(self) -> str:
        return (f"VmsaFault({self.kind.name}, level={self.level}, stage={self.stage}, "
                f"ia={self.ia:#x}, access={self.access!r})")
