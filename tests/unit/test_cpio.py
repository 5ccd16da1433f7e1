"""The newc writer, read back by an independent parser of the format."""

import io
import stat

import pytest

from pviommu.machine.cpio import CpioWriter


def parse_newc(data: bytes) -> list[dict]:
    """A minimal newc reader written from the format description."""
    entries, pos = [], 0
    names = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor",
             "devminor", "rdevmajor", "rdevminor", "namesize", "check")
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        assert pos % 4 == 0
        fields = {n: int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i, n in enumerate(names)}
        name_start = pos + 110
        name = data[name_start:name_start + fields["namesize"]]
        assert name.endswith(b"\0")
        fields["name"] = name[:-1].decode()
        data_start = (name_start + fields["namesize"] + 3) & ~3
        fields["data"] = data[data_start:data_start + fields["filesize"]]
        pos = (data_start + fields["filesize"] + 3) & ~3
        entries.append(fields)
        if fields["name"] == "TRAILER!!!":
            assert data[pos:].strip(b"\0") == b""
            return entries


def test_round_trip_of_every_entry_kind():
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_dir("/bin")
    w.add_file("bin/hello", b"hello world", perm=0o755)
    w.add_file("empty", b"")
    w.add_symlink("bin/sh", "hello")
    w.add_chardev("dev/console", 5, 1)
    w.close()
    entries = parse_newc(buf.getvalue())
    by_name = {e["name"]: e for e in entries}
    assert [e["name"] for e in entries] == ["bin", "bin/hello", "empty", "bin/sh",
                                            "dev/console", "TRAILER!!!"]
    assert stat.S_ISDIR(by_name["bin"]["mode"])
    hello = by_name["bin/hello"]
    assert stat.S_ISREG(hello["mode"]) and stat.S_IMODE(hello["mode"]) == 0o755
    assert hello["data"] == b"hello world"
    assert by_name["empty"]["filesize"] == 0
    assert stat.S_ISLNK(by_name["bin/sh"]["mode"]) and by_name["bin/sh"]["data"] == b"hello"
    console = by_name["dev/console"]
    assert stat.S_ISCHR(console["mode"])
    assert (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    assert len({e["ino"] for e in entries}) == len(entries)


@pytest.mark.parametrize("size", range(0, 9))
def test_padding_for_every_alignment(size):
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_file("f" * (size + 1), b"x" * size)
    w.close()
    entries = parse_newc(buf.getvalue())
    assert entries[0]["data"] == b"x" * size


def test_no_entry_after_close():
    w = CpioWriter(io.BytesIO())
    w.close()
    with pytest.raises(ValueError):
        w.add_dir("late")
