"""A network guard for tests: sockets may connect to loopback only (or nowhere)."""

from __future__ import annotations

import socket

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_real_connect = socket.socket.connect


def install_network_guard(*, allow_loopback: bool = True) -> None:
    """Make every IP socket `connect` outside loopback (or any, with `allow_loopback=False`) raise `OSError`."""

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and not (allow_loopback and host in LOOPBACK):
            raise OSError(f"network guard: this process may not connect to {address!r}")
        return _real_connect(self, address)

    socket.socket.connect = guarded_connect
