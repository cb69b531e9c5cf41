"""Hooks the mesh resolver into the host's DNS through systemd-resolved, when it runs.

systemd-resolved keeps DNS servers and domains per network link. We give the mesh link (the TUN device) our
resolver as its DNS server and the mesh domain as a *routing-only* domain (``~mesh.internal``), and turn the
link's default route off: then resolved sends exactly the names under the mesh domain to the mesh resolver and
everything else where it went before. The commands are those Tailscale and wg-quick use::

    resolvectl dns <if> <ip>
    resolvectl domain <if> ~<domain> [search domains...]
    resolvectl default-route <if> false
    resolvectl revert <if>          # on shutdown (deleting the link forgets it too)

Detection: resolved is running when ``/run/systemd/resolve/`` exists and ``resolvectl status`` succeeds.
Where it does not run, nothing is changed; a single warning says how to reach the mesh names instead
(docs/dns.md: a dnsmasq ``server=/<domain>/<ip>`` line, or ``nameserver <ip>`` in /etc/resolv.conf).
Commands run through an injectable ``runner`` so tests can check them exactly on hosts without resolved.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tunnelmesh.errors import ConfigError, TunnelMeshError
from tunnelmesh.node.dns_wire import name_from_text

log = logging.getLogger(__name__)

RESOLVED_RUN_DIR: Final = Path("/run/systemd/resolve")
COMMAND_TIMEOUT: Final = 10.0  # seconds; resolvectl talks to resolved over D-Bus, normally in milliseconds

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]

_fallback_logged = False


class ResolvedError(TunnelMeshError):
    """systemd-resolved runs but refused a command; the message quotes the command and its error."""


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """The default runner: run ``argv`` with a deadline, capture its output, never raise on exit status."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)


def resolved_running(*, runner: Runner = run_command, run_dir: Path = RESOLVED_RUN_DIR) -> bool:
    """Whether systemd-resolved runs here: its runtime directory exists and ``resolvectl status`` works."""
    if not run_dir.is_dir():
        return False
    try:
        return runner(["resolvectl", "status"]).returncode == 0
    except (OSError, subprocess.TimeoutExpired):  # no resolvectl binary, or resolved hangs
        return False


def fallback_hint(server_ip: str, domain: str) -> str:
    """What to configure by hand where systemd-resolved does not run."""
    return (
        f"add 'server=/{domain}/{server_ip}' to dnsmasq, or 'nameserver {server_ip}' as the first line of "
        f"/etc/resolv.conf (then names outside {domain} are refused there and the next nameserver answers); "
        f"or query it directly: dig @{server_ip} <node>.{domain}"
    )


def _server_arg(server_ip: str, port: int) -> str:
    try:
        ip = ipaddress.ip_address(server_ip)
    except ValueError:
        raise ConfigError(f"mesh DNS server {server_ip!r} is not an IP address") from None
    if port == 53:
        return str(ip)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"  # resolvectl >= 246 syntax


@dataclass(slots=True)
class ResolvedRegistration:
    """A link configured in systemd-resolved; :meth:`revert` undoes it."""

    interface: str
    server: str
    domain: str
    runner: Runner = run_command

    def revert(self) -> None:
        """``resolvectl revert <if>``. Never raises: it runs on shutdown, when the link may be gone."""
        argv = ["resolvectl", "revert", self.interface]
        try:
            result = self.runner(argv)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("event=dns_resolved_revert_failed interface=%s error=%r", self.interface, e)
            return
        if result.returncode != 0:
            log.warning(
                "event=dns_resolved_revert_failed interface=%s error=%r",
                self.interface,
                (result.stderr or "").strip(),
            )
            return
        log.info("event=dns_resolved_reverted interface=%s", self.interface)


def register_with_resolved(
    interface: str,
    server_ip: str,
    domain: str,
    *,
    port: int = 53,
    search_domains: Sequence[str] = (),
    runner: Runner = run_command,
    run_dir: Path = RESOLVED_RUN_DIR,
) -> ResolvedRegistration | None:
    """Make systemd-resolved send ``<anything>.<domain>`` to ``server_ip`` over ``interface``.

    Returns the registration (call ``revert()`` on shutdown), or None where resolved is not running (a
    warning, logged once per process, says what to do instead). Raises :class:`ResolvedError` if resolved
    refuses the server or the domain; the link is reverted first, so nothing is left half-configured.
    """
    global _fallback_logged
    try:
        name_from_text(domain)
    except ValueError as e:
        raise ConfigError(f"mesh domain {domain!r} cannot be registered with systemd-resolved: {e}") from None
    server = _server_arg(server_ip, port)
    if not resolved_running(runner=runner, run_dir=run_dir):
        if not _fallback_logged:
            _fallback_logged = True
            log.warning(
                "event=dns_resolved_absent interface=%s server=%s domain=%s hint=%r",
                interface,
                server,
                domain,
                fallback_hint(server_ip, domain),
            )
        return None
    reg = ResolvedRegistration(interface, server, domain, runner)
    required = (
        ["resolvectl", "dns", interface, server],
        ["resolvectl", "domain", interface, f"~{domain.rstrip('.')}", *search_domains],
    )
    for argv in required:
        failure = _run(runner, argv)
        if failure is not None:
            reg.revert()
            raise ResolvedError(
                f"`{' '.join(argv)}` failed: {failure}; mesh names will not resolve through systemd-resolved "
                f"(query {server} directly, see docs/dns.md)"
            )
    # Only the mesh domain goes to us; older resolvectl (< 240) lacks the verb, and then ~domain alone
    # already keeps the link off the default route.
    optional = ["resolvectl", "default-route", interface, "false"]
    failure = _run(runner, optional)
    if failure is not None:
        log.warning("event=dns_resolved_default_route_failed interface=%s error=%r", interface, failure)
    log.info("event=dns_resolved_registered interface=%s server=%s domain=~%s", interface, server, domain)
    return reg


def _run(runner: Runner, argv: Sequence[str]) -> str | None:
    """None on success, else what went wrong."""
    try:
        result = runner(argv)
    except (OSError, subprocess.TimeoutExpired) as e:
        return repr(e)
    if result.returncode != 0:
        return (result.stderr or result.stdout or f"exit status {result.returncode}").strip()
    return None
