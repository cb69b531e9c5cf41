"""Joining is explicit: a coordinator with an empty data dir and nothing to join refuses to start (no
accidental second cluster); with ``--mdns`` and the join secret it finds a member on the LAN and joins as a
learner (and stays one while promoting it would make the number of voters even). A member restarted on other
addresses makes the others use them; the join secret rotates by rolling restart; a learner replaces a voter
that stays silent past ``--dead-voter-timeout``. Needs root; about 65 s."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.integration.coordlab import CoordLab
from tunnelmesh.netlab import Lab

SCRAPE = (
    "import sys, urllib.request as u\n"
    "print(u.urlopen(f'http://{sys.argv[1]}:8080/metrics', timeout=10).read().decode())"
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="netlab needs root to create network namespaces"),
    pytest.mark.timeout(90),
]


def test_empty_data_dir_without_bootstrap_refuses_and_mdns_join_adds_a_learner(tmp_path: Path) -> None:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        cl = CoordLab(lab, tmp_path)
        lonely = cl.add("lonely")
        proc = lonely.start()
        assert proc.wait(20) == 1
        assert "--bootstrap" in proc.log_text() and "no coordinator to join" in proc.log_text()
        assert not (lonely.data_dir / "raft").exists()

        c1 = cl.add()
        c1.start("--bootstrap", "--mdns")
        c1.wait_serving()
        c2 = cl.add()
        secret = (c1.data_dir / "join-secret").read_text().strip()
        c2.start("--mdns", "--join-secret", secret)
        c2.wait_serving(timeout=30)
        st = cl.wait_for(
            lambda s: s["learners"] == [c2.member_id], timeout=20, what="c2 as a learner", via=[c1]
        )
        assert st["voters"] == [c1.member_id]  # 2 voters would tolerate no more failures than 1
        assert cl.ops(c2, [["put", "k", "v"], ["get", "k"]])[1]["value"] == "v"
        # c2 announces itself on the LAN only once it is a member: nobody joins through a non-member.
        assert c2.proc is not None
        c2.proc.wait_for_log(rf"event=discovery_started mdns=on .*member={c2.member_id}", timeout=20)
        text = c2.log()
        announced = re.search(rf"event=discovery_started mdns=on .*member={c2.member_id}", text)
        assert announced is not None and text.index("event=joined") < announced.start()


def test_a_member_restarted_on_other_ports_is_reached_there(tmp_path: Path) -> None:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        cl = CoordLab(lab, tmp_path)
        cl.start_cluster(3)
        leader = cl.leader()
        mover = next(c for c in cl.coords if c is not leader)
        others = [c for c in cl.coords if c is not mover]
        mover.stop()
        mover.api_port, mover.raft_port = 9443, 9444
        mover.start()
        mover.wait_serving()
        # The leader replicates to the new Raft address: a write through the others reaches the mover.
        assert "error" not in cl.ops(others, [["put", "moved", "yes"]])[0]
        st = cl.wait_for(
            lambda s: s["api"].get(mover.member_id) == mover.api,
            timeout=30,
            what="the new API address in the membership",
            via=others,
        )
        assert sorted(st["voters"]) == sorted(c.member_id for c in cl.coords)
        for _ in range(100):
            got = cl.ops(mover, [["sget", "moved"]])[0]
            if got.get("found"):
                break
        assert got.get("value") == "yes", got
        assert "event=member_addresses_updated" in "".join(c.all_logs() for c in others)


def test_rotating_the_join_secret_by_rolling_restart(tmp_path: Path) -> None:
    """The documented rotation: new secret into every coordinator's data dir, restart them one at a time."""
    with Lab(log_dir=tmp_path / "netlab") as lab:
        cl = CoordLab(lab, tmp_path)
        cl.start_cluster(3)
        old = cl.join_secret()
        new = "rotated-" + "x" * 32
        for c in list(cl.coords):
            (c.data_dir / "join-secret").write_text(new + "\n")
            c.stop()
            c.start()
            c.wait_serving()
            cl.wait_for(lambda s: s.get("leader") and len(s["voters"]) == 3, timeout=30, what="a leader")
        refused = cl.add()
        proc = refused.start("--seed", cl.coords[0].api, "--join-secret", old)
        assert proc.wait(30) == 1
        assert "wrong secret" in proc.log_text(), proc.log_text()[-2000:]
        joiner = cl.add()
        joiner.start("--seed", cl.coords[1].api, "--join-secret", new)
        joiner.wait_serving()
        cl.wait_for(
            lambda s: joiner.member_id in s["learners"] + s["voters"], timeout=30, what="the joiner, a member"
        )


def test_a_caught_up_learner_takes_the_place_of_a_voter_silent_past_the_timeout(tmp_path: Path) -> None:
    timeout = 8.0  # coord.dead_voter_timeout here (default 5m)
    flag = ("--dead-voter-timeout", f"{timeout:g}s")
    with Lab(log_dir=tmp_path / "netlab") as lab:
        cl = CoordLab(lab, tmp_path)
        cl.start_cluster(3, *flag)
        leader = cl.leader()
        dead = next(c for c in cl.coords if c is not leader)
        dead_id = dead.member_id
        dead.kill()
        killed = time.monotonic()
        live = [c for c in cl.coords if c is not dead]
        spare = cl.add()
        spare.start("--seed", leader.api, "--join-secret", cl.join_secret(), *flag)
        spare.wait_serving(timeout=30)
        live.append(spare)
        st = cl.wait_for(
            lambda s: spare.member_id in s["learners"], timeout=20, what="the new one as a learner", via=live
        )
        waited = time.monotonic() - killed
        assert waited < timeout - 1.0, (
            f"the check below needs the learner in place before the timeout ({waited})"
        )
        assert dead_id in st["voters"]  # silent, but not for long enough yet
        st = cl.wait_for(
            lambda s: sorted(s["voters"]) == sorted(c.member_id for c in live) and not s["learners"],
            timeout=30,
            what="the new one a voter in the silent one's place",
            via=live,
        )
        assert time.monotonic() - killed >= timeout
        assert re.search(rf"event=dead_voter_removed member={dead_id.lstrip('0')} ", leader.log()), (
            leader.log()
        )
        metrics = cl.client.run([sys.executable, "-c", SCRAPE, leader.host.ip], timeout=20).stdout
        assert "tunnelmesh_coord_dead_voters_removed_total 1.0" in metrics
        res = cl.ops(live, [["put", "after", "yes"], ["get", "after"]])
        assert res[1]["value"] == "yes", res
        # The removed coordinator, started again, learns it was removed and stops (exit 0: no restart loop).
        proc = dead.start()
        assert proc.wait(30) == 0
        assert "event=coordinator_removed" in proc.log_text()
