"""Addresses of this machine: which one other machines most likely reach (for advertised addresses), and why
one cannot be listened on."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator

from tunnelmesh.errors import TunnelMeshError


class ListenError(TunnelMeshError):
    """This machine cannot listen on an address: the message names it, the setting and the OS's reason."""

    def __init__(self, address: str, what: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address} ({what}): {reason}")


def reachable_address() -> str | None:
    """The source address of the default route, else the first global IPv4 address, else None.

    Nothing is sent: a UDP connect only picks a route.
    """
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: never answered, only routed
        addr = str(s.getsockname()[0])
        if not addr.startswith("127."):
            return addr
    with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
        out = subprocess.run(
            ["ip", "-j", "-4", "addr", "show", "scope", "global"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        for link in json.loads(out):
            for a in link.get("addr_info", []):
                if a.get("local"):
                    return str(a["local"])
    return None


def bind_problem(address: str, kind: socket.SocketKind = socket.SOCK_STREAM) -> str:
    """Why ``address`` (``host:port``) cannot be listened on, in the OS's words ("Address already in use",
    "Cannot assign requested address"), found by binding it once; "" if it can be. For servers (gRPC's)
    that only say that binding failed."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=kind, flags=socket.AI_PASSIVE)
        family, socktype, proto, _, sockaddr = infos[0]
        with socket.socket(family, socktype, proto) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
            s.bind(sockaddr)
    except OSError as exc:
        return exc.strerror or str(exc)
    except ValueError as exc:
        return str(exc)
    return ""


@contextlib.contextmanager
def listening(address: str, what: str) -> Iterator[None]:
    """Around a server's bind: an ``OSError`` becomes a ``ListenError`` naming ``address`` and ``what`` (the
    flag or setting it came from)."""
    try:
        yield
    except OSError as exc:
        raise ListenError(address, what, exc.strerror or str(exc)) from None
