"""GuestMemory: memfd regions at guest-physical addresses, every access bounds-checked."""

from __future__ import annotations

import mmap
import os

import pytest

from pviommu.memory import (
    GuestMemory,
    MemoryAccessError,
    RegionSpec,
    RemoteMemoryError,
    RemoteRange,
    check_memory_fd,
)
from tests.fakes.memfd import sealed_memfd
from tests.fakes.virtio_driver import memfd_memory

GPA = 0x40000000
SIZE = 0x10000
PAGE = mmap.PAGESIZE


def _memfd(size: int, fill: bytes = b"") -> int:
    fd = sealed_memfd(size, "t")
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def mem():
    memory, fd = memfd_memory(SIZE, GPA)
    yield memory, fd
    memory.clear()
    os.close(fd)


def test_read_write_at_gpa_go_to_the_fd_at_the_right_offset(mem):
    memory, fd = mem
    memory.write(GPA + 0x123, b"hello")
    assert os.pread(fd, 5, 0x123) == b"hello"
    os.pwrite(fd, b"from-fd", 0xFF00)
    assert memory.read(GPA + 0xFF00, 7) == b"from-fd"
    assert memory.read(GPA + SIZE - 1, 1) == b"\0"
    assert memory.regions == [RegionSpec(GPA, SIZE, 0x7F0000000000, 0)]


def test_view_is_zero_copy(mem):
    memory, fd = mem
    view = memory.view(GPA + 0x40, 8)
    assert isinstance(view, memoryview) and len(view) == 8
    view[:] = b"ABCDEFGH"
    assert os.pread(fd, 8, 0x40) == b"ABCDEFGH"
    os.pwrite(fd, b"xy", 0x40)
    assert bytes(view[:2]) == b"xy"  # the view sees later writes through the fd
    view.release()


def test_contains(mem):
    memory, _ = mem
    assert memory.contains(GPA, SIZE)
    assert memory.contains(GPA + SIZE - 4, 4)
    assert not memory.contains(GPA + SIZE - 4, 5)
    assert not memory.contains(GPA - 1, 2)


@pytest.mark.parametrize(("gpa", "length"), [
    (GPA - 1, 1),            # just below
    (0, 4),                  # far below
    (GPA + SIZE, 1),         # just above
    (GPA + SIZE + 0x1000, 4),
    (GPA + SIZE - 2, 4),     # straddles the end
    (GPA - 2, 4),            # straddles the start
    (GPA, SIZE + 1),         # longer than the region
    (GPA + 8, -1),           # negative length
    (-8, 4),                 # negative address
])
def test_out_of_range_accesses_raise(mem, gpa, length):
    memory, fd = mem
    with pytest.raises(MemoryAccessError) as info:
        memory.read(gpa, length)
    assert (info.value.address, info.value.length) == (gpa, length)
    with pytest.raises(MemoryAccessError):
        memory.view(gpa, length)
    if length >= 0:
        with pytest.raises(MemoryAccessError):
            memory.write(gpa, b"\xff" * length)
    # nothing was written anywhere
    assert os.pread(fd, SIZE, 0) == bytes(SIZE)


def test_accesses_across_a_gap_or_a_boundary_between_two_regions_raise():
    memory = GuestMemory()
    a, b, c = _memfd(PAGE), _memfd(PAGE), _memfd(PAGE)
    memory.set_regions([RegionSpec(0x1000_0000, PAGE, 0x7000_0000, 0),
                        RegionSpec(0x1000_0000 + 2 * PAGE, PAGE, 0x8000_0000, 0),
                        RegionSpec(0x1000_0000 + 3 * PAGE, PAGE, 0x9000_0000, 0)],
                       [a, b, c])
    try:
        # in the gap
        with pytest.raises(MemoryAccessError):
            memory.read(0x1000_0000 + PAGE, 1)
        # from the first region over the gap into the second
        with pytest.raises(MemoryAccessError):
            memory.read(0x1000_0000 + PAGE - 2, PAGE + 4)
        # across the boundary of two adjacent regions: not one region
        with pytest.raises(MemoryAccessError):
            memory.read(0x1000_0000 + 3 * PAGE - 2, 4)
        memory.write(0x1000_0000 + 3 * PAGE - 2, b"ab")
        memory.write(0x1000_0000 + 3 * PAGE, b"cd")
        assert memory.read(0x1000_0000 + 3 * PAGE - 2, 2) == b"ab"
        assert memory.read(0x1000_0000 + 3 * PAGE, 2) == b"cd"
    finally:
        memory.clear()
    with pytest.raises(MemoryAccessError):
        memory.read(0x1000_0000, 1)  # cleared


