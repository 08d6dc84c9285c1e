"""Claiming the sidecar's addresses without taking over another process's.

A second sidecar started beside a live one (a rollout overlap, a mistaken restart) must fail at
once and leave the first serving: it must not unlink the first's socket, nor get half started
and die on a port the first holds. So the Unix socket is claimed with a lock file held for the
process's life (released by the kernel however the process ends), a socket file that still
accepts connections is never removed, and every port is bound before anything serves.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from pathlib import Path
from typing import IO


class AddressInUse(RuntimeError):
    """Another process serves an address this sidecar was told to use."""


class SocketClaim:
    """The right to serve on a Unix socket path, held until ``release``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(f"{self.path}.lock", "a+")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            lock.close()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise AddressInUse(
                f"unix:{self.path} is served by another extproc{pid}; stop it first or give this one another --uds"
            ) from None
        try:
            self._remove_stale()
        except BaseException:
            lock.close()
            raise
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def _remove_stale(self) -> None:
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise AddressInUse(f"unix:{self.path} exists and is not a socket; remove it or give another --uds")
        if accepts(self.path):
            raise AddressInUse(
                f"unix:{self.path} is served by another process; stop it first or give this one another --uds"
            )
        self.path.unlink(missing_ok=True)  # left by a process that ended without cleaning up

    def release(self, remove_socket: bool) -> None:
        if self._lock is None:
            return
        if remove_socket:
            self.path.unlink(missing_ok=True)
        self._lock.close()  # unlocks; the lock file stays (removing it would race a starting sidecar)
        self._lock = None


def accepts(path: Path, timeout: float = 0.5) -> bool:
    """True if some process accepts connections on the Unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except TimeoutError:
            return True  # a full backlog: alive, just busy
        except OSError as exc:
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    return True


def ensure_free(what: str, address: str) -> None:
    """Fail with AddressInUse if a TCP host:port cannot be bound now (gRPC would report only
    "Failed to bind", after logging its own lines)."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError) as exc:
        raise AddressInUse(f"{what} {address} is not a usable host:port ({exc})") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no clash
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise bind_error(what, address, exc) from None


def bind_error(what: str, address: str, exc: BaseException) -> AddressInUse:
    """A clear one-line error for an address that could not be bound."""
    if isinstance(exc, OSError):
        reason = "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc)).lower()
    else:
        reason = "in use, or not allowed"
    return AddressInUse(f"{what} {address} cannot be bound ({reason}); stop what holds it or choose another")
