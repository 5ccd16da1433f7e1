"""Binding UNIX sockets: never over a file or a live server, owner-only whatever the umask,
and removed only by the process that created them."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pviommu.transport.unix_socket import SocketPathError, listen_unix, resolve_group


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_new_socket_is_owner_only_whatever_the_umask(sock_dir: Path, open_umask: None) -> None:
    listener = listen_unix(sock_dir / "s")
    try:
        assert stat.S_ISSOCK(os.lstat(sock_dir / "s").st_mode)
        assert mode(sock_dir / "s") == 0o600
        assert os.umask(0) == 0  # the process's umask is back
    finally:
        listener.close()
    assert not (sock_dir / "s").exists()


def test_a_group_socket_is_0660_and_that_groups(sock_dir: Path, open_umask: None) -> None:
    gid = os.getgid()
    listener = listen_unix(sock_dir / "s", group=gid)
    try:
        st = os.lstat(sock_dir / "s")
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
    finally:
        listener.close()


def test_a_stale_socket_is_replaced(sock_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_dir / "s"))
    stale.close()  # nobody listens: connect gets ECONNREFUSED
    listener = listen_unix(sock_dir / "s")
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(sock_dir / "s"))
    client.close()
    listener.close()


def test_a_live_socket_is_refused_and_kept(sock_dir: Path) -> None:
    live = listen_unix(sock_dir / "s")
    try:
        with pytest.raises(SocketPathError, match=r"/s: a pviommu/other server is already "
                                                  "listening there"):
            listen_unix(sock_dir / "s")
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(sock_dir / "s"))  # still the first one's
        client.close()
    finally:
        live.close()


@pytest.mark.parametrize("make", [
    lambda p: p.write_text("precious"),
    lambda p: p.mkdir(),
    lambda p: p.symlink_to("elsewhere"),
])
def test_anything_else_is_refused_and_left_alone(sock_dir: Path, make) -> None:  # type: ignore[no-untyped-def]
    path = sock_dir / "s"
    make(path)
    before = os.lstat(path)
    with pytest.raises(SocketPathError, match="/s exists and is not a socket"):
        listen_unix(path)
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_size) == \
        (before.st_ino, before.st_mode, before.st_size)


def test_a_missing_directory_is_a_clear_error(sock_dir: Path) -> None:
    with pytest.raises(SocketPathError, match="/nowhere/s: cannot listen there"):
        listen_unix(sock_dir / "nowhere" / "s")


def test_only_the_socket_this_process_bound_is_removed(sock_dir: Path) -> None:
    path = sock_dir / "s"
    first = listen_unix(path)
    path.unlink()  # someone else takes the path over while the first still listens
    second = listen_unix(path)
    first.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # the second's, untouched
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    client.close()
    second.close()
    assert not path.exists()


def test_groups_are_resolved_by_name_or_number() -> None:
    gid = os.getgid()
    assert resolve_group(gid) == gid
    assert resolve_group(str(gid)) == gid
    import grp
    assert resolve_group(grp.getgrgid(gid).gr_name) == gid
    with pytest.raises(SocketPathError, match="socket group 'no-such-group-x' does not exist"):
        resolve_group("no-such-group-x")