def test_regions_are_sorted_whatever_the_order_given():
    memory = GuestMemory()
    memory.set_regions([RegionSpec(0x2000_0000, PAGE, 0, 0), RegionSpec(0x1000_0000, PAGE, 0, 0)],
                       [_memfd(PAGE, b"second"), _memfd(PAGE, b"first")])
    try:
        assert [r.gpa for r in memory.regions] == [0x1000_0000, 0x2000_0000]
        assert memory.read(0x1000_0000, 5) == b"first"
        assert memory.read(0x2000_0000, 6) == b"second"
    finally:
        memory.clear()


@pytest.mark.parametrize("second_gpa", [0x1000_0000, 0x1000_0000 + PAGE - 1, 0x0FFF_F001])
def test_overlapping_regions_are_refused_fds_closed_old_regions_kept(mem, second_gpa):
    memory, fd = mem
    memory.write(GPA, b"old")
    x, y = _memfd(PAGE), _memfd(PAGE)
    with pytest.raises(ValueError, match="overlap"):
        memory.set_regions([RegionSpec(0x1000_0000, PAGE, 0, 0),
                            RegionSpec(second_gpa, PAGE, 0, 0)], [x, y])
    assert not _is_open(x) and not _is_open(y)
    assert memory.regions == [RegionSpec(GPA, SIZE, 0x7F0000000000, 0)]
    assert memory.read(GPA, 3) == b"old"
    with pytest.raises(MemoryAccessError):
        memory.read(0x1000_0000, 1)


