"""VMSAv8-64 builder and walker against a reference model (hypothesis).

The model is a dict page -> (output address, attribute bits). After a random
sequence of map / unmap / protect calls:

* the leaves of the tables (read raw, not through the builder) are exactly the
  canonical decomposition of the model: a block wherever the granule allows
  one and a whole aligned region is uniform, else a table; so no block is
  left split and no empty table stays linked;
* every table reached is a table the allocator handed out, reached once, and
  every table handed out is reached (nothing leaks);
* walks agree with the model, faults included: a Translation fault at the
  level of the first empty region at an unmapped address, an Access flag
  fault where AF=0, a Permission fault exactly where the model's
  permissions deny the access.
"""

import bisect
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pviommu.vmsa import (
    Access,
    BufferMemory,
    Builder,
    FaultKind,
    Granule,
    Perm,
    PoolAllocator,
    VmsaConfig,
    VmsaFault,
)
from pviommu.vmsa.descriptors import (
    AP_RO,
    AP_RW,
    AP_RW_EL1,
    S1_PERM_MASK,
    S2_PERM_MASK,
    s1_attrs,
    s1_perm_bits,
    s2_attrs,
    s2_perm_bits,
)

_COMMON = dict(deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("vmsa-dev", max_examples=30, **_COMMON)
settings.register_profile("vmsa-ci", max_examples=200, **_COMMON)
PROFILE = settings.get_profile(os.environ.get(
    "PVIOMMU_HYPOTHESIS_PROFILE", "vmsa-ci" if os.environ.get("CI") else "vmsa-dev"))
# 64 KiB tables hold 8192 entries: a third of the examples keeps the time in line.
PROFILE_64K = settings(PROFILE, max_examples=max(10, PROFILE.max_examples // 3))

MiB, GiB = 1 << 20, 1 << 30
RWX = Perm.R | Perm.W | Perm.X

# (regime, window base, window size): windows straddle a start-level or
# concatenated-table boundary where they can.
CASES = [
    (VmsaConfig.stage2(Granule.G4K, 40, 40, sl0=1), (1 << 39) - 4 * MiB, 8 * MiB),
    (VmsaConfig.stage1(Granule.G4K, 48, 40), GiB - 4 * MiB, 8 * MiB),
    (VmsaConfig.stage1(Granule.G16K, 48, 42), (1 << 47) - 32 * MiB, 64 * MiB),
    (VmsaConfig.stage2(Granule.G16K, 36, 36), 0, 64 * MiB),
]
CASES_64K = [
    (VmsaConfig.stage2(Granule.G64K, 42, 40), GiB, GiB),
    (VmsaConfig.stage1(Granule.G64K, 48, 48), (1 << 42) - 512 * MiB, GiB),
]

S2_ATTRS = [s2_attrs(RWX), s2_attrs(Perm.R | Perm.W), s2_attrs(Perm.R), s2_attrs(Perm.NONE),
            s2_attrs(Perm.R | Perm.W, af=False), s2_attrs(Perm.X, memattr=0b0101)]
S1_ATTRS = [s1_attrs(), s1_attrs(ap=AP_RO), s1_attrs(ap=AP_RW_EL1, uxn=True),
            s1_attrs(af=False), s1_attrs(ap=AP_RO, uxn=True, pxn=True, attr_indx=3)]
S2_PERMS = [s2_perm_bits(Perm(p)) for p in range(8)]
S1_PERMS = [s1_perm_bits(ap=ap, uxn=uxn) for ap in range(4) for uxn in (False, True)]


def ref_perms(stage: int, attrs: int) -> Perm:
    """The architecture's tables, unprivileged at stage 1, written out independently."""
    if stage == 2:
        r, w, x = attrs >> 6 & 1, attrs >> 7 & 1, not attrs >> 54 & 1
    else:
        ap = attrs >> 6 & 3
        r, w, x = ap in (AP_RW, AP_RO), ap == AP_RW, not attrs >> 54 & 1
    return (Perm.R if r else Perm.NONE) | (Perm.W if w else Perm.NONE) | (
        Perm.X if x else Perm.NONE)


@st.composite
def operations(draw, cfg, window):
    g = cfg.granule.size
    block = 1 << cfg.granule.level_shift(2)
    npages, bpages = window // g, block // g
    ops = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["map", "map", "map_pieces", "unmap", "protect"]))
        if draw(st.booleans()):
            first = draw(st.integers(0, npages // bpages - 1)) * bpages
            count = bpages * draw(st.integers(1, npages // bpages - first // bpages))
        else:
            first = draw(st.integers(0, npages - 1))
            count = draw(st.integers(1, min(npages - first, bpages + 3)))
        if kind in ("map", "map_pieces"):
            # OA congruent to IA modulo a block (blocks possible) or shifted by pages.
            delta = draw(st.integers(0, 64)) * block + draw(
                st.sampled_from([0, 0, g, 3 * g]))
            attrs = draw(st.integers(0, len(S2_ATTRS if cfg.stage == 2 else S1_ATTRS) - 1))
            cuts = sorted(draw(st.sets(st.integers(1, count - 1), max_size=3))) \
                if kind == "map_pieces" and count > 1 else []
            bounds = [0, *cuts, count]
            for a, b in zip(bounds, bounds[1:], strict=False):
                ops.append(("map", first + a, b - a, delta, attrs))
        elif kind == "unmap":
            ops.append(("unmap", first, count))
        else:
            ops.append(("protect", first, count,
                        draw(st.integers(0, len(S2_PERMS if cfg.stage == 2 else S1_PERMS) - 1))))
    return ops


def raw_tree(b: Builder, alloc: PoolAllocator):
    """Leaves of the tables read straight from memory; checks every table on the way."""
    cfg, mem = b.config, b.memory
    addr = ((1 << 48) - 1) & ~(cfg.granule.size - 1)
    leaves, seen = [], {b.root}

    def visit(table, depth, base):
        lv = cfg.levels[depth]
        valid = 0
        for i in range(lv.index_mask + 1):
            desc = mem.read_u64(table + 8 * i)
            if not desc & 1:
                continue
            valid += 1
            ia = base + (i << lv.shift)
            if desc & 2 and lv.level < 3:
                child = desc & addr
                assert child not in seen and alloc.in_use.get(child) == cfg.granule.size
                seen.add(child)
                visit(child, depth + 1, ia)
            else:
                assert lv.leaf_ok and desc & 3 == lv.leaf_type
                leaves.append((ia, desc & addr & ~(lv.size - 1), lv.size, lv.level,
                               desc & ~addr & ~3))
        assert valid or depth == 0, "an empty table is still linked"

    visit(b.root, 0, 0)
    assert seen == set(alloc.in_use), "tables leaked"
    return leaves


def canonical(model: dict, cfg: VmsaConfig):
    """The leaves the model's mapping should have, levels chosen as the architecture allows."""
    gs = cfg.granule.value
    out = []

    def rec(depth, pages):
        lv = cfg.levels[depth]
        span = lv.size >> gs
        i = 0
        while i < len(pages):
            region = pages[i] // span
            j = i
            while j < len(pages) and pages[j] // span == region:
                j += 1
            ps = pages[i:j]
            oa0, attrs0 = model[ps[0]]
            if lv.leaf_ok and len(ps) == span and not oa0 % lv.size and all(
                    model[p] == (oa0 + ((p - ps[0]) << gs), attrs0) for p in ps):
                out.append((ps[0] << gs, oa0, lv.size, lv.level, attrs0))
            else:
                rec(depth + 1, ps)
            i = j

    rec(0, sorted(model))
    return out


def apply(ops, b: Builder, model: dict, cfg: VmsaConfig, base: int):
    g = cfg.granule.size
    attrs_list = S2_ATTRS if cfg.stage == 2 else S1_ATTRS
    perms_list = S2_PERMS if cfg.stage == 2 else S1_PERMS
    mask = S2_PERM_MASK if cfg.stage == 2 else S1_PERM_MASK
    first_page = base // g
    for op in ops:
        kind, first, count = op[:3]
        ia = base + first * g
        pages = range(first_page + first, first_page + first + count)
        if kind == "map":
            delta, attrs = op[3], attrs_list[op[4]]
            oa = ia % (1 << 36) + delta
            b.map(ia, oa, count * g, attrs)
            for i, p in enumerate(pages):
                model[p] = (oa + i * g, attrs)
        elif kind == "unmap":
            b.unmap(ia, count * g)
            for p in pages:
                model.pop(p, None)
        else:
            bits = perms_list[op[3]]
            b.protect(ia, count * g, bits)
            for p in pages:
                if p in model:
                    oa, attrs = model[p]
                    model[p] = (oa, (attrs & ~mask) | bits)


def check_walks(b, model, cfg, base, window, ops, leaves):
    g = cfg.granule.size
    w = b.walker()
    pages = sorted(model)
    probes = {base - g, base + window, (1 << cfg.ias) - g, 1 << cfg.ias}
    probes.update(range(base, base + window, max(g, window // 512)))
    for op in ops:
        start = base + op[1] * g
        probes.update((start - g, start, start + (op[2] - 1) * g, start + op[2] * g))
    for ia, _, size, _, _ in leaves:
        probes.update((ia, ia + size - g))
    leaf_starts = [leaf[0] for leaf in leaves]
    for page_ia in sorted(p for p in probes if p >= 0):
        ia = page_ia + (page_ia // g % 37) * 8
        page = page_ia // g
        if ia >> cfg.ias:
            expect_fault(w, ia, FaultKind.F_TRANSLATION, 0, cfg)
        elif page not in model:
            level = next(lv.level for lv in cfg.levels
                         if not region_has_pages(pages, page_ia, lv.size, g))
            expect_fault(w, ia, FaultKind.F_TRANSLATION, level, cfg)
        else:
            oa, attrs = model[page]
            _, _, size, level, _ = leaves[bisect.bisect_right(leaf_starts, page_ia) - 1]
            if not attrs & (1 << 10):
                expect_fault(w, ia, FaultKind.F_ACCESS, level, cfg)
                continue
            r = w.walk(ia)
            assert (r.oa, r.level, r.block_size, r.attrs) == (oa + ia % g, level, size, attrs)
            perms = ref_perms(cfg.stage, attrs)
            assert r.perms == perms
            for access in Access:
                if access & perms:
                    assert w.walk(ia, access).oa == r.oa
                else:
                    expect_fault(w, ia, FaultKind.F_PERMISSION, level, cfg, access)


def region_has_pages(pages, ia, size, g):
    lo = (ia - ia % size) // g
    i = bisect.bisect_left(pages, lo)
    return i < len(pages) and pages[i] < lo + size // g


def expect_fault(w, ia, kind, level, cfg, access=None):
    with pytest.raises(VmsaFault) as e:
        w.walk(ia, access)
    assert (e.value.kind, e.value.level, e.value.stage, e.value.ia) == (
        kind, level, cfg.stage, ia), hex(ia)


def _ids(cases):
    return [f"s{c.stage}-{c.granule.name}-ias{c.ias}" for c, _, _ in cases]


@pytest.mark.parametrize("cfg, base, window", CASES, ids=_ids(CASES))
@PROFILE
@given(data=st.data())
def test_builder_and_walker_agree_with_the_model(cfg, base, window, data):
    run_model(cfg, base, window, data)


@pytest.mark.parametrize("cfg, base, window", CASES_64K, ids=_ids(CASES_64K))
@PROFILE_64K
@given(data=st.data())
def test_builder_and_walker_agree_with_the_model_64k(cfg, base, window, data):
    run_model(cfg, base, window, data)


def run_model(cfg, base, window, data):
    ops = data.draw(operations(cfg, window))
    mem = BufferMemory(1 << 23)
    alloc = PoolAllocator.over(mem)
    b = Builder(cfg, mem, alloc)
    model: dict = {}
    apply(ops, b, model, cfg, base)
    leaves = raw_tree(b, alloc)
    assert leaves == canonical(model, cfg)
    assert [tuple(m) for m in b.mappings()] == leaves
    check_walks(b, model, cfg, base, window, ops, leaves)
    b.unmap(base, window)
    assert raw_tree(b, alloc) == [] and list(alloc.in_use) == [b.root]
