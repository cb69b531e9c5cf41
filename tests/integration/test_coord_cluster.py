"""A 3-coordinator cluster of real processes in a netlab LAN: formation, failover, partitions, mutual TLS,
full restart. What a user observes: acknowledged writes are never lost and a new leader takes over quickly.

The scenarios share one cluster (building it costs ~10 s) and run in file order; each leaves the cluster
healthy with three voters for the next. Needs root. About 60 s on two cores.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.coordlab import CoordLab, coord_argv
from tunnelmesh.netlab import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="netlab needs root to create network namespaces"),
    pytest.mark.timeout(120),
]

SCRAPE = (
    "import sys, urllib.request as u\n"
    "for host in sys.argv[1:]: print(u.urlopen(f'http://{host}:8080/metrics', timeout=10).read().decode())"
)
FAILOVER_BUDGET = 2.0  # seconds from kill -9 of the leader to a new leader, at default timers (100 ms ticks)


@pytest.fixture(scope="module")
def cl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordLab]:
    tmp = tmp_path_factory.mktemp("coordcluster")
    with Lab(log_dir=tmp / "netlab") as lab:
        c = CoordLab(lab, tmp)
        # Frequent snapshots, so that compaction and InstallSnapshot run in every scenario (a restarted
        # coordinator whose log position was compacted away catches up from a snapshot).
        c.start_cluster(3, "--snapshot-entries", "64")
        yield c


def test_cluster_forms_and_writes_through_any_member_land_everywhere(cl: CoordLab) -> None:
    st = cl.status()
    assert len(st["voters"]) == 3 and st["learners"] == []
    puts = [["put", f"via-{c.name}", f"v{i}", {"via": c.api}] for i, c in enumerate(cl.coords)]
    assert all(r.get("revision", 0) > 0 for r in cl.ops(cl.coords, puts))
    # Linearizable reads on every member, then a stale read: each replica has applied every write.
    gets = [
        [*(["get", f"via-{o.name}", {"via": c.api}] for o in cl.coords), ["sget", "via-c1", {"via": c.api}]]
        for c in cl.coords
    ]
    got = cl.ops(cl.coords, [op for per in gets for op in per])
    values = [g.get("value") for g in got]
    assert values == ["v0", "v1", "v2", "v0"] * 3, got
    # Every coordinator's /metrics: one leader, every member knows it, the disk latency histogram is fed.
    text = cl.client.run([sys.executable, "-c", SCRAPE, *(c.host.ip for c in cl.coords)], timeout=60).stdout
    lines = text.splitlines()
    assert sum(line.startswith("tunnelmesh_raft_is_leader{") and line.endswith(" 1.0") for line in lines) == 1
    has_leader = [line for line in lines if line.startswith("tunnelmesh_raft_has_leader{")]
    assert len(has_leader) == 3 and all(line.endswith(" 1.0") for line in has_leader), has_leader
    saves = [line for line in lines if line.startswith("tunnelmesh_raft_storage_save_seconds_count ")]
    assert len(saves) == 3 and all(float(line.split()[-1]) > 0 for line in saves), saves
    # `tunnelmesh cluster status` from the leader: every member's lag behind the commit index, and when each
    # follower last answered.
    leader = cl.leader()
    out = cl.client.run(coord_argv("cluster", "status", "-c", leader.api), timeout=60, env=cl.client_env())
    table = out.stdout.splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("MEMBER"))
    assert table[head].split()[:8] == ["MEMBER", "NAME", "ROLE", "LEADER", "HEALTHY", "LAG", "CONTACT", "API"]
    rows = [line.split() for line in table[head + 1 :] if line.strip()]
    assert len(rows) == 3, out.stdout
    for row in rows:
        is_leader = row[3] == "*"  # the LEADER column is blank on the other rows
        healthy, lag, contact = row[4:7] if is_leader else row[3:6]
        assert healthy == "yes" and lag.isdigit() and int(lag) < 50, out.stdout  # idle cluster: caught up
        assert contact == "-" if is_leader else float(contact.rstrip("s")) < 5, out.stdout
    assert sum(row[3] == "*" for row in rows) == 1
    # The health check asked through a follower shows (and judges) the leader's view.
    follower = next(c for c in cl.coords if c is not leader)
    check = cl.client.run(
        coord_argv("cluster", "status", "--check", "-c", follower.api), timeout=60, env=cl.client_env()
    )
    assert f"serving   {leader.member_id}" in check.stdout and "LAG" in check.stdout, check.stdout


def test_kill_leader_new_leader_within_2s_and_no_acknowledged_write_lost(
    cl: CoordLab, tmp_path: Path
) -> None:
    old = cl.leader()
    old_term = cl.status(old)["term"]
    out = tmp_path / "writer.json"
    writer = cl.spawn_writer(cl.coords, seconds=6.0, out=out)
    writer.wait_for_log("first write acknowledged", timeout=20)
    time.sleep(1.0)
    killed_at = time.time()
    old.kill()
    try:
        writer.wait(30)
        survivors = [c for c in cl.coords if c is not old]
        new = cl.leader(via=survivors)
        assert new is not old
        elected = [
            t
            for c in survivors
            for (t, term, lead) in c.leader_events()
            if term > old_term and lead != old.member_id
        ]
        assert elected, "no survivor logged event=leader_elected for a new leader"
        failover = min(elected) - killed_at
        print(f"\nleader failover: {failover * 1000:.0f} ms (kill -9 -> event=leader_elected on a survivor)")
        assert failover < FAILOVER_BUDGET, f"new leader after {failover:.2f}s"

        acks = [k for k, _ in json.loads(out.read_text())["acks"]]
        assert len(acks) > 20, f"writer made little progress: {len(acks)} acks"
        assert cl.missing(new, acks) == [], "acknowledged writes were lost"
    finally:
        old.start()  # back as a follower on its data dir (also after a failed check: later tests need it)
        old.wait_serving()
    cl.wait_for(lambda s: s["leader"] and len(s["voters"]) == 3, timeout=15, what="3 voters again")
    assert cl.missing(old, acks[-5:]) == []
    assert "event=raft_snapshot_created" in new.all_logs()


def test_a_rolling_restart_under_write_load_fails_no_write(cl: CoordLab, tmp_path: Path) -> None:
    """`systemctl restart` of one coordinator after another (SIGTERM, start, wait until caught up) while a
    client writes through all of them: the leader hands leadership over before it stops, and a write in
    flight on a stopping coordinator is answered UNAVAILABLE, so the client retries it elsewhere with its
    request id. Not one write fails, none is lost."""
    out = tmp_path / "writer.json"
    writer = cl.spawn_writer(cl.coords, seconds=12.0, out=out)
    writer.wait_for_log("first write acknowledged", timeout=20)
    leader_first = sorted(cl.coords, key=lambda c: c is not cl.leader())
    restarted_at = []
    for c in leader_first:
        time.sleep(0.5)
        assert c.proc is not None and c.proc.stop() == 0, c.log()[-2000:]
        if c is leader_first[0]:  # the leader handed over before it stopped, rather than leave an election
            handover = re.search(r"event=leadership_handover to=[0-9a-f]{16} moved=true", c.log())
            assert handover, c.log()[-3000:]
        restarted_at.append(time.time())
        c.start()
        c.wait_serving()
        cl.wait_for(lambda s: s["leader"] and len(s["voters"]) == 3, timeout=15, what="3 voters again")
    writer.wait(40)
    res = json.loads(out.read_text())
    acks = [k for k, _ in res["acks"]]
    assert res["failed"] == [], f"writes failed during the rolling restart: {res['failed']}"
    after_leader = [k for k, t in res["acks"] if t > restarted_at[0]]
    assert len(after_leader) > 20, f"writes did not carry on after the leader stopped: {len(after_leader)}"
    assert cl.missing(cl.leader(), acks) == [], "acknowledged writes were lost"
    for c in cl.coords:  # every start: a stopping coordinator's log counts most
        assert "Traceback" not in c.all_logs(), c.all_logs()[-3000:]


def test_partitioned_leader_stops_accepting_writes_majority_elects_and_heal_makes_it_follow(
    cl: CoordLab,
) -> None:
    lead = cl.leader()
    others = [c for c in cl.coords if c is not lead]
    term0 = cl.status(lead)["term"]
    with cl.lab.partition([lead.host], [o.host for o in others]):
        # The client still reaches the old leader: it must not acknowledge a write it cannot commit.
        res = cl.ops(lead, [["put", "minority", "x", {"deadline": 2.5}]])[0]
        assert "error" in res, f"isolated leader acknowledged a write: {res}"
        new = cl.leader(via=others)
        assert new is not lead
        assert "error" not in cl.ops(others, [["put", "majority", "m1"]])[0]
    # Heal: the old leader learns the new term and follows.
    st = cl.wait_for(
        lambda s: s["member"] == lead.member_id and s["leader"] and s["leader"] != lead.member_id,
        timeout=10,
        what="old leader following",
        via=[lead],
    )
    assert st["term"] > term0
    assert cl.ops(lead, [["get", "majority"], ["get", "minority"]]) == [
        {"found": True, "value": "m1", "revision": cl.ops(lead, [["get", "majority"]])[0]["revision"]},
        {"found": False, "value": "", "revision": 0},
    ]


_FOREIGN = textwrap.dedent(
    """
    import sys, grpc
    from tunnelmesh import pki
    from tunnelmesh.api.raft.v1 import raft_pb2, raft_pb2_grpc
    target, cluster, to_id, ca_dir = sys.argv[1], sys.argv[2], int(sys.argv[3], 16), sys.argv[4]
    ca = pki.load_ca(ca_dir) if ca_dir != "-" else pki.create_ca(cluster)
    member = "00000000000000aa"
    ident = pki.issue_coordinator_identity(ca, cluster, member)
    creds = pki.channel_credentials(ca.certificate_pem, ident)
    with grpc.secure_channel(target, creds, options=pki.coordinator_channel_options(cluster)) as ch:
        hb = raft_pb2.RaftEnvelope(append_entries=raft_pb2.AppendEntriesRequest(term=999, heartbeat=True))
        hdr = raft_pb2.RaftHeader(cluster_id=cluster, from_id=int(sys.argv[5], 16), to_id=to_id)
        try:
            raft_pb2_grpc.RaftStub(ch).Send(raft_pb2.MessageBatch(header=hdr, messages=[hb]), timeout=3)
            print("ACCEPTED")
        except grpc.RpcError as e:
            print(e.code().name)
    """
)


def test_process_with_certificates_from_another_ca_is_refused(cl: CoordLab) -> None:
    target = cl.coords[0]
    st0 = cl.status(target)
    cluster = st0["cluster"]

    def attempt(ca_dir: str, from_id: str) -> str:
        argv = [sys.executable, "-c", _FOREIGN, target.raft, cluster, target.member_id, ca_dir, from_id]
        return cl.client.run(argv, timeout=20).stdout.strip()

    # Another CA (even with the same cluster id): refused in the TLS handshake.
    assert attempt("-", "aa") == "UNAVAILABLE"
    # The cluster's CA but a certificate for another member id than the one it claims: refused by the server.
    assert attempt(str(target.data_dir), cl.coords[1].member_id) == "PERMISSION_DENIED"
    # Nothing was disturbed: no term 999.
    assert cl.status(target)["term"] == st0["term"]


_REJOIN = textwrap.dedent(
    """
    import sys, grpc
    from tunnelmesh import pki
    from tunnelmesh.api.raft.v1 import raft_pb2, raft_pb2_grpc
    target, cluster, ca_dir, member = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    ca = pki.load_ca(ca_dir)
    ident = pki.issue_coordinator_identity(ca, cluster, member)
    creds = pki.channel_credentials(ca.certificate_pem, ident)
    mid = int(member, 16)
    with grpc.secure_channel(target, creds, options=pki.coordinator_channel_options(cluster)) as ch:
        req = raft_pb2.JoinRequest(
            header=raft_pb2.RaftHeader(cluster_id=cluster, from_id=mid, to_id=0),
            member=raft_pb2.Member(member_id=mid, name="wiped", raft_address="10.77.0.99:8444",
                                   storage_id="a-new-data-dir"),
        )
        try:
            raft_pb2_grpc.RaftStub(ch).Join(req, timeout=10)
            print("ACCEPTED")
        except grpc.RpcError as e:
            print(e.code().name)
    """
)


def test_a_wiped_coordinator_cannot_rejoin_under_its_old_member_id(cl: CoordLab) -> None:
    # Someone holding the cluster CA (any coordinator's data dir) mints a certificate for an existing member's
    # id and asks to join with a fresh data dir: the storage id the member joined with does not match.
    target, victim = cl.coords[0], cl.coords[2]
    cluster = cl.status(target)["cluster"]
    argv = [sys.executable, "-c", _REJOIN, target.raft, cluster, str(target.data_dir), victim.member_id]
    assert cl.client.run(argv, timeout=30).stdout.strip() == "PERMISSION_DENIED"
    assert len(cl.status(target)["voters"]) == 3


def test_restart_every_coordinator_at_once_keeps_state(cl: CoordLab) -> None:
    keys = [f"r{i}" for i in range(20)]
    res = cl.ops(cl.coords, [["put", k, k.upper()] for k in keys])
    assert all("error" not in r for r in res), res
    for c in cl.coords:
        c.kill()
    for c in cl.coords:
        c.start()
    for c in cl.coords:
        c.wait_serving()
    cl.wait_for(lambda s: s["leader"] and len(s["voters"]) == 3, timeout=20, what="leader after full restart")
    for c in cl.coords:
        got = cl.ops(c, [["get", k] for k in keys])
        assert [g.get("value") for g in got] == [k.upper() for k in keys], c.name


def test_a_restarted_coordinator_reports_started_only_once_caught_up(cl: CoordLab, tmp_path: Path) -> None:
    """Type=notify: a coordinator sends READY=1 once it has applied what its cluster committed, so a rolling
    `systemctl restart` waits for it. Restarted alone, with the other two down, it has no quorum to catch up
    through and stays "starting"; a second member back makes a quorum, and READY=1 follows, at an index that
    covers every write made while it was down, which its own (stale) reads then serve. STOPPING=1 on stop; the
    watchdog (WatchdogSec) is pinged all along."""
    c1, c2, c3 = cl.coords
    keys = [f"late{i}" for i in range(30)]
    c3.stop()
    res = cl.ops([c1, c2], [["put", k, "v"] for k in keys])
    assert all("error" not in r for r in res), res
    last_write = max(r["revision"] for r in res)
    c1.stop()
    c2.stop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))

        watchdog_pings = 0

        def heard(timeout: float) -> dict[str, str]:
            """The next notification within ``timeout`` s; the watchdog's pings in between are counted."""
            nonlocal watchdog_pings
            deadline = time.monotonic() + timeout
            while True:
                manager.settimeout(max(0.01, deadline - time.monotonic()))
                data = manager.recv(4096).decode()
                if data != "WATCHDOG=1":
                    return dict(line.split("=", 1) for line in data.split("\n"))
                watchdog_pings += 1

        c3.start(env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000"})
        c3.wait_serving()
        with pytest.raises(TimeoutError):
            heard(3.0)  # serving, but not caught up: no quorum
        check = cl.client.run(
            coord_argv("cluster", "status", "--check", "-c", c3.api),
            timeout=60,
            env=cl.client_env(),
            check=False,
        )
        assert check.returncode == 1
        assert "error: cluster unhealthy: no leader (an election in progress, or no quorum)" in check.stderr
        c1.start()
        ready = heard(30.0)
        assert ready["READY"] == "1"
        status = re.fullmatch(r".* serving on \S+; caught up to index (\d+)", ready["STATUS"])
        assert status is not None, ready
        assert int(status.group(1)) >= last_write
        got = cl.ops(c3, [["sget", k] for k in keys])
        assert [g.get("value") for g in got] == ["v"] * len(keys)
        c3.stop()
        assert heard(10.0)["STOPPING"] == "1"
    assert watchdog_pings >= 6  # WatchdogSec=1: every half second, from the start, without a quorum too
    for c in (c2, c3):
        c.start()
    for c in cl.coords:
        c.wait_serving()
    cl.wait_for(lambda s: s["leader"] and len(s["voters"]) == 3, timeout=20, what="all three back")