def test_bad_region_lists_are_refused_and_fds_closed():
    memory = GuestMemory()
    x = _memfd(PAGE)
    with pytest.raises(ValueError):
        memory.set_regions([RegionSpec(0, PAGE, 0, 0), RegionSpec(PAGE, PAGE, 0, 0)], [x])
    assert not _is_open(x)
    y = _memfd(PAGE)
    with pytest.raises(ValueError):
        memory.set_regions([RegionSpec(0, 0, 0, 0)], [y])  # empty region
    assert not _is_open(y)
    z = _memfd(PAGE)
    with pytest.raises(ValueError):
        memory.set_regions([RegionSpec((1 << 64) - PAGE // 2, PAGE, 0, 0)], [z])  # wraps
    assert not _is_open(z)
    assert memory.regions == []


def test_set_regions_replaces_the_old_regions(mem):
    memory, _ = mem
    memory.set_regions([RegionSpec(0x2000_0000, PAGE, 0, 0)], [_memfd(PAGE, b"new")])
    assert memory.read(0x2000_0000, 3) == b"new"
    with pytest.raises(MemoryAccessError):
        memory.read(GPA, 1)


def test_uaddr_to_gpa():
    memory = GuestMemory()
    memory.set_regions([RegionSpec(0x4000_0000, 2 * PAGE, 0x7F00_0000_0000, 0),
                        RegionSpec(0x8000_0000, PAGE, 0x7E00_0000_0000, 0)],
                       [_memfd(2 * PAGE), _memfd(PAGE)])
    try:
        assert memory.uaddr_to_gpa(0x7F00_0000_0000) == 0x4000_0000
        assert memory.uaddr_to_gpa(0x7F00_0000_0123, 16) == 0x4000_0123
        assert memory.uaddr_to_gpa(0x7F00_0000_0000 + 2 * PAGE - 4, 4) == 0x4000_0000 + 2 * PAGE - 4
        assert memory.uaddr_to_gpa(0x7E00_0000_0010) == 0x8000_0010
        for uaddr, length in [(0x7F00_0000_0000 - 1, 1), (0x7F00_0000_0000 + 2 * PAGE, 1),
                              (0x7F00_0000_0000 + 2 * PAGE - 4, 5), (0x1000, 1)]:
            with pytest.raises(MemoryAccessError):
                memory.uaddr_to_gpa(uaddr, length)
    finally:
        memory.clear()


@pytest.mark.parametrize("mmap_offset", [0x10, PAGE + 0x234, 2 * PAGE])
def test_mmap_offset_need_not_be_page_aligned(mmap_offset):
    fd = _memfd(4 * PAGE)
    pattern = bytes(i % 251 for i in range(4 * PAGE))
    os.pwrite(fd, pattern, 0)
    keep = os.dup(fd)
    memory = GuestMemory()
    memory.set_regions([RegionSpec(0x5000_0000, PAGE, 0, mmap_offset)], [fd])
    try:
        # gpa 0x50000000 is byte mmap_offset of the fd
        assert memory.read(0x5000_0000, PAGE) == pattern[mmap_offset:mmap_offset + PAGE]
        memory.write(0x5000_0000, b"\xee\xee")
        assert os.pread(keep, 2, mmap_offset) == b"\xee\xee"
        assert os.pread(keep, 1, mmap_offset - 1) == pattern[mmap_offset - 1:mmap_offset]
        with pytest.raises(MemoryAccessError):
            memory.read(0x5000_0000 + PAGE, 1)  # the region ends after size bytes
    finally:
        memory.clear()
        os.close(keep)


def test_set_regions_closes_the_fds_it_is_given():
    memory = GuestMemory()
    fd = _memfd(PAGE)
    memory.set_regions([RegionSpec(0, PAGE, 0, 0)], [fd])
    try:
        assert not _is_open(fd)
        memory.write(0, b"still mapped")
        assert memory.read(0, 12) == b"still mapped"
    finally:
        memory.clear()


def test_clear_with_a_view_still_held_does_not_crash(mem):
    memory, fd = mem
    view = memory.view(GPA, 4)
    memory.clear()
    view[:] = b"live"  # the mapping stays alive until the view goes
    assert os.pread(fd, 4, 0) == b"live"
    view.release()


# -- regions added one by one (vfio-user DMA_MAP), remote regions, read-only ones --


def test_add_region_and_remove_range_follow_the_dma_map_table():
    memory = GuestMemory()
    try:
        memory.add_region(RegionSpec(0x1000_0000, PAGE, 0, 0), _memfd(PAGE, b"one"))
        memory.add_region(RegionSpec(0x3000_0000, 2 * PAGE, 0, PAGE), _memfd(3 * PAGE))
        assert memory.read(0x1000_0000, 3) == b"one"
        with pytest.raises(ValueError, match="overlaps"):
            memory.add_region(RegionSpec(0x3000_0000 + PAGE, PAGE, 0, 0), _memfd(PAGE))
        with pytest.raises(ValueError, match="cuts the region"):
            memory.remove_range(0x3000_0000, PAGE)
        assert memory.contains(0x3000_0000, 2 * PAGE)
        assert memory.remove_range(0x0, 0x2000_0000) == 1
        assert not memory.contains(0x1000_0000, 1)
        assert memory.remove_range(0x2000_0000, 0x2000_0000) == 1
        assert memory.regions == []
    finally:
        memory.clear()


def test_add_region_closes_its_fd_even_when_refused():
    memory = GuestMemory()
    memory.add_region(RegionSpec(0, PAGE, 0, 0), _memfd(PAGE))
    fd = _memfd(PAGE)
    with pytest.raises(ValueError):
        memory.add_region(RegionSpec(0, PAGE, 0, 0), fd)
    assert not _is_open(fd)
    memory.clear()


def test_a_region_without_fd_is_remote():
    memory = GuestMemory()
    memory.add_region(RegionSpec(0x5000_0000, PAGE, 0, 0), None)
    piece = memory.piece(0x5000_0010, 16)
    assert isinstance(piece, RemoteRange)
    assert (piece.gpa, piece.length) == (0x5000_0010, 16)
    with pytest.raises(RemoteMemoryError):
        memory.read(0x5000_0010, 16)
    with pytest.raises(MemoryAccessError):
        memory.piece(0x5000_0000 + PAGE - 1, 2)


def test_read_only_regions_refuse_write_views(mem):
    memory = GuestMemory()
    memory.add_region(RegionSpec(0x6000_0000, PAGE, 0, 0), _memfd(PAGE, b"rom"), writable=False)
    try:
        assert memory.read(0x6000_0000, 3) == b"rom"
        with pytest.raises(MemoryAccessError, match="read-only"):
            memory.write(0x6000_0000, b"x")
        with pytest.raises(MemoryAccessError, match="read-only"):
            memory.piece(0x6000_0000, 1, write=True)
    finally:
        memory.clear()


# -- memory fds the frontend could shrink ------------------------------------------------------


def test_an_unsealed_memfd_is_refused_unless_allowed():
    fd = sealed_memfd(PAGE, "t", seals=0)
    try:
        with pytest.raises(ValueError, match="sealed against shrinking"):
            check_memory_fd(fd, 0, PAGE)
        check_memory_fd(fd, 0, PAGE, allow_unsealed=True)
        memory = GuestMemory()
        with pytest.raises(ValueError, match="sealed against shrinking"):
            memory.set_regions([RegionSpec(GPA, PAGE, 0, 0)], [os.dup(fd)])
        with pytest.raises(ValueError, match="sealed against shrinking"):
            memory.add_region(RegionSpec(GPA, PAGE, 0, 0), os.dup(fd))
        assert memory.regions == []
        trusting = GuestMemory(allow_unsealed=True)
        trusting.add_region(RegionSpec(GPA, PAGE, 0, 0), os.dup(fd))
        assert trusting.regions == [RegionSpec(GPA, PAGE, 0, 0)]
        trusting.clear()
    finally:
        os.close(fd)


@pytest.mark.parametrize("offset,size", [(0, 2 * PAGE), (PAGE, PAGE), (2 * PAGE, PAGE),
                                         (1 << 63, PAGE)])
@pytest.mark.parametrize("allow_unsealed", [False, True])
def test_a_region_beyond_the_end_of_its_file_is_refused(offset, size, allow_unsealed):
    fd = sealed_memfd(PAGE, "t")
    try:
        with pytest.raises(ValueError, match="beyond the end"):
            check_memory_fd(fd, offset, size, allow_unsealed)
        memory = GuestMemory(allow_unsealed=allow_unsealed)
        with pytest.raises(ValueError, match="beyond the end"):
            memory.set_regions([RegionSpec(GPA, size, 0, offset)], [os.dup(fd)])
        assert memory.regions == []
    finally:
        os.close(fd)


def test_an_fd_that_is_no_file_is_refused_even_when_unsealed_ones_are_allowed():
    r, w = os.pipe()
    try:
        for allow in (False, True):
            with pytest.raises(ValueError, match="not a regular file"):
                check_memory_fd(r, 0, PAGE, allow)
    finally:
        os.close(r)
        os.close(w)


def test_a_plain_file_is_no_sealed_memfd(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(bytes(PAGE))
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(ValueError, match="sealed against shrinking"):
            check_memory_fd(fd, 0, PAGE)
        check_memory_fd(fd, 0, PAGE, allow_unsealed=True)
    finally:
        os.close(fd)
