"""Which address of this machine other machines most likely reach (for advertised addresses)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess


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
