"""`tunnelmesh demo [--check]`: the demo world of tunnelmesh/demo.py, live or as a pass/fail check."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from types import FrameType

import click

from tunnelmesh.demo import CheckResult, DemoError, check_world, demo_world, run_live, start_world
from tunnelmesh.errors import TunnelMeshError


@click.command("demo")
@click.option(
    "--check", is_flag=True, help="Non-interactive: run every check, print PASS/FAIL, exit 1 on a FAIL."
)
@click.option(
    "--timeout",
    type=float,
    default=180.0,
    show_default=True,
    help="Global deadline in seconds for building the world and (with --check) passing every check.",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where data dirs, state dirs and logs go (default: a new temporary directory, kept on failure).",
)
def demo(check: bool, timeout: float, work_dir: Path | None) -> None:
    """Build a whole world on this machine (3 coordinators, nodes on a LAN, behind NATs and a UDP-blocking
    firewall) with network namespaces and real processes, and show it live. Needs root."""
    if os.geteuid() != 0:
        raise TunnelMeshError("`tunnelmesh demo` needs root: it creates network namespaces and TUN devices")
    signal.signal(signal.SIGTERM, _as_interrupt)  # `kill` tears the world down like Ctrl-C does
    work = work_dir or Path(tempfile.mkdtemp(prefix="tunnelmesh-demo-"))
    start = time.monotonic()
    deadline = start + timeout

    def progress(msg: str) -> None:
        click.echo(f"[{time.monotonic() - start:5.1f}s] {msg}", err=check)

    progress(f"work dir {work} (logs in {work / 'logs'})")
    failed: list[CheckResult] = []
    try:
        with demo_world(work, progress) as world:
            try:
                start_world(world, deadline)
            except DemoError as exc:
                if not check:
                    raise
                failed.append(CheckResult("build the world", False, str(exc)))
                _report(failed[-1], start)
            else:
                _report(CheckResult("build the world", True, "3 coordinators, token, nodes started"), start)
                if not check:
                    click.echo("world is up; starting the live view (Ctrl-C tears everything down)")
                    try:
                        run_live(world)
                    except KeyboardInterrupt:
                        click.echo("tearing down ...")
                        return
                else:
                    results = check_world(world, deadline, lambda r: _report(r, start))
                    failed = [r for r in results if not r.ok]
                    click.echo(f"{len(results) - len(failed)}/{len(results)} checks passed")
    except KeyboardInterrupt:
        click.echo("tearing down ...")
        return
    if failed:
        click.echo(f"FAIL: logs and state kept in {work}")
        raise click.exceptions.Exit(1)
    if check:
        click.echo(f"demo --check: PASS in {time.monotonic() - start:.0f}s")
    if work_dir is None:
        shutil.rmtree(work, ignore_errors=True)


def _report(r: CheckResult, start: float) -> None:
    mark = "PASS" if r.ok else "FAIL"
    click.echo(f"[{time.monotonic() - start:5.1f}s] {mark} {r.name}: {r.reason}")


def _as_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
