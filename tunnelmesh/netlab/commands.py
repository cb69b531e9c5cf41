"""Running the system tools netlab is built on (`ip`, `nft`) with deadlines and readable failures."""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
from collections.abc import Sequence

from tunnelmesh.netlab.errors import NetlabError

# Setting up one interface or ruleset takes milliseconds; this only catches a wedged tool.
DEFAULT_TIMEOUT = 10.0

_BATCH_FAILED = re.compile(r"Command failed -:(\d+)")
log = logging.getLogger(__name__)


def run_tool(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion; raise `NetlabError` naming the command and its stderr if it fails."""
    cmd = shlex.join(argv)
    log.debug("event=netlab_command argv=%r", cmd)
    try:
        done = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError as exc:
        raise NetlabError(
            f"`{cmd}` failed: {argv[0]} is not installed (netlab needs iproute2 and nftables; "
            "see scripts/install-system-deps)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise NetlabError(f"`{cmd}` did not finish within {timeout:g}s") from exc
    if check and done.returncode != 0:
        raise NetlabError(_failure_message(cmd, done, input))
    return done


def _failure_message(cmd: str, done: subprocess.CompletedProcess[str], input: str | None) -> str:
    detail = (done.stderr or done.stdout or "").strip() or "no output"
    msg = f"`{cmd}` failed (exit {done.returncode}): {detail}"
    if input is not None:
        # `ip -batch` reports only a line number; show that line so the message stands on its own.
        match = _BATCH_FAILED.search(detail)
        lines = input.splitlines()
        if match and 0 < int(match.group(1)) <= len(lines):
            msg += f" [failing line: {lines[int(match.group(1)) - 1]!r}]"
    return msg


def ip_batch(netns: str, commands: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Run several `ip` commands inside `netns` with one process (`ip -n NS -batch -`)."""
    if commands:
        run_tool(["ip", "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n", timeout=timeout)
