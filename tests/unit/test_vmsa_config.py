"""VMSAv8-64 regimes: level shifts, start levels, concatenated stage-2 tables."""

import pytest

from pviommu.vmsa import Granule, VmsaConfig


def test_level_shifts_and_block_levels():
    assert [Granule.G4K.level_shift(lv) for lv in range(4)] == [39, 30, 21, 12]
    assert [Granule.G16K.level_shift(lv) for lv in range(4)] == [47, 36, 25, 14]
    assert [Granule.G64K.level_shift(lv) for lv in range(1, 4)] == [42, 29, 16]
    assert Granule.G4K.block_levels == {1, 2}
    assert Granule.G16K.block_levels == {2}
    assert Granule.G64K.block_levels == {2}


@pytest.mark.parametrize("granule, ias, start, entries", [
    (Granule.G4K, 48, 0, 512), (Granule.G4K, 39, 1, 512), (Granule.G4K, 32, 1, 4),
    (Granule.G4K, 25, 2, 16),
    (Granule.G16K, 48, 0, 2), (Granule.G16K, 47, 1, 2048), (Granule.G16K, 36, 2, 2048),
    (Granule.G64K, 48, 1, 64), (Granule.G64K, 42, 2, 8192), (Granule.G64K, 25, 3, 512),
])
def test_stage1_start_level_follows_t0sz(granule, ias, start, entries):
    cfg = VmsaConfig.stage1(granule, ias, 48)
    assert (cfg.start_level, cfg.start_entries, cfg.concatenated) == (start, entries, 1)
    assert cfg.t0sz == 64 - ias


@pytest.mark.parametrize("granule, ias, sl0, start, concat", [
    (Granule.G4K, 40, 1, 1, 2), (Granule.G4K, 42, 1, 1, 8), (Granule.G4K, 43, 1, 1, 16),
    (Granule.G4K, 48, 2, 0, 1), (Granule.G4K, 33, 0, 2, 8), (Granule.G4K, 39, 1, 1, 1),
    (Granule.G16K, 40, 1, 2, 16), (Granule.G16K, 48, 2, 1, 2), (Granule.G16K, 36, 1, 2, 1),
    (Granule.G64K, 46, 1, 2, 16), (Granule.G64K, 48, 2, 1, 1), (Granule.G64K, 42, 1, 2, 1),
])
def test_stage2_sl0_and_concatenation(granule, ias, sl0, start, concat):
    cfg = VmsaConfig.stage2(granule, ias, 48, sl0=sl0)
    assert (cfg.start_level, cfg.concatenated) == (start, concat)
    assert cfg.root_size == concat * granule.size


@pytest.mark.parametrize("granule, ias, sl0", [
    (Granule.G4K, 44, 1),  # 32 level-1 tables: more than 16
    (Granule.G4K, 35, 0),  # 16 tables are the limit: 2**14 entries at level 2
    (Granule.G4K, 30, 1),  # a single level-1 entry
    (Granule.G16K, 41, 1),
    (Granule.G64K, 47, 1),
    (Granule.G4K, 40, 3),  # SL0=3 needs FEAT_TTST
])
def test_stage2_start_levels_the_architecture_refuses(granule, ias, sl0):
    with pytest.raises(ValueError):
        VmsaConfig.stage2(granule, ias, 48, sl0=sl0)


@pytest.mark.parametrize("granule, ias, start, concat", [
    (Granule.G4K, 40, 1, 2), (Granule.G4K, 44, 0, 1), (Granule.G4K, 32, 2, 4),
    (Granule.G16K, 40, 2, 16), (Granule.G64K, 48, 1, 1), (Granule.G64K, 44, 2, 4),
])
def test_stage2_auto_start_level_uses_concatenation_to_save_levels(granule, ias, start, concat):
    cfg = VmsaConfig.stage2(granule, ias, 40)
    assert (cfg.start_level, cfg.concatenated) == (start, concat)
    assert VmsaConfig.stage2(granule, ias, 40, sl0=cfg.sl0) == cfg


@pytest.mark.parametrize("kwargs", [
    {"stage": 1, "granule": Granule.G4K, "ias": 49, "oas": 48},
    {"stage": 1, "granule": Granule.G4K, "ias": 24, "oas": 48},
    {"stage": 2, "granule": Granule.G4K, "ias": 40, "oas": 52},
    {"stage": 2, "granule": Granule.G4K, "ias": 40, "oas": 41},
    {"stage": 3, "granule": Granule.G4K, "ias": 40, "oas": 40},
    {"stage": 1, "granule": Granule.G4K, "ias": 40, "oas": 40, "sl0": 1},
])
def test_bad_regimes_are_refused(kwargs):
    with pytest.raises(ValueError):
        VmsaConfig(**kwargs)


def test_ps_encoding():
    assert [VmsaConfig.stage2(Granule.G4K, 32, oas).ps for oas in (32, 36, 40, 42, 44, 48)] \
        == [0, 1, 2, 3, 4, 5]
