"""A translation regime's shape: stage, granule, address sizes, start level.

Everything a walk needs per level (shift, index mask, whether a leaf may sit
there) is computed once here, so the walker's loop does no arithmetic on the
configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Granule(IntEnum):
    """Translation granule; the value is its shift (log2 of the size)."""

    G4K = 12
    G16K = 14
    G64K = 16

    @property
    def size(self) -> int:
        return 1 << self.value

    @property
    def stride(self) -> int:
        """Address bits resolved per level: log2(entries in one table)."""
        return self.value - 3

    def level_shift(self, level: int) -> int:
        """The input-address bit a level's index starts at."""
        return self.value + (3 - level) * self.stride

    @property
    def block_levels(self) -> frozenset[int]:
        """Levels below 3 that may hold block descriptors (48-bit OA, no FEAT_LPA)."""
        return _BLOCK_LEVELS[self]


_BLOCK_LEVELS = {
    Granule.G4K: frozenset({1, 2}),  # 1 GiB, 2 MiB (a level-0 block needs FEAT_LPA2)
    Granule.G16K: frozenset({2}),  # 32 MiB (a level-1 block needs FEAT_LPA2)
    Granule.G64K: frozenset({2}),  # 512 MiB (a level-1 block needs FEAT_LPA)
}

# TCR.IPS / VTCR.PS / SMMU OAS encodings this library supports (52 left out).
PS_BITS = {0b000: 32, 0b001: 36, 0b010: 40, 0b011: 42, 0b100: 44, 0b101: 48}
OA_SIZES = tuple(PS_BITS.values())
# T0SZ 16..39, the range every implementation supports (FEAT_TTST left out).
MIN_IAS = 25
MAX_IAS = 48


@dataclass(frozen=True)
class LevelInfo:
    """One level of a walk."""

    level: int
    shift: int  # of the input address bits this level indexes
    index_mask: int  # entries in this level's table (all concatenated tables) - 1
    leaf_ok: bool  # a block (levels 0-2) or page (level 3) descriptor may sit here
    leaf_type: int  # TYPE_BLOCK or TYPE_PAGE

    @property
    def size(self) -> int:
        """Bytes of input address one entry covers."""
        return 1 << self.shift


@dataclass(frozen=True)
class VmsaConfig:
    """A stage-1 (TCR.T0SZ/TG0/IPS) or stage-2 (VTCR.T0SZ/SL0/TG0/PS) regime.

    ``ias`` is the input address size (64 - T0SZ), ``oas`` the output
    address size (IPS/PS). Stage 1 starts at the level T0SZ implies. Stage 2
    starts where ``sl0`` (VTCR_EL2.SL0) says, with up to 16 concatenated
    tables at that level; ``sl0=None`` picks the deepest start level the
    architecture allows (the fewest levels, as Linux does). ``ha`` models
    hardware Access flag update: an AF=0 leaf is set to AF=1 in memory
    instead of faulting. Only the lower VA range (TTB0) exists at stage 1.
    """

    stage: int
    granule: Granule
    ias: int
    oas: int
    sl0: int | None = None
    ha: bool = False
    start_level: int = field(init=False)
    levels: tuple[LevelInfo, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        g = Granule(self.granule)
        object.__setattr__(self, "granule", g)
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, not {self.stage}")
        if not MIN_IAS <= self.ias <= MAX_IAS:
            raise ValueError(f"input address size {self.ias} is outside {MIN_IAS}..{MAX_IAS}")
        if self.oas not in OA_SIZES:
            raise ValueError(f"output address size {self.oas} is not one of {OA_SIZES}")
        if self.stage == 1:
            if self.sl0 is not None:
                raise ValueError("SL0 is a stage-2 field")
            nlevels = -(-(self.ias - g.value) // g.stride)
            start = 4 - nlevels
        elif self.sl0 is None:
            start = next(lvl for lvl in range(_deepest_s2_start(g), _deepest_s2_start(g) - 3, -1)
                         if _s2_start_bits(g, self.ias, lvl) <= g.stride + 4)
            object.__setattr__(self, "sl0", _sl0_for(g, start))
        else:
            start = _s2_start_level(g, self.sl0)
            bits = _s2_start_bits(g, self.ias, start)
            if not 1 <= bits <= g.stride + 4:
                raise ValueError(
                    f"SL0={self.sl0} (start level {start}) with a {self.ias}-bit IPA needs "
                    f"2**{bits} start entries: the architecture allows 2 to 16 tables' worth")
        object.__setattr__(self, "start_level", start)
        levels = []
        for lvl in range(start, 4):
            shift = g.level_shift(lvl)
            bits = self.ias - shift if lvl == start else g.stride
            levels.append(LevelInfo(lvl, shift, (1 << bits) - 1,
                                    lvl == 3 or lvl in g.block_levels,
                                    0b11 if lvl == 3 else 0b01))
        object.__setattr__(self, "levels", tuple(levels))

    @classmethod
    def stage1(cls, granule: Granule, ias: int, oas: int, *, ha: bool = False) -> VmsaConfig:
        return cls(1, granule, ias, oas, ha=ha)

    @classmethod
    def stage2(cls, granule: Granule, ias: int, oas: int, *, sl0: int | None = None,
               ha: bool = False) -> VmsaConfig:
        return cls(2, granule, ias, oas, sl0=sl0, ha=ha)

    @property
    def t0sz(self) -> int:
        return 64 - self.ias

    @property
    def ps(self) -> int:
        """The IPS/PS encoding of ``oas``."""
        return next(k for k, v in PS_BITS.items() if v == self.oas)

    @property
    def start_entries(self) -> int:
        return self.levels[0].index_mask + 1

    @property
    def concatenated(self) -> int:
        """Number of concatenated tables at the start level (1 if none)."""
        return max(1, self.start_entries >> self.granule.stride)

    @property
    def root_size(self) -> int:
        """Bytes of the start-level table(s), the alignment TTB/VTTBR needs."""
        return max(self.granule.size, self.start_entries * 8)


def _deepest_s2_start(g: Granule) -> int:
    return 2 if g is Granule.G4K else 3


def _s2_start_level(g: Granule, sl0: int) -> int:
    # SL0=3 (level 3 with 4K, FEAT_TTST; level 0 with 16K, FEAT_LPA2) is left out.
    if sl0 not in (0, 1, 2):
        raise ValueError(f"SL0={sl0} is reserved here (only 0, 1, 2 are supported)")
    return _deepest_s2_start(g) - sl0


def _sl0_for(g: Granule, start: int) -> int:
    return _deepest_s2_start(g) - start


def _s2_start_bits(g: Granule, ias: int, start: int) -> int:
    return ias - g.level_shift(start)
