"""Coordinator clusters in a netlab LAN, for integration, membership and linearizability tests.

    with Lab(log_dir=tmp_path / "netlab") as lab:
        cl = CoordLab(lab, tmp_path)
        cl.start_cluster(3)                  # c1 bootstraps, c2 and c3 join through c1; waits for 3 voters
        leader = cl.leader()                 # the Coord handle of the current leader
        cl.ops(cl.coords, [["put", "k", "v"], ["get", "k"]])   # client ops from the "client" host
        leader.kill()                        # kill -9
        leader.start()                       # restart on the same data dir

Each coordinator ``cN`` is a netlab host ``10.77.0.(N+1)`` with its public API on :8443 and Raft on :8444 and
its data dir under ``tmp_path/cN``; logs are in ``lab.log_dir``. Client operations run as
``coord_ops.py`` processes on host ``client`` (gRPC cannot be pointed at a namespace from this process).
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tunnelmesh.netlab import Host, Lab, Process

OPS = Path(__file__).with_name("coord_ops.py")
LIN_CLIENT = Path(__file__).with_name("lin_client.py")
SUBNET = "10.77.0.0/24"
API_PORT = 8443
RAFT_PORT = 8444
_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def coord_argv(*args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from tunnelmesh.cli.main import main; main()",
        "--log-level",
        "info",
        *args,
    ]


@dataclass
class Coord:
    name: str
    host: Host
    data_dir: Path
    lab: CoordLab
    proc: Process | None = None
    member_id: str = ""
    starts: int = 0
    extra: list[str] = field(default_factory=list)
    api_port: int = API_PORT  # change between starts to move the coordinator
    raft_port: int = RAFT_PORT

    @property
    def api(self) -> str:
        return f"{self.host.ip}:{self.api_port}"

    @property
    def raft(self) -> str:
        return f"{self.host.ip}:{self.raft_port}"

    def start(self, *args: str, env: dict[str, str] | None = None) -> Process:
        """Start (or restart) the coordinator; ``args`` are extra flags for the first start, ``env`` more
        environment for this start."""
        if self.starts == 0:
            self.extra = list(args)
        self.starts += 1
        argv = coord_argv(
            "coord",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            self.api,
            "--raft-listen",
            self.raft,
            "--name",
            self.name,
            *self.extra,
        )
        self.proc = self.host.spawn(argv, name=f"coord{self.starts}", env=env)
        return self.proc

    def wait_serving(self, timeout: float = 20.0) -> None:
        assert self.proc is not None
        m = self.proc.wait_for_log(r"coordinator ([0-9a-f]{16}) of cluster", timeout=timeout)
        self.member_id = m.group(1)

    def kill(self) -> None:
        """kill -9."""
        if self.proc is not None and self.proc.running:
            self.proc.signal(signal.SIGKILL)
            self.proc.wait(5.0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.running:
            self.proc.stop()

    def log(self) -> str:
        return self.proc.log_text() if self.proc is not None else ""

    def all_logs(self) -> str:
        """Logs of every start of this coordinator, oldest first."""
        d = self.lab.lab.log_dir
        return "".join((d / f"{self.host.name}-coord{i}.log").read_text() for i in range(1, self.starts + 1))

    def leader_events(self) -> list[tuple[float, int, str]]:
        """(unix time, term, leader) of every event=leader_elected in this coordinator's logs."""
        out = []
        for line in self.all_logs().splitlines():
            if "event=leader_elected" not in line:
                continue
            ts = _LOG_TS.match(line)
            term = re.search(r"term=(\d+)", line)
            lead = re.search(r"leader=([0-9a-f]+)", line)
            if ts and term and lead:
                t = datetime.strptime(ts.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                out.append((t, int(term.group(1)), lead.group(1).rjust(16, "0")))
        return out


class CoordLab:
    def __init__(self, lab: Lab, tmp_path: Path, subnet: str = SUBNET) -> None:
        self.lab = lab
        self.tmp = tmp_path
        self.lan = lab.lan("coords", subnet)
        self.client = lab.host("client", self.lan)
        self.coords: list[Coord] = []

    def add(self, name: str | None = None) -> Coord:
        name = name or f"c{len(self.coords) + 1}"
        c = Coord(name, self.lab.host(name, self.lan), self.tmp / name, self)
        self.coords.append(c)
        return c

    def join_secret(self) -> str:
        return (self.coords[0].data_dir / "join-secret").read_text().strip()

    def start_cluster(self, n: int, *args: str, timeout: float = 40.0) -> list[Coord]:
        """Bootstrap c1, join the others through c1, wait until every one of them is a voter (n odd) or until
        the membership is what the promotion rule allows. ``args``: extra flags for every coordinator."""
        first = self.add()
        first.start("--bootstrap", *args)
        first.wait_serving()
        secret = self.join_secret()
        for _ in range(n - 1):
            c = self.add()
            c.start("--seed", first.api, "--join-secret", secret, *args)
        for c in self.coords[1:]:
            c.wait_serving()
        want_voters = n if n % 2 == 1 else n - 1
        self.wait_for(lambda s: len(s.get("voters", [])) == want_voters, timeout=timeout, what="voters")
        return self.coords

    # -- client side -----------------------------------------------------------------------------------------

    def client_env(self, token: str | None = None) -> dict[str, str]:
        """Environment of a client process: the cluster CA and an API token (default: the bootstrap admin
        token, from the coordinator that bootstrapped), and no profile file of the machine."""
        env = {"TUNNELMESH_PROFILE": str(self.tmp / "no-profile.json")}
        ca = next((c.data_dir / "ca.crt" for c in self.coords if (c.data_dir / "ca.crt").exists()), None)
        if ca is not None:
            env["TUNNELMESH_CA"] = str(ca)
        admin = next(
            (c.data_dir / "admin-token" for c in self.coords if (c.data_dir / "admin-token").exists()), None
        )
        if token is None and admin is not None:
            token = admin.read_text().strip()
        if token is not None:
            env["TUNNELMESH_API_TOKEN"] = token
        return env

    def ops(
        self,
        targets: list[Coord] | Coord,
        ops: list[list[Any]],
        timeout: float = 60.0,
        *,
        env: dict[str, str] | None = None,
    ) -> list[Any]:
        if isinstance(targets, Coord):
            targets = [targets]
        endpoints = ",".join(c.api for c in targets)
        argv = [sys.executable, str(OPS), endpoints, json.dumps(ops)]
        r = self.client.run(argv, timeout=timeout, env=env or self.client_env())
        return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def status(self, via: list[Coord] | Coord | None = None) -> dict[str, Any]:
        res = self.ops(via or self.running(), [["status", {"deadline": 3.0}]])[0]
        return res  # type: ignore[no-any-return]

    def running(self) -> list[Coord]:
        return [c for c in self.coords if c.proc is not None and c.proc.running]

    def wait_for(
        self, pred: Any, *, timeout: float, what: str, via: list[Coord] | None = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.status(via)
            if "error" not in last and pred(last):
                return last
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; last status {last}")

    def by_member(self, member_id: str) -> Coord:
        for c in self.coords:
            if c.member_id == member_id:
                return c
        raise KeyError(member_id)

    def leader(self, via: list[Coord] | None = None, timeout: float = 15.0) -> Coord:
        s = self.wait_for(lambda s: bool(s.get("leader")), timeout=timeout, what="a leader", via=via)
        return self.by_member(s["leader"])

    def missing(self, via: list[Coord] | Coord, keys: list[str]) -> list[str]:
        """Keys of ``keys`` a linearizable read through ``via`` does not find (``lin_client.py --read-back``:
        one channel per coordinator, reads in parallel; a read that keeps failing fails the call)."""
        if isinstance(via, Coord):
            via = [via]
        keys_file = self.tmp / f"read-back-{time.monotonic_ns()}.json"
        keys_file.write_text(json.dumps(keys))
        endpoints = ",".join(c.api for c in via)
        r = self.client.run(
            [sys.executable, str(LIN_CLIENT), endpoints, "--read-back", str(keys_file)],
            timeout=120,
            env=self.client_env(),
        )
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["read"] == len(keys) and res["errors"] == {}, f"read-back failed: {res['errors']}"
        return res["missing"]  # type: ignore[no-any-return]

    def spawn_writer(self, targets: list[Coord], seconds: float, out: Path) -> Process:
        endpoints = ",".join(c.api for c in targets)
        return self.client.spawn(
            [sys.executable, str(OPS), endpoints, "writer", str(seconds), str(out)],
            name="writer",
            env=self.client_env(),
        )
