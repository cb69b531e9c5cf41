"""wg-quick's ``DNS``: the interface's name servers and search domains go to ``resolvconf`` while it is up.

As wg-quick(8) does it: once the interface is up, ``resolvconf -a <prefix><iface> -m 0 -x`` reads
``nameserver``/``search`` lines on stdin (``-x``: these servers are used exclusively, ``-m 0``: first); once
the interface is gone, ``resolvconf -d <prefix><iface> -f`` takes them back. That works with openresolv,
Debian's resolvconf and systemd-resolved's ``resolvconf`` command (which sets them on the link). The prefix
comes from ``/etc/resolvconf/interface-order``, by which Debian's resolvconf orders records (``tun.`` on most
systems).

Every call has a deadline (``RESOLVCONF_TIMEOUT``); a failure names the command and what it printed.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tunnelmesh.errors import TunnelMeshError

__all__ = ["RESOLVCONF_TIMEOUT", "record_name", "set_dns", "unset_dns"]

log = logging.getLogger(__name__)

RESOLVCONF_TIMEOUT = 10.0  # seconds one resolvconf call may take
INTERFACE_ORDER = Path("/etc/resolvconf/interface-order")
_ORDER_PATTERN = re.compile(r"([A-Za-z0-9-]+)\*")  # a line like `tun*`: records named `tun.<iface>`


def record_name(iface: str, order_file: Path = INTERFACE_ORDER) -> str:
    """The resolvconf record for ``iface``: wg-quick's ``resolvconf_iface_prefix`` + the name."""
    try:
        lines = order_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return iface
    for line in lines:
        if m := _ORDER_PATTERN.fullmatch(line.strip()):
            return f"{m.group(1)}.{iface}"
    return iface


def set_dns(iface: str, servers: Sequence[str], search: Sequence[str]) -> None:
    """Make ``servers`` the system's name servers and ``search`` its search domains. Raises TunnelMeshError
    when resolvconf is missing or fails (nothing was changed then)."""
    lines = [f"nameserver {s}" for s in servers]
    if search:
        lines.append(f"search {' '.join(search)}")
    record = record_name(iface)
    _run(["-a", record, "-m", "0", "-x"], "\n".join(lines) + "\n", "set DNS")
    log.info("event=dns_set iface=%s record=%s servers=%s search=%s", iface, record, servers, search)


def unset_dns(iface: str) -> str | None:
    """Take the interface's record out again. Returns what failed, or None."""
    record = record_name(iface)
    try:
        _run(["-d", record, "-f"], "", "remove DNS")
    except TunnelMeshError as exc:
        log.error("event=dns_unset_failed iface=%s reason=%r", iface, str(exc))
        return str(exc)
    log.info("event=dns_unset iface=%s record=%s", iface, record)
    return None


def _run(args: list[str], stdin: str, what: str) -> None:
    exe = shutil.which("resolvconf")
    if exe is None:
        raise TunnelMeshError(
            f"cannot {what}: the config sets DNS, which needs `resolvconf` (install openresolv or "
            f"resolvconf, or use systemd-resolved's), and none is in PATH; or remove DNS from the config"
        )
    argv = [exe, *args]
    try:
        out = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=RESOLVCONF_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise TunnelMeshError(
            f"cannot {what}: `{' '.join(argv)}` did not finish within {RESOLVCONF_TIMEOUT:g} s"
        ) from None
    if out.returncode != 0:
        said = (out.stderr or out.stdout).strip().splitlines()
        raise TunnelMeshError(
            f"cannot {what}: `{' '.join(argv)}` exited with status {out.returncode}"
            + (f": {said[-1]}" if said else "")
        )
