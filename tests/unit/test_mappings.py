"""MappingTree: non-overlapping IOVA mappings of one domain, looked up in O(log n)."""

from __future__ import annotations

import pytest

from pviommu.iommu.mappings import MAP_F_READ, MAP_F_WRITE, Mapping, MappingTree

RW = MAP_F_READ | MAP_F_WRITE


def _tree(*ranges: tuple[int, int]) -> MappingTree:
    t = MappingTree()
    for s, e in ranges:
        t.add(Mapping(s, e, 0x1000_0000 + s, RW))
    return t


def _ranges(maps) -> list[tuple[int, int]]:
    return [(m.virt_start, m.virt_end) for m in maps]


def test_mapping_translate_and_size():
    m = Mapping(0x1000, 0x2FFF, 0x8000_0000, MAP_F_READ)
    assert m.size == 0x2000
    assert m.translate(0x1000) == 0x8000_0000
    assert m.translate(0x2FFF) == 0x8000_1FFF


def test_find():
    t = _tree((0x1000, 0x1FFF), (0x3000, 0x3FFF), (0x4000, 0x4000))
    assert t.find(0xFFF) is None
    assert t.find(0x1000).virt_start == 0x1000
    assert t.find(0x1FFF).virt_start == 0x1000
    assert t.find(0x2000) is None
    assert t.find(0x2FFF) is None
    assert t.find(0x3ABC).virt_start == 0x3000
    assert t.find(0x4000).virt_end == 0x4000
    assert t.find(0x4001) is None
    assert MappingTree().find(0) is None


def test_add_keeps_order_whatever_the_insertion_order():
    t = _tree((0x5000, 0x5FFF), (0x1000, 0x1FFF), (0x3000, 0x3FFF), (0, 0xFFF))
    assert _ranges(t) == [(0, 0xFFF), (0x1000, 0x1FFF), (0x3000, 0x3FFF), (0x5000, 0x5FFF)]
    assert len(t) == 4


@pytest.mark.parametrize(("s", "e"), [
    (0x1000, 0x1FFF),   # identical
    (0x0, 0x1000),      # ends on the first byte
    (0x1FFF, 0x2FFF),   # starts on the last byte
    (0x1800, 0x18FF),   # inside
    (0x0, 0xFFFF),      # covers everything
    (0x2FFF, 0x3000),   # touches both neighbours' ends
])
def test_add_refuses_any_overlap(s, e):
    t = _tree((0x1000, 0x1FFF), (0x3000, 0x3FFF))
    with pytest.raises(ValueError, match="overlaps"):
        t.add(Mapping(s, e, 0, RW))
    assert _ranges(t) == [(0x1000, 0x1FFF), (0x3000, 0x3FFF)]


def test_add_adjacent_mappings():
    t = _tree((0x1000, 0x1FFF), (0x3000, 0x3FFF))
    t.add(Mapping(0x2000, 0x2FFF, 0, RW))
    t.add(Mapping(0xFFF, 0xFFF, 0, RW))
    assert _ranges(t) == [(0xFFF, 0xFFF), (0x1000, 0x1FFF), (0x2000, 0x2FFF), (0x3000, 0x3FFF)]


def test_overlapping_and_overlaps():
    t = _tree((0, 4), (5, 9), (20, 29))
    assert _ranges(t.overlapping(0, 4)) == [(0, 4)]
    assert _ranges(t.overlapping(4, 5)) == [(0, 4), (5, 9)]
    assert _ranges(t.overlapping(3, 25)) == [(0, 4), (5, 9), (20, 29)]
    assert _ranges(t.overlapping(10, 19)) == []
    assert _ranges(t.overlapping(9, 20)) == [(5, 9), (20, 29)]
    assert _ranges(t.overlapping(30, 1 << 64)) == []
    assert t.overlaps(29, 29) and t.overlaps(0, 0)
    assert not t.overlaps(10, 19) and not t.overlaps(30, 40)


def test_remove_range_removes_only_whole_mappings_inside():
    t = _tree((0, 4), (5, 9), (20, 29))
    assert _ranges(t.remove_range(0, 9)) == [(0, 4), (5, 9)]
    assert _ranges(t) == [(20, 29)]
    assert t.remove_range(10, 19) == []
    assert _ranges(t.remove_range(15, 35)) == [(20, 29)]
    assert len(t) == 0


@pytest.mark.parametrize(("s", "e"), [(0, 7), (3, 9), (1, 3), (5, 25), (0, 24)])
def test_remove_range_that_would_split_removes_nothing(s, e):
    t = _tree((0, 4), (5, 9), (20, 29))
    assert t.remove_range(s, e) is None
    assert _ranges(t) == [(0, 4), (5, 9), (20, 29)]
    assert t.find(25) is not None


def test_clear_and_iteration_is_a_snapshot():
    t = _tree((0, 4), (5, 9))
    it = iter(t)
    t.clear()
    assert len(t) == 0 and t.find(0) is None
    assert _ranges(it) == [(0, 4), (5, 9)]


class CountingList(list):
    """A list that counts element reads (bisect reads list subclasses item by item)."""

    reads = 0

    def __getitem__(self, i):
        CountingList.reads += 1
        return super().__getitem__(i)

    def __iter__(self):
        raise AssertionError("a lookup iterated over every mapping")


def _big_tree(n: int) -> MappingTree:
    t = MappingTree()
    for i in range(n):
        t.add(Mapping(i * 0x2000, i * 0x2000 + 0xFFF, i * 0x1000, MAP_F_READ))
    t._starts = CountingList(t._starts)
    t._maps = CountingList(t._maps)
    return t


def _reads_per_find(t: MappingTree, n: int) -> int:
    worst = 0
    for k in (0, 1, n // 3, n // 2, n - 2, n - 1):
        for iova, hit in ((k * 0x2000 + 0x800, True), (k * 0x2000 + 0x1800, False)):
            CountingList.reads = 0
            m = t.find(iova)
            assert (m is not None) == hit
            if hit:
                assert m.virt_start == k * 0x2000
            worst = max(worst, CountingList.reads)
    return worst


def test_find_does_logarithmic_work():
    small, big = 1_000, 100_000
    reads_small = _reads_per_find(_big_tree(small), small)
    reads_big = _reads_per_find(_big_tree(big), big)
    assert reads_small > 0  # the counting actually sees the lookups
    # binary search over n: about log2(n) + a couple of reads (10 vs 17 here);
    # a linear scan would need up to n reads.
    assert reads_small <= 14
    assert reads_big <= 21
    assert reads_big - reads_small <= 10


def test_overlapping_and_remove_range_do_logarithmic_work_around_the_result():
    n = 100_000
    t = _big_tree(n)
    CountingList.reads = 0
    got = t.overlapping(50_000 * 0x2000, 50_002 * 0x2000 + 0xFFF)
    assert _ranges(got) == [(k * 0x2000, k * 0x2000 + 0xFFF) for k in (50_000, 50_001, 50_002)]
    assert CountingList.reads <= 50
    CountingList.reads = 0
    assert t.overlaps(77_000 * 0x2000 + 0x1000, 77_000 * 0x2000 + 0x1FFF) is False
    assert CountingList.reads <= 50
    CountingList.reads = 0
    assert t.remove_range(0x1000, 0x1FFF) == []
    assert CountingList.reads <= 50
