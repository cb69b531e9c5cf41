"""Readiness for service managers: systemd's notification protocol (``sd_notify(3)``), without libsystemd.

A unit with ``Type=notify`` starts the process with ``$NOTIFY_SOCKET`` set (a datagram socket; a leading ``@``
means Linux's abstract namespace) and treats it as started only once it sends ``READY=1``. So ``systemctl
start`` returns, and units ordered after it start, when the tunnel is up or the coordinator has caught up,
not when the process merely exists. ``RELOADING=1`` (with ``MONOTONIC_USEC``, which ``Type=notify-reload``
needs) and ``STOPPING=1`` frame reloads and shutdown; ``STATUS=`` is the line ``systemctl status`` shows.

With ``WatchdogSec=`` in the unit, systemd sets ``$WATCHDOG_USEC`` and kills a service that does not send
``WATCHDOG=1`` that often: ``watchdog`` pings from the event loop it runs on, so a loop that is stuck stops
pinging and gets the service restarted.

Without ``$NOTIFY_SOCKET`` (no service manager, or ``Type=simple``) every call is a no-op. A notification
that cannot be sent is logged and dropped: the service keeps running, and systemd's start timeout says the
rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["notify", "ready", "reloading", "stopping", "watchdog", "watchdog_interval"]

log = logging.getLogger(__name__)

SEND_TIMEOUT = 1.0  # seconds; the manager reads its socket at once, a full queue must not stall a service


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` assignments (one datagram). Returns whether one was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("event=sd_notify_failed reason=%r", f"NOTIFY_SOCKET {address!r} is not a path or @name")
        return False
    message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("event=sd_notify_failed socket=%r reason=%r", address, exc.strerror or str(exc))
        return False
    return True


def ready(status: str) -> bool:
    """The service is up: ``READY=1`` with ``status`` for ``systemctl status``."""
    return notify("READY=1", f"STATUS={status}")


def reloading(status: str) -> bool:
    """A reload starts; send ``ready`` once it ended (applied or refused)."""
    return notify(
        "RELOADING=1",
        f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
        f"STATUS={status}",
    )


def stopping(status: str) -> bool:
    return notify("STOPPING=1", f"STATUS={status}")


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between two ``WATCHDOG=1`` (half of ``WatchdogSec``, as sd_watchdog_enabled(3) advises), or
    None without a watchdog for this process (``$WATCHDOG_PID``, if set, names the process meant)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


async def watchdog(interval: float) -> None:
    """Ping the watchdog every ``interval`` seconds until cancelled. A task of the loop being watched: when
    that loop is stuck, the pings stop."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
