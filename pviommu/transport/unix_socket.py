"""Listening UNIX sockets that never take over someone else's path.

:func:`listen_unix` binds a socket file only where nothing is, or where a
stale socket is (one nobody answers on: connecting gets ECONNREFUSED). A
regular file, a directory, a live socket are refused with a
:class:`SocketPathError` naming the path. The socket is created owner-only
(0600) whatever the umask; with a group, it is then given to that group and
opened to it (0660), never wider at any moment. :meth:`UnixListener.remove`
deletes the socket file only if it is still the one this process bound
(same st_dev/st_ino), so a process never removes a socket it did not create.

Owner-only creation uses a temporary umask of 0o177 around ``bind``. The umask
is process-wide, so a file another thread creates at that instant gets it too;
the backend binds its sockets before it serves anything, and the alternative
(bind in a private directory, then link into place) lengthens the path a UNIX
socket address has only 108 bytes for and can leave the directory behind.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import threading
from pathlib import Path

log = logging.getLogger(__name__)

_OWNER_ONLY_UMASK = 0o177
_GROUP_MODE = 0o660
# How long a connect to an existing socket may take before it counts as live.
_PROBE_TIMEOUT = 1.0
_umask_lock = threading.Lock()


class SocketPathError(OSError):
    """A socket path this process must not (or cannot) listen on; the message names it."""


def resolve_group(group: str | int) -> int:
    """The group ID of ``group`` (a name or a number); SocketPathError if it does not exist."""
    if isinstance(group, int) or group.isdigit():
        gid = int(group)
        try:
            grp.getgrgid(gid)
        except KeyError:
            raise SocketPathError(f"socket group {gid} does not exist") from None
        return gid
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SocketPathError(f"socket group {group!r} does not exist") from None


def _is_live(path: Path) -> bool:
    """Whether a server answers on the socket file ``path`` (ECONNREFUSED: stale)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return False
    except FileNotFoundError:  # gone meanwhile: nothing to take over
        return False
    except TimeoutError:  # a full backlog: someone is listening
        return True
    except OSError as e:
        raise SocketPathError(f"{path}: cannot tell whether a server listens there: "
                              f"{e.strerror}") from None
    finally:
        probe.close()
    return True


def _clear_stale(path: Path) -> None:
    """Removes a stale socket at ``path``; refuses anything else that is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket")
    if _is_live(path):
        raise SocketPathError(f"{path}: a pviommu/other server is already listening there")
    with contextlib.suppress(FileNotFoundError):
        again = os.lstat(path)
        if (again.st_dev, again.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)
            log.info("removed the stale socket %s", path)


def _bind_owner_only(sock: socket.socket, path: Path) -> None:
    with _umask_lock:
        old = os.umask(_OWNER_ONLY_UMASK)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)


class UnixListener:
    """A listening UNIX stream socket and the identity of the file it was bound to."""

    def __init__(self, sock: socket.socket, path: Path, dev: int, ino: int) -> None:
        self.sock = sock
        self.path = path
        self._identity: tuple[int, int] | None = (dev, ino)

    def owns_path(self) -> bool:
        """Whether ``path`` is still the socket file this listener bound."""
        if self._identity is None:
            return False
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def remove(self) -> None:
        """Deletes the socket file if it is still ours (never another process's)."""
        if self.owns_path():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._identity = None

    def close(self) -> None:
        """Removes the socket file (if still ours) and closes the socket.

        In that order: while the socket is open its inode cannot be reused, so
        the identity check cannot mistake a newer file for ours.
        """
        self.remove()
        self.sock.close()


def listen_unix(path: Path | str, group: int | None = None, backlog: int = 4) -> UnixListener:
    """A non-blocking socket listening on ``path``, 0600 (0660 and group ``group``).

    A stale socket at ``path`` is replaced; anything else there raises
    SocketPathError (an OSError) whose message names the path.
    """
    path = Path(path)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener: UnixListener | None = None
    try:
        try:
            _bind_owner_only(sock, path)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:  # bound by someone since the check
                raise SocketPathError(f"{path}: a pviommu/other server is already listening "
                                      "there") from None
            raise SocketPathError(f"{path}: cannot listen there: {e.strerror}") from None
        st = os.lstat(path)
        listener = UnixListener(sock, path, st.st_dev, st.st_ino)
        if group is not None:
            if not listener.owns_path():
                raise SocketPathError(f"{path} was replaced while being bound")
            try:
                os.chown(path, -1, group, follow_symlinks=False)
                os.chmod(path, _GROUP_MODE)
            except OSError as e:
                raise SocketPathError(f"{path}: cannot open the socket to group {group}: "
                                      f"{e.strerror}") from None
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        if listener is not None:
            listener.close()
        else:
            sock.close()
        raise
    return listener
