"""The standalone data plane's control socket: how ``dataplane show``, ``reload`` and ``down`` reach ``up``.

One UNIX stream socket per interface, ``<run dir>/<iface>.sock`` (run dir ``/run/tunnelmesh``, or
``$TUNNELMESH_RUN_DIR``), created mode 0600 in a 0700 directory: only root (the owner) can talk to it, as
with wireguard-go's ``/var/run/wireguard/<iface>.sock``. The protocol is one JSON object per line each way:

    -> {"cmd": "show"}      <- {"ok": true, "status": {...DataPlane.status()...}}
    -> {"cmd": "reload"}    <- {"ok": true, "result": {...}}   (``up`` re-reads its config file)
    -> {"cmd": "down"}      <- {"ok": true}            (the engine then stops)

Anything else gets ``{"ok": false, "error": "..."}``. Every read and write on either side has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from tunnelmesh.errors import TunnelMeshError
from tunnelmesh.node.errors import DataplaneError

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR: Final = "/run/tunnelmesh"
IO_TIMEOUT: Final = 5.0
MAX_REQUEST: Final = 4096
MAX_RESPONSE: Final = 16 << 20


def run_dir() -> Path:
    return Path(os.environ.get("TUNNELMESH_RUN_DIR", DEFAULT_RUN_DIR))


def socket_path(iface: str) -> Path:
    return run_dir() / f"{iface}.sock"


def dns_marker_path(iface: str) -> Path:
    """Exists while ``iface``'s DNS record is (or may be) set: an ``up`` that dies leaves it behind, so that
    ``down`` (or the next ``up``) can take the record back."""
    return run_dir() / f"{iface}.dns"


def is_running(iface: str) -> bool:
    """Whether an ``up`` process answers on ``iface``'s control socket."""
    path = socket_path(iface)
    return path.exists() and _answers(path)


def list_interfaces() -> list[str]:
    d = run_dir()
    if not d.is_dir():
        return []
    return sorted(p.name[: -len(".sock")] for p in d.glob("*.sock"))


class ControlServer:
    """Serves ``show``/``reload``/``down`` for one interface on a background thread. ``reload`` returns what
    it changed or raises ``TunnelMeshError`` (the message goes back to the caller); without one (the mesh
    node agent, whose peers come from the coordinators) the request is refused."""

    def __init__(
        self,
        iface: str,
        status: Callable[[], dict[str, Any]],
        down: Callable[[], None],
        reload: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.path = socket_path(iface)
        self._status = status
        self._down = down
        self._reload = reload
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ControlServer:
        d = self.path.parent
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists():
            if _answers(self.path):
                raise DataplaneError(
                    f"{self.path}: another `tunnelmesh dataplane up` is running for this interface; "
                    f"stop it with `tunnelmesh dataplane down {self.path.stem}`"
                )
            self.path.unlink()  # stale: its process died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise DataplaneError(f"cannot create control socket {self.path}: {exc.strerror}") from exc
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(8)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name=f"control-{self.path.stem}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(IO_TIMEOUT)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(IO_TIMEOUT)
                try:
                    self._handle(conn)
                except (OSError, ValueError) as exc:
                    log.debug("event=control_request_failed error=%r", str(exc))

    def _do_reload(self) -> dict[str, Any]:
        if self._reload is None:
            return {
                "ok": False,
                "error": "this interface is run by the mesh node agent: its peers come from the "
                "coordinators, not from a file",
            }
        try:
            return {"ok": True, "result": self._reload()}
        except TunnelMeshError as exc:
            return {"ok": False, "error": str(exc)}

    def _handle(self, conn: socket.socket) -> None:
        line = _read_line(conn, MAX_REQUEST)
        try:
            req = json.loads(line)
            cmd = req.get("cmd") if isinstance(req, dict) else None
        except json.JSONDecodeError:
            cmd = None
        after: Callable[[], None] | None = None
        if cmd == "show":
            resp: dict[str, Any] = {"ok": True, "status": self._status()}
        elif cmd == "down":
            resp, after = {"ok": True}, self._down
        elif cmd == "reload":
            resp = self._do_reload()
        else:
            resp = {"ok": False, "error": 'unknown request; expected {"cmd": "show"|"reload"|"down"}'}
        conn.sendall(json.dumps(resp).encode() + b"\n")
        if after is not None:
            after()


def _read_line(conn: socket.socket, limit: int) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError(f"message longer than {limit} bytes")
    return data.split(b"\n", 1)[0]


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def request(iface: str, cmd: str, *, timeout: float = IO_TIMEOUT) -> dict[str, Any]:
    """Send one request to the ``up`` process serving ``iface``; raises DataplaneError if it is not there."""
    path = socket_path(iface)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            line = _read_line(s, MAX_RESPONSE)
        except FileNotFoundError:
            raise DataplaneError(
                f"interface {iface!r} is not running (no {path}); start it with "
                f"`tunnelmesh dataplane up --config FILE`"
            ) from None
        except PermissionError:
            raise DataplaneError(f"{path}: permission denied; run as root") from None
        except (OSError, ValueError) as exc:
            raise DataplaneError(f"{path}: no answer from the data plane: {exc}") from None
    try:
        resp: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError:
        raise DataplaneError(f"{path}: unreadable answer from the data plane") from None
    if not resp.get("ok"):
        raise DataplaneError(f"{path}: {resp.get('error', 'request failed')}")
    return resp
