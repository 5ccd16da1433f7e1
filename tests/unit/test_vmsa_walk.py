"""VMSAv8-64 tables: real descriptor bits, every fault kind, granules, blocks and pages."""

import pytest

from pviommu.vmsa import (
    Access,
    BufferMemory,
    Builder,
    FaultKind,
    Granule,
    Perm,
    PoolAllocator,
    TablePoolExhausted,
    VmsaConfig,
    VmsaFault,
    Walker,
)
from pviommu.vmsa.descriptors import (
    AF,
    AP_RO,
    AP_RO_EL1,
    AP_RW,
    AP_RW_EL1,
    APTABLE_SHIFT,
    PXNTABLE,
    SH_INNER,
    UXNTABLE,
    XN,
    s1_attrs,
    s1_perm_bits,
    s2_attrs,
    s2_perm_bits,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
RWX = Perm.R | Perm.W | Perm.X


def make(cfg, size=1 << 24):
    mem = BufferMemory(size)
    alloc = PoolAllocator.over(mem)
    return Builder(cfg, mem, alloc), mem, alloc


def attrs_for(cfg, **kw):
    return s1_attrs(**kw) if cfg.stage == 1 else s2_attrs(kw.pop("perm", RWX), **kw)


def fault(walker, ia, access=None, **kw) -> VmsaFault:
    with pytest.raises(VmsaFault) as e:
        walker.walk(ia, access, **kw)
    return e.value


def entry_pa(b: Builder, ia: int, level: int) -> int:
    """Address of the descriptor for ``ia`` at ``level``, following table descriptors."""
    table = b.root
    for lv in b.config.levels:
        pa = table + (((ia >> lv.shift) & lv.index_mask) << 3)
        if lv.level == level:
            return pa
        table = b.memory.read_u64(pa) & ((1 << 48) - 1) & ~(b.config.granule.size - 1)
    raise AssertionError(level)


S2_4K = VmsaConfig.stage2(Granule.G4K, 40, 40, sl0=1)
S1_4K = VmsaConfig.stage1(Granule.G4K, 48, 40)
CONFIGS = [VmsaConfig(stage, g, ias, 40) for stage in (1, 2) for g in Granule
           for ias in (40, 48) if not (stage == 2 and g is Granule.G16K and ias == 40)]


def test_descriptors_are_real_little_endian_bits():
    b, mem, _ = make(S2_4K)
    b.map(0x1000, 0x4000_0000, 4 * KiB, s2_attrs(RWX))
    pa = entry_pa(b, 0x1000, 3)
    # Stage-2 page, Normal WB (MemAttr 0b1111), S2AP RW, inner shareable, AF, type 0b11.
    assert bytes(mem.buffer[pa:pa + 8]) == (0x4000_07FF).to_bytes(8, "little")
    b1, mem1, _ = make(S1_4K)
    b1.map(0x2000, 0x5000_0000, 4 * KiB, s1_attrs(ap=AP_RO, attr_indx=1, ng=True, uxn=True))
    pa = entry_pa(b1, 0x2000, 3)
    assert mem1.read_u64(pa) == 0x5000_0000 | (1 << 54) | 0xFC7
    table = mem1.read_u64(entry_pa(b1, 0x2000, 2))
    assert table & 0b11 == 0b11 and table & ~0xFFF == entry_pa(b1, 0x2000, 3) & ~0xFFF


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_each_granule_maps_pages_and_blocks(cfg):
    b, mem, _ = make(cfg, 1 << 25)
    w = b.walker()
    g = cfg.granule.size
    block = 1 << cfg.granule.level_shift(2)
    b.map(3 * g, 7 * g, g, attrs_for(cfg))
    r = w.walk(3 * g + 5, Access.READ)
    assert (r.oa, r.level, r.block_size) == (7 * g + 5, 3, g)
    assert mem.read_u64(entry_pa(b, 3 * g, 3)) & 0b11 == 0b11
    b.map(2 * block, 5 * block, block, attrs_for(cfg))
    r = w.walk(2 * block + g + 9, Access.WRITE)
    assert (r.oa, r.level, r.block_size) == (5 * block + g + 9, 2, block)
    assert mem.read_u64(entry_pa(b, 2 * block, 2)) & 0b11 == 0b01
    assert list(b.mappings()) == [(3 * g, 7 * g, g, 3, attrs_for(cfg)),
                                  (2 * block, 5 * block, block, 2, attrs_for(cfg))]


def test_4k_level1_blocks():
    b, _, _ = make(S2_4K)
    b.map(GiB, 3 * GiB, GiB, s2_attrs(RWX))
    r = b.walker().walk(GiB + 0x1234_5678)
    assert (r.oa, r.level, r.block_size) == (3 * GiB + 0x1234_5678, 1, GiB)


def test_unaligned_output_gives_pages_not_a_block():
    b, _, _ = make(S2_4K)
    b.map(2 * MiB, 8 * MiB + 4 * KiB, 2 * MiB, s2_attrs(RWX))
    leaves = list(b.mappings())
    assert len(leaves) == 512 and {m.level for m in leaves} == {3}


def test_piecewise_map_merges_into_a_block_and_frees_the_table():
    b, _, alloc = make(S2_4K)
    attrs = s2_attrs(Perm.R | Perm.W)
    for off in (MiB, 0, 3 * 256 * KiB, 2 * 256 * KiB):
        b.map(4 * MiB + off, 64 * MiB + off, MiB if off in (0, MiB) else 256 * KiB, attrs)
    assert list(b.mappings()) == [(4 * MiB, 64 * MiB, 2 * MiB, 2, attrs)]
    assert len(alloc.in_use) == 2  # the start tables and one level-2 table


def test_protect_part_of_a_block_splits_it_and_protecting_back_merges():
    b, _, alloc = make(S2_4K)
    w = b.walker()
    b.map(GiB, 0, GiB, s2_attrs(Perm.R | Perm.W))
    b.protect(GiB + 2 * MiB + 8 * KiB, 4 * KiB, s2_perm_bits(Perm.R))
    assert w.walk(GiB + 2 * MiB + 8 * KiB).perms == Perm.R
    assert w.walk(GiB + 2 * MiB + 8 * KiB).level == 3
    assert w.walk(GiB + 2 * MiB + 12 * KiB).perms == Perm.R | Perm.W
    assert w.walk(GiB + 4 * MiB).level == 2
    assert fault(w, GiB + 2 * MiB + 8 * KiB, Access.WRITE).kind is FaultKind.F_PERMISSION
    assert len(list(b.mappings())) == 511 + 512
    b.protect(GiB + 2 * MiB + 8 * KiB, 4 * KiB, s2_perm_bits(Perm.R | Perm.W))
    assert list(b.mappings()) == [(GiB, 0, GiB, 1, s2_attrs(Perm.R | Perm.W))]
    assert list(alloc.in_use) == [b.root]


def test_protect_leaves_holes_unmapped():
    b, _, _ = make(S2_4K)
    b.map(0, 0, 8 * KiB, s2_attrs(RWX))
    b.protect(0, 2 * MiB, s2_perm_bits(Perm.R))
    assert [(m.ia, m.attrs) for m in b.mappings()] == [(0, s2_attrs(Perm.R)),
                                                       (4 * KiB, s2_attrs(Perm.R))]


def test_unmap_part_of_a_block_then_the_rest_frees_every_table():
    b, _, alloc = make(S2_4K)
    w = b.walker()
    b.map(0, 0, GiB, s2_attrs(RWX))
    b.unmap(6 * MiB + 4 * KiB, 4 * KiB)
    f = fault(w, 6 * MiB + 4 * KiB)
    assert (f.kind, f.level, f.stage) == (FaultKind.F_TRANSLATION, 3, 2)
    assert w.walk(6 * MiB).oa == 6 * MiB
    b.unmap(0, 6 * MiB + 4 * KiB)
    b.unmap(6 * MiB + 8 * KiB, GiB - 6 * MiB - 8 * KiB)
    assert list(b.mappings()) == [] and list(alloc.in_use) == [b.root]
    assert fault(w, 6 * MiB).level == 1


def test_map_replaces_an_existing_mapping():
    b, _, _ = make(S2_4K)
    b.map(0, 0, 2 * MiB, s2_attrs(RWX))
    b.map(4 * KiB, 40 * MiB, 4 * KiB, s2_attrs(Perm.R))
    w = b.walker()
    assert w.walk(4 * KiB).oa == 40 * MiB and w.walk(4 * KiB).perms == Perm.R
    assert w.walk(8 * KiB).oa == 8 * KiB


def test_concatenated_start_tables():
    b, mem, _ = make(S2_4K)
    assert S2_4K.concatenated == 2 and S2_4K.start_level == 1
    top = (1 << 40) - 4 * KiB
    b.map(top, 0x1000, 4 * KiB, s2_attrs(RWX))
    b.map((1 << 39) - 4 * KiB, 0x2000, 8 * KiB, s2_attrs(RWX))
    w = b.walker()
    assert w.walk(top).oa == 0x1000
    assert w.walk(1 << 39).oa == 0x3000
    # Entry 511 of the second table, entries 511 and 512 (the first of the second table).
    assert entry_pa(b, top, 1) == b.root + 4096 + 511 * 8
    assert mem.read_u64(b.root + 4096) & 0b11 == 0b11
    assert mem.read_u64(b.root + 511 * 8) & 0b11 == 0b11
    f = fault(w, 1 << 40)
    assert (f.kind, f.level, f.stage) == (FaultKind.F_TRANSLATION, 0, 2)


# Every fault kind.

@pytest.mark.parametrize("cfg", [S1_4K, S2_4K], ids=["s1", "s2"])
def test_translation_fault_at_the_level_of_the_invalid_descriptor(cfg):
    b, _, _ = make(cfg)
    w = b.walker()
    assert fault(w, 0x1000).level == cfg.start_level
    b.map(0, 0, 4 * KiB, attrs_for(cfg))
    assert fault(w, 0x1000).level == 3
    assert fault(w, 2 * MiB).level == 2
    f = fault(w, GiB, Access.WRITE)
    assert (f.kind, f.level, f.stage, f.ia, f.access) == (
        FaultKind.F_TRANSLATION, 1, cfg.stage, GiB, Access.WRITE)


@pytest.mark.parametrize("cfg", [VmsaConfig.stage1(Granule.G4K, 39, 48), S2_4K,
                                 VmsaConfig.stage1(Granule.G64K, 42, 40)], ids=str)
def test_input_address_beyond_the_input_size_is_a_level0_translation_fault(cfg):
    b, _, _ = make(cfg)
    b.map(0, 0, 1 << 29, attrs_for(cfg))
    w = b.walker()
    w.walk((1 << 29) - 1)
    for ia in (1 << cfg.ias, (1 << 64) - 4096, -1):
        f = fault(w, ia, Access.READ)
        assert (f.kind, f.level, f.stage) == (FaultKind.F_TRANSLATION, 0, cfg.stage)


def test_reserved_level3_encoding_is_a_translation_fault():
    b, mem, _ = make(S2_4K)
    b.map(0, 0, 4 * KiB, s2_attrs(RWX))
    pa = entry_pa(b, 0, 3)
    mem.write_u64(pa, mem.read_u64(pa) & ~0b10)
    f = fault(b.walker(), 0)
    assert (f.kind, f.level) == (FaultKind.F_TRANSLATION, 3)


@pytest.mark.parametrize("granule, level", [(Granule.G4K, 0), (Granule.G16K, 1),
                                            (Granule.G64K, 1)])
def test_block_at_a_level_the_granule_forbids_is_a_translation_fault(granule, level):
    cfg = VmsaConfig.stage1(granule, 48, 48)
    b, mem, _ = make(cfg, 1 << 25)
    b.map(0, 0, granule.size, s1_attrs())
    mem.write_u64(entry_pa(b, 0, level), 0 | s1_attrs() | 0b01)
    f = fault(b.walker(), 0x10)
    assert (f.kind, f.level) == (FaultKind.F_TRANSLATION, level)


@pytest.mark.parametrize("cfg_big, cfg_small", [
    (VmsaConfig.stage1(Granule.G4K, 48, 48), VmsaConfig.stage1(Granule.G4K, 48, 40)),
    (VmsaConfig.stage2(Granule.G16K, 40, 42), VmsaConfig.stage2(Granule.G16K, 40, 32)),
], ids=["s1", "s2"])
def test_output_address_beyond_the_output_size_is_an_address_size_fault(cfg_big, cfg_small):
    b, mem, _ = make(cfg_big, 1 << 25)
    g = cfg_big.granule.size
    block = 1 << cfg_big.granule.level_shift(2)
    b.map(0, 1 << cfg_small.oas, g, attrs_for(cfg_big))
    b.map(block, (1 << cfg_small.oas) + block, block, attrs_for(cfg_big))
    b.map(2 * block, (1 << cfg_small.oas) - g, g, attrs_for(cfg_big))
    small = Walker(cfg_small, mem, b.root)
    assert (fault(small, 5).kind, fault(small, 5).level) == (FaultKind.F_ADDR_SIZE, 3)
    assert (fault(small, block).kind, fault(small, block).level) == (FaultKind.F_ADDR_SIZE, 2)
    assert small.walk(2 * block).oa == (1 << cfg_small.oas) - g
    # Bits [49:48] are address bits above any supported output size.
    pa = entry_pa(b, 2 * block, 3)
    mem.write_u64(pa, mem.read_u64(pa) | 1 << 48)
    assert fault(b.walker(), 2 * block).kind is FaultKind.F_ADDR_SIZE


@pytest.mark.parametrize("bit", [40, 47, 49])
def test_table_address_beyond_the_output_size_faults_at_the_table_descriptor_level(bit):
    b, mem, _ = make(VmsaConfig.stage2(Granule.G4K, 40, 40, sl0=1))
    b.map(0, 0, 4 * KiB, s2_attrs(RWX))
    pa = entry_pa(b, 0, 2)
    mem.write_u64(pa, mem.read_u64(pa) | 1 << bit)
    f = fault(b.walker(), 0)
    assert (f.kind, f.level, f.stage) == (FaultKind.F_ADDR_SIZE, 2, 2)


def test_address_size_fault_comes_before_the_access_flag():
    b, mem, _ = make(S2_4K)
    b.map(0, 0, 4 * KiB, s2_attrs(RWX, af=False))
    pa = entry_pa(b, 0, 3)
    mem.write_u64(pa, mem.read_u64(pa) | 1 << 45)
    assert fault(b.walker(), 0).kind is FaultKind.F_ADDR_SIZE


@pytest.mark.parametrize("cfg", [S1_4K, S2_4K], ids=["s1", "s2"])
@pytest.mark.parametrize("size, level", [(4 * KiB, 3), (2 * MiB, 2), (GiB, 1)])
def test_access_flag_fault_at_the_leaf_level(cfg, size, level):
    b, mem, _ = make(cfg)
    b.map(GiB, GiB, size, attrs_for(cfg, af=False))
    w = b.walker()
    for access in (None, Access.READ, Access.WRITE, Access.EXEC):
        f = fault(w, GiB + 8, access)
        assert (f.kind, f.level, f.stage) == (FaultKind.F_ACCESS, level, cfg.stage)


def test_access_flag_fault_comes_before_the_permission_fault():
    b, _, _ = make(S2_4K)
    b.map(0, 0, 4 * KiB, s2_attrs(Perm.NONE, af=False))
    assert fault(b.walker(), 0, Access.WRITE).kind is FaultKind.F_ACCESS


def test_hardware_access_flag_update_sets_af_in_memory():
    cfg = VmsaConfig.stage2(Granule.G4K, 40, 40, ha=True)
    b, mem, _ = make(cfg)
    b.map(0, 0, 4 * KiB, s2_attrs(Perm.R, af=False))
    pa = entry_pa(b, 0, 3)
    assert not mem.read_u64(pa) & AF
    assert b.walker().walk(0, Access.READ).attrs & AF
    assert mem.read_u64(pa) & AF
    assert fault(b.walker(), 0, Access.WRITE).kind is FaultKind.F_PERMISSION


@pytest.mark.parametrize("s2ap", range(4))
@pytest.mark.parametrize("xn", [False, True])
def test_stage2_permissions(s2ap, xn):
    b, mem, _ = make(S2_4K)
    b.map(0, 0, 4 * KiB, s2_attrs(RWX))
    pa = entry_pa(b, 0, 3)
    mem.write_u64(pa, (mem.read_u64(pa) & ~(0b11 << 6 | XN)) | s2ap << 6 | (XN if xn else 0))
    allowed = {Access.READ: s2ap in (1, 3), Access.WRITE: s2ap in (2, 3), Access.EXEC: not xn}
    w = b.walker()
    for access, ok in allowed.items():
        if ok:
            assert w.walk(0, access).oa == 0
        else:
            f = fault(w, 0, access)
            assert (f.kind, f.level, f.stage, f.access) == (
                FaultKind.F_PERMISSION, 3, 2, access)


# Stage 1, EL1&0 regime (Arm ARM, "Data access permissions" and "Execute-never"):
# AP[2:1] -> (EL1 read, EL1 write, EL0 read, EL0 write).
_S1_AP = {AP_RW_EL1: (1, 1, 0, 0), AP_RW: (1, 1, 1, 1), AP_RO_EL1: (1, 0, 0, 0),
          AP_RO: (1, 0, 1, 0)}


@pytest.mark.parametrize("ap", range(4))
@pytest.mark.parametrize("uxn", [False, True])
@pytest.mark.parametrize("pxn", [False, True])
@pytest.mark.parametrize("privileged", [False, True])
def test_stage1_permissions(ap, uxn, pxn, privileged):
    b, _, _ = make(S1_4K)
    b.map(0, 0, 4 * KiB, s1_attrs(ap=ap, uxn=uxn, pxn=pxn))
    el1_r, el1_w, el0_r, el0_w = _S1_AP[ap]
    if privileged:  # memory EL0 can write is never executable at EL1
        allowed = {Access.READ: el1_r, Access.WRITE: el1_w, Access.EXEC: not pxn and not el0_w}
    else:  # EL0 execution depends on UXN alone (execute-only memory)
        allowed = {Access.READ: el0_r, Access.WRITE: el0_w, Access.EXEC: not uxn}
    w = b.walker()
    for access, ok in allowed.items():
        if ok:
            w.walk(0, access, privileged=privileged)
        else:
            f = fault(w, 0, access, privileged=privileged)
            assert (f.kind, f.level, f.stage, f.privileged) == (
                FaultKind.F_PERMISSION, 3, 1, privileged)
    expected = sum(p for a, p in zip(allowed, (Perm.R, Perm.W, Perm.X), strict=True)
                   if allowed[a])
    assert w.walk(0, privileged=privileged).perms == expected


@pytest.mark.parametrize("table_bits, privileged, perms", [
    (1 << APTABLE_SHIFT, False, Perm.X),  # APTable[0]: no EL0 access below
    (1 << APTABLE_SHIFT, True, Perm.R | Perm.W | Perm.X),  # ... and EL1 may now execute
    (2 << APTABLE_SHIFT, False, Perm.R | Perm.X),  # APTable[1]: no write below
    (2 << APTABLE_SHIFT, True, Perm.R | Perm.X),  # read-only at EL1; EL0 no longer writes
    (UXNTABLE, False, Perm.R | Perm.W),
    (PXNTABLE, True, Perm.R | Perm.W),
])
def test_stage1_hierarchical_table_attributes(table_bits, privileged, perms):
    b, mem, _ = make(S1_4K)
    b.map(0, 0, 4 * KiB, s1_attrs(ap=AP_RW))
    pa = entry_pa(b, 0, 1)
    mem.write_u64(pa, mem.read_u64(pa) | table_bits)
    assert b.walker().walk(0, privileged=privileged).perms == perms


def test_stage1_protect_changes_ap_and_xn():
    b, _, _ = make(S1_4K)
    b.map(0, 0, 2 * MiB, s1_attrs(ap=AP_RW, sh=SH_INNER, attr_indx=2))
    b.protect(0, 4 * KiB, s1_perm_bits(ap=AP_RO, uxn=True))
    w = b.walker()
    assert w.walk(0).perms == Perm.R
    assert w.walk(0).attrs == s1_attrs(ap=AP_RO, uxn=True, attr_indx=2)
    assert w.walk(4 * KiB).perms == RWX


def test_walk_external_abort_when_a_table_lies_outside_table_memory():
    b, mem, _ = make(S2_4K)
    b.map(0, 0, 4 * KiB, s2_attrs(RWX))
    mem.write_u64(entry_pa(b, 0, 2), (1 << 30) | 0b11)
    f = fault(b.walker(), 0)
    assert (f.kind, f.level) == (FaultKind.F_WALK_EABT, 3)


def test_fault_text():
    f = VmsaFault(FaultKind.F_PERMISSION, 3, 2, 0x1000, Access.WRITE)
    assert str(f) == "stage 2 F_PERMISSION at level 3 for 0x1000 on WRITE"
    assert FaultKind.F_TRANSLATION == 0x10 and FaultKind.F_PERMISSION == 0x13


# Builder edges.

@pytest.mark.parametrize("call", [
    lambda b: b.map(0x800, 0, 4 * KiB, s2_attrs(RWX)),
    lambda b: b.map(0, 0x800, 4 * KiB, s2_attrs(RWX)),
    lambda b: b.map(0, 0, 0, s2_attrs(RWX)),
    lambda b: b.map((1 << 40) - 4 * KiB, 0, 8 * KiB, s2_attrs(RWX)),
    lambda b: b.map(0, (1 << 40) - 4 * KiB, 8 * KiB, s2_attrs(RWX)),
    lambda b: b.map(0, 0, 4 * KiB, s2_attrs(RWX) | 0x1000),
    lambda b: b.unmap(0, 100),
    lambda b: b.protect(0, 4 * KiB, s2_attrs(RWX)),
])
def test_builder_refuses_bad_requests(call):
    b, _, alloc = make(S2_4K)
    with pytest.raises(ValueError):
        call(b)
    assert list(alloc.in_use) == [b.root]


def test_walker_refuses_a_misaligned_root():
    with pytest.raises(ValueError):
        Walker(S2_4K, BufferMemory(1 << 16), 4096)


def test_pool_exhaustion_leaves_tables_that_still_translate():
    b, _, alloc = make(S2_4K, 6 * 4096)  # two start pages, room for four more tables
    mapped = []
    with pytest.raises(TablePoolExhausted):
        for i in range(8):
            b.map(i * GiB + 4 * KiB, 4 * KiB, 4 * KiB, s2_attrs(RWX))
            mapped.append(i * GiB + 4 * KiB)
    w = b.walker()
    assert [m.ia for m in b.mappings()] == mapped
    for ia in mapped:
        assert w.walk(ia).oa == 4 * KiB
    assert fault(w, len(mapped) * GiB + 4 * KiB).level == 1  # no empty table left linked
    assert len(alloc.in_use) == 1 + 2 * len(mapped)


def test_destroy_frees_every_table():
    b, _, alloc = make(S2_4K)
    b.map(0, 0, 3 * MiB, s2_attrs(RWX))
    b.map(5 * GiB, 0, 4 * KiB, s2_attrs(RWX))
    b.destroy()
    assert alloc.in_use == {}
