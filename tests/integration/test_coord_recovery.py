"""Disaster recovery with real coordinator processes in netlab: a majority lost for good, the survivor forced
into a new single-member cluster (`tunnelmesh cluster force-new-cluster`), keeps every write, serves again,
ignores a lost member that comes back and grows again with a new coordinator; and every coordinator lost,
the cluster brought back from an online backup (`tunnelmesh cluster snapshot save|inspect|restore`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.coordlab import CoordLab, coord_argv
from tunnelmesh.netlab import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="netlab needs root to create network namespaces"),
    pytest.mark.timeout(180),
]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(coord_argv(*args), capture_output=True, text=True, timeout=60)


def test_force_new_cluster_brings_back_a_survivor_of_a_lost_majority(tmp_path: Path) -> None:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        cl = CoordLab(lab, tmp_path)
        cl.start_cluster(3)
        leader = cl.leader()
        survivor = next(c for c in cl.coords if c is not leader)  # any member will do; a follower here
        lost = [c for c in cl.coords if c is not survivor]
        keys = [f"k{i}" for i in range(40)]
        assert all("error" not in r for r in cl.ops(cl.coords, [["put", k, f"v-{k}"] for k in keys]))
        cl.wait_for(lambda s: s["commit"] > 0, timeout=10, what="a commit index", via=[survivor])

        for c in lost:  # the majority is gone for good
            c.kill()
        survivor.stop()
        refused = _cli("cluster", "force-new-cluster", "--data-dir", str(survivor.data_dir))
        assert refused.returncode == 2 and "--yes" in refused.stderr, refused.stderr

        done = _cli("cluster", "force-new-cluster", "--data-dir", str(survivor.data_dir), "--yes")
        assert done.returncode == 0, done.stderr
        assert "is now its only voter" in done.stdout
        for c in lost:
            assert c.member_id in done.stdout  # listed as removed

        survivor.start()
        st = cl.wait_for(
            lambda s: s.get("leader") == survivor.member_id and s["voters"] == [survivor.member_id],
            timeout=20,
            what="the survivor leading alone",
            via=[survivor],
        )
        got = cl.ops(survivor, [["get", k] for k in keys])
        assert [r.get("value") for r in got] == [f"v-{k}" for k in keys]  # every acknowledged write kept
        assert "error" not in cl.ops(survivor, [["put", "after", "recovery"]])[0]

        # A lost coordinator comes back with its old data dir: it is not a member any more. It must not
        # disturb the new cluster, and it stops by itself once the survivor refuses it as removed.
        zombie = lost[0]
        zombie.start()
        assert zombie.proc is not None
        assert zombie.proc.wait(30) == 0, zombie.log()[-2000:]
        assert "was removed from cluster" in zombie.log()
        again = cl.status(survivor)
        assert again["leader"] == survivor.member_id and again["term"] == st["term"], again
        assert "error" not in cl.ops(survivor, [["put", "still", "fine"]])[0]

        # The cluster grows again: a new coordinator joins through the survivor and gets every key.
        newcomer = cl.add()
        newcomer.start("--seed", survivor.api, "--join-secret", cl.join_secret())
        newcomer.wait_serving()
        cl.wait_for(
            lambda s: newcomer.member_id in s["voters"] + s["learners"],
            timeout=30,
            what="the newcomer in the membership",
            via=[survivor],
        )
        got = cl.ops(newcomer, [["get", k] for k in [*keys, "after"]])
        assert [r.get("value") for r in got] == [*(f"v-{k}" for k in keys), "recovery"]


def test_an_online_backup_brings_back_a_cluster_that_lost_every_coordinator(tmp_path: Path) -> None:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        cl = CoordLab(lab, tmp_path)
        cl.start_cluster(3)
        leader = cl.leader()
        taker = next(c for c in cl.coords if c is not leader)
        keys = [f"k{i}" for i in range(20)]
        assert all("error" not in r for r in cl.ops(cl.coords, [["put", k, f"v-{k}"] for k in keys]))
        backup = tmp_path / "mesh.backup"

        def save(*extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            argv = coord_argv("cluster", "snapshot", "save", str(backup), "--coord", taker.api, *extra)
            return cl.client.run(argv, env=env or cl.client_env(), timeout=60, check=False)

        # A follower serves it: after its read barrier it holds every write acknowledged before.
        saved = save()
        assert saved.returncode == 0, saved.stderr
        assert f"taken by member {taker.member_id}" in saved.stdout
        assert backup.stat().st_mode & 0o777 == 0o600  # token hashes and KV values inside
        operator = cl.client.run(
            coord_argv("tokens", "create", "--api", "--role", "operator", "--quiet", "--coord", taker.api),
            env=cl.client_env(),
            timeout=30,
        ).stdout.strip()
        refused = save(env=cl.client_env(operator))
        assert refused.returncode != 0 and "needs admin" in refused.stderr, refused.stderr
        assert "error" not in cl.ops(cl.coords, [["put", "after", "the backup"]])[0]

        inspected = _cli("cluster", "snapshot", "inspect", str(backup), "--json")
        assert inspected.returncode == 0, inspected.stderr
        summary = json.loads(inspected.stdout)
        assert summary["kv_keys"] == len(keys)
        assert sorted(summary["members"]) == sorted(c.member_id for c in cl.coords)
        assert summary["api_tokens"] == 1  # the bootstrap admin token; the operator token came after

        for c in cl.coords:  # every coordinator lost; their data dirs survive (restored from file backups)
            c.kill()
        target = leader  # not the member that took the backup: any member's data dir will do
        corrupted = tmp_path / "corrupted.backup"
        raw = bytearray(backup.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        corrupted.write_bytes(raw)
        restore = ("cluster", "snapshot", "restore")
        into = ("--data-dir", str(target.data_dir))
        bad = _cli(*restore, str(corrupted), *into, "--yes")
        assert bad.returncode == 1 and "corrupted" in bad.stderr, bad.stderr
        unconfirmed = _cli(*restore, str(backup), *into)
        assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr, unconfirmed.stderr

        done = _cli(*restore, str(backup), *into, "--yes")
        assert done.returncode == 0, done.stderr
        assert "is now its only voter" in done.stdout
        target.start()
        cl.wait_for(
            lambda s: s.get("leader") == target.member_id and s["voters"] == [target.member_id],
            timeout=20,
            what="the restored member leading alone",
            via=[target],
        )
        got = cl.ops(target, [["get", k] for k in [*keys, "after"]])
        assert [r.get("value") for r in got] == [*(f"v-{k}" for k in keys), ""]  # as of the backup
        assert got[-1]["found"] is False
        assert "error" not in cl.ops(target, [["put", "after", "restore"]])[0]

        # Another old member started on its data dir is not a member any more: it stops by itself.
        other = next(c for c in cl.coords if c is not target)
        other.start()
        assert other.proc is not None
        assert other.proc.wait(30) == 0, other.log()[-2000:]
        assert "was removed from cluster" in other.log()
