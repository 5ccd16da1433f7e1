"""Stage 2 kept across backend restarts (pviommu.iommu.stage2_store)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pviommu.iommu import stage2_store
from pviommu.iommu.stage2 import Stage2, Stage2Error
from pviommu.iommu.stage2_store import FILE_NAME, Stage2Store
from pviommu.vmsa import Perm, VmsaFault

RAM = [(0x4000_0000, 64 << 20)]


def _state(s2: Stage2) -> tuple:
    return s2.generation, s2.ram, s2.ranges()


def _changed(s2: Stage2) -> None:
    s2.adopt(RAM)
    s2.unmap(0x4010_0000, 0x3000)
    s2.protect(0x4020_0000, 0x20_0000, Perm.R)
    s2.map(0x1_0000_0000, 0x4000_0000, 0x1000, Perm.R | Perm.W)


def test_a_fresh_store_holds_nothing_then_every_change(tmp_path):
    store = Stage2Store.in_dir(tmp_path / "state")
    s2 = Stage2()
    assert store.attach(s2) is False
    _changed(s2)
    assert store.commits == 4  # the adoption and three changes, one row each
    store.close()

    again = Stage2()
    store = Stage2Store(tmp_path / "state" / FILE_NAME)
    assert store.attach(again) is True
    assert _state(again) == _state(s2)
    assert again.tables_bytes == s2.tables_bytes  # replayed: the very same tables
    for ipa in (0x4000_0000, 0x4020_0000, 0x1_0000_0000):
        assert again.walk(ipa, None)[:2] == s2.walk(ipa, None)[:2]
    # The same RAM handed over again (QEMU's SET_MEM_TABLE after the restart) is kept.
    assert again.adopt(RAM) == 0
    assert again.ranges() == s2.ranges()
    # ... and later changes are saved on top.
    again.unmap(0x4000_0000, 0x1000)
    store.close()
    third = Stage2()
    Stage2Store.in_dir(tmp_path / "state").attach(third)
    assert _state(third) == _state(again)


def test_a_failed_change_is_saved_with_its_generation(tmp_path):
    store = Stage2Store.in_dir(tmp_path)
    s2 = Stage2(table_memory=4 * 4096)
    store.attach(s2)
    with pytest.raises(Stage2Error):
        s2.map(0x1000, 0x2000, 1 << 30, Perm.R)  # 4 KiB leaves: no room for the tables
    store.close()
    again = Stage2(table_memory=4 * 4096)
    Stage2Store.in_dir(tmp_path).attach(again)
    assert again.generation == s2.generation
    assert again.ranges() == s2.ranges()


def test_a_long_log_becomes_the_base(tmp_path, monkeypatch):
    s2 = Stage2()
    Stage2Store.in_dir(tmp_path).attach(s2)
    _changed(s2)  # 4 rows of log, under COMPACT_AT: kept as they are
    monkeypatch.setattr(stage2_store, "COMPACT_AT", 3)  # a start then finds them too many
    again = Stage2()
    store = Stage2Store.in_dir(tmp_path)
    store.attach(again)
    assert store.db.execute("SELECT COUNT(*) FROM log").fetchone() == (0,)
    third = Stage2()
    Stage2Store.in_dir(tmp_path).attach(third)
    assert _state(third) == _state(again) == _state(s2)


def test_another_ipa_size_is_refused(tmp_path):
    Stage2Store.in_dir(tmp_path).attach(Stage2(ias=40))
    with pytest.raises(Stage2Error, match="ias"):
        Stage2Store.in_dir(tmp_path).attach(Stage2(ias=44))


def test_only_a_fresh_stage2_is_restored():
    s2 = Stage2()
    s2.adopt(RAM)
    with pytest.raises(Stage2Error, match="fresh"):
        s2.restore([], [], 3)


def test_a_change_survives_sigkill(tmp_path):
    """No fsync: what is committed is in the page cache when the process dies."""
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from pviommu.iommu.stage2 import Stage2
        from pviommu.iommu.stage2_store import Stage2Store
        s2 = Stage2()
        Stage2Store.in_dir(Path({str(tmp_path)!r})).attach(s2)
        s2.adopt({RAM!r})
        s2.unmap(0x4010_0000, 0x1000)
        print(s2.generation, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -9, proc.stderr
    again = Stage2()
    assert Stage2Store.in_dir(tmp_path).attach(again)
    assert again.generation == int(proc.stdout)
    with pytest.raises(VmsaFault):  # the hole is still a hole
        again.walk(0x4010_0000, None)


def test_a_long_running_backend_compacts_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(stage2_store, "COMPACT_AT", 8)
    store = Stage2Store.in_dir(tmp_path)
    s2 = Stage2()
    store.attach(s2)
    _changed(s2)
    for i in range(20):  # pages taken away and given back, as the soak does
        s2.unmap(0x4000_0000 + (i << 12), 0x1000)
        s2.map(0x4000_0000 + (i << 12), 0x4000_0000 + (i << 12), 0x1000, Perm.R | Perm.W)
    assert store.commits == 44 and store.compactions == 1 + 44 // 8
    rows = store.db.execute("SELECT COUNT(*) FROM log").fetchone()[0]
    assert rows == 44 % 8
    store.close()
    again = Stage2()
    Stage2Store.in_dir(tmp_path).attach(again)
    assert _state(again) == _state(s2)


def test_the_ranges_follow_every_change():
    s2 = Stage2()
    assert s2.ranges() == []
    s2.adopt(RAM)
    assert [(r.ipa, r.size) for r in s2.ranges()] == [(0x4000_0000, 64 << 20)]
    assert s2.ranges() is not s2.ranges()  # a list of its own each time
    s2.unmap(0x4010_0000, 0x1000)
    assert [(r.ipa, r.size) for r in s2.ranges()] == [
        (0x4000_0000, 0x10_0000), (0x4010_1000, (64 << 20) - 0x10_1000)]
    s2.protect(0x4000_0000, 0x1000, Perm.R)
    assert s2.ranges(0, 0x4000_0fff)[0].perm == Perm.R
    assert s2.ranges(0x4010_0000, 0x4010_0fff) == []  # the hole
    assert [r.ipa for r in s2.ranges(0x4010_0000, 0x4010_1000)] == [0x4010_1000]
