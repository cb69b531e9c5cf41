"""Processes running inside a lab node, with their output captured to a log file.

A process is started with `ip netns exec` (which also remounts /sys for the namespace, so tools that read
/sys/class/net see the node's interfaces) in a new session, so stopping it also stops anything it forked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tunnelmesh.netlab.errors import NetlabError

log = logging.getLogger(__name__)

Argv = str | Sequence[str]

# How often waits re-check a process or its log; short enough not to slow tests down.
_POLL_INTERVAL = 0.02
_LOG_TAIL_CHARS = 2000


def normalize_argv(argv: Argv) -> list[str]:
    """A command as a list; a string is split like a shell would (no shell runs)."""
    args = shlex.split(argv) if isinstance(argv, str) else list(argv)
    if not args:
        raise NetlabError("empty command")
    return args


def netns_exec(netns: str, argv: Argv) -> list[str]:
    return ["ip", "netns", "exec", netns, *normalize_argv(argv)]


def run_in(
    netns: str,
    argv: Argv,
    *,
    timeout: float,
    check: bool,
    input: str | None,
    env: Mapping[str, str] | None,
    where: str,
) -> subprocess.CompletedProcess[str]:
    """Run a short command inside `netns` to completion (see `Node.run`)."""
    args = normalize_argv(argv)
    cmd = shlex.join(args)
    proc = subprocess.Popen(
        netns_exec(netns, args),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_merged_env(env),
        # Own process group: on timeout the whole group dies, including anything the command left behind
        # holding its output pipes open (which would otherwise keep us waiting).
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise NetlabError(f"`{cmd}` on {where} did not finish within {timeout:g}s") from exc
        raise
    done = subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)
    if check and done.returncode != 0:
        detail = (stderr or "").strip() or (stdout or "").strip() or "no output"
        raise NetlabError(f"`{cmd}` on {where} failed (exit {done.returncode}): {detail}")
    return done


def _merged_env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if env is None else {**os.environ, **env}


class Process:
    """A process started by `Node.spawn`. Its stdout and stderr go to `log_path`."""

    def __init__(
        self, *, name: str, where: str, argv: list[str], popen: subprocess.Popen[bytes], log_path: Path
    ):
        self.name = name
        self.where = where
        self.argv = argv
        self.log_path = log_path
        self._popen = popen

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"exited {self.returncode}"
        return f"<Process {self.name} pid={self.pid} on {self.where} {state}>"

    @classmethod
    def start(
        cls,
        netns: str,
        argv: Argv,
        *,
        name: str,
        where: str,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> Process:
        args = normalize_argv(argv)
        with open(log_path, "ab") as logf:
            try:
                popen = subprocess.Popen(
                    netns_exec(netns, args),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=_merged_env(env),
                    cwd=cwd,
                    # Own session: stop() signals the whole group, including anything the command forks.
                    start_new_session=True,
                )
            except OSError as exc:
                raise NetlabError(f"cannot start `{shlex.join(args)}` on {where}: {exc}") from exc
        proc = cls(name=name, where=where, argv=args, popen=popen, log_path=log_path)
        log.info(
            "event=netlab_process_started node=%s name=%s pid=%d log=%s", where, name, popen.pid, log_path
        )
        return proc

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once it has exited (negative: killed by that signal), else None."""
        return self._popen.poll()

    @property
    def running(self) -> bool:
        return self.returncode is None

    def log_text(self) -> str:
        """Everything the process has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self) -> str:
        text = self.log_text()
        return text[-_LOG_TAIL_CHARS:] if text else "(log is empty)"

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; after `timeout` s raise `NetlabError` (it goes on)."""
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise NetlabError(
                f"{self.name} (pid {self.pid}) on {self.where} still running after {timeout:g}s; "
                f"log {self.log_path} ends with:\n{self._tail()}"
            ) from None

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until the log matches regex `pattern`; raise if the process exits first or time runs out."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if self.returncode is not None:
                raise NetlabError(
                    f"{self.name} on {self.where} exited with {self.returncode} before its log matched "
                    f"{regex.pattern!r}; log {self.log_path}:\n{self._tail()}"
                )
            if time.monotonic() >= deadline:
                raise NetlabError(
                    f"{self.name} on {self.where}: log did not match {regex.pattern!r} within {timeout:g}s; "
                    f"log {self.log_path}:\n{self._tail()}"
                )
            time.sleep(_POLL_INTERVAL)

    def signal(self, sig: int) -> None:
        """Send `sig` to the process group (the process and whatever it forked)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` s. Returns the exit status."""
        if self.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "event=netlab_process_kill node=%s name=%s reason=sigterm_timeout", self.where, self.name
                )
        return self.kill()

    def kill(self) -> int:
        """SIGKILL the process group and reap the process (bounded wait). Returns the exit status."""
        self.signal(signal.SIGKILL)
        if self.returncode is None:
            try:
                self._popen.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                raise NetlabError(
                    f"{self.name} (pid {self.pid}) on {self.where} survived SIGKILL for 5s"
                ) from None
        # Kill leftovers of the group even when the leader has already gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        code = self._popen.returncode
        assert code is not None
        log.info(
            "event=netlab_process_stopped node=%s name=%s pid=%d returncode=%d",
            self.where,
            self.name,
            self.pid,
            code,
        )
        return code
