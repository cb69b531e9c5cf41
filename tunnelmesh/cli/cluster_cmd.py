"""`tunnelmesh cluster`: coordinator cluster status, members, leadership transfer, removal, online backups
(`snapshot save|inspect|restore`) and the offline disaster recovery `force-new-cluster`.

Connection flags (--coord, --ca, --token, --data-dir, --profile): see cli/connect.py and docs/api.md."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from google.protobuf.json_format import MessageToDict

from tunnelmesh.api.v1 import admin_pb2
from tunnelmesh.cli.connect import Connection, connection_options
from tunnelmesh.errors import TunnelMeshError

_ROLE = {admin_pb2.MEMBER_ROLE_VOTER: "voter", admin_pb2.MEMBER_ROLE_LEARNER: "learner"}

F = TypeVar("F", bound=Callable[..., Any])

_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def members_table(members: list[admin_pb2.Member], commit: int | None = None) -> list[str]:
    """The members as a table. ``LAG`` (entries the member's log is behind ``commit``) and ``CONTACT``
    (since it last answered) are the leader's view: "-" where the serving coordinator does not know them
    (it is not the leader, or ``commit`` is not given)."""
    lines = [
        f"{'MEMBER':<18}{'NAME':<16}{'ROLE':<9}{'LEADER':<8}{'HEALTHY':<9}{'LAG':<8}{'CONTACT':<9}{'API':<22}RAFT"
    ]
    for m in members:
        lag = str(max(0, commit - m.match_index)) if commit is not None and m.match_index else "-"
        contact = (
            f"{m.last_contact_age.ToTimedelta().total_seconds():.1f}s"
            if m.HasField("last_contact_age")
            else "-"
        )
        lines.append(
            f"{m.member_id:<18}{m.info.name:<16}{_ROLE.get(m.role, '?'):<9}{'*' if m.is_leader else '':<8}"
            f"{'yes' if m.healthy else '-':<9}{lag:<8}{contact:<9}{m.info.api_address:<22}{m.raft_address}"
        )
    return lines


@click.group("cluster")
def cluster() -> None:
    """Coordinator cluster: status, members, leadership transfer, member removal, disaster recovery."""


def health_problems(st: admin_pb2.GetClusterStatusResponse) -> list[str]:
    """What makes the cluster unhealthy in ``st``, the leader's view: no leader, or a voter that does not
    answer it. A learner still catching up is not a problem (a coordinator being added)."""
    if not st.leader_id:
        return ["no leader (an election in progress, or no quorum)"]
    problems = []
    for m in st.members:
        if m.role == admin_pb2.MEMBER_ROLE_VOTER and not m.healthy:
            seen = (
                f"last answered {m.last_contact_age.ToTimedelta().total_seconds():.1f}s ago"
                if m.HasField("last_contact_age")
                else "never answered"
            )
            problems.append(f"voter {m.member_id} ({m.info.name or m.info.api_address}) {seen}")
    return problems


def _leader_status(
    conn: Connection, st: admin_pb2.GetClusterStatusResponse
) -> admin_pb2.GetClusterStatusResponse:
    """``st`` as the leader sees it (health, lag and contact are its view): asked again from the leader."""
    if not st.leader_id or st.member_id == st.leader_id:
        return st
    leader = next((m for m in st.members if m.is_leader and m.info.api_address), None)
    if leader is None:
        raise TunnelMeshError(f"cluster unhealthy: the leader {st.leader_id} has no API address on record")
    try:
        there: admin_pb2.GetClusterStatusResponse = dataclasses.replace(
            conn, coordinators=leader.info.api_address
        ).run(lambda c: c.cluster_status())
    except TunnelMeshError as exc:
        where = leader.info.api_address
        raise TunnelMeshError(
            f"cluster unhealthy: the leader {st.leader_id} does not answer at {where}: {exc}"
        ) from None
    return there


@cluster.command("status")
@connection_options
@_json_option
@click.option(
    "--check",
    is_flag=True,
    help="Health check: show the leader's view and exit 1 (reasons on stderr) unless there is a leader "
    "and every voter answers it.",
)
def status(conn: Connection, as_json: bool, check: bool) -> None:
    """Leader, term, commit/applied indexes and members, as the serving coordinator sees them."""
    st: admin_pb2.GetClusterStatusResponse = conn.run(lambda c: c.cluster_status())
    if check:
        st = _leader_status(conn, st)
    if as_json:
        click.echo(json.dumps(MessageToDict(st), indent=2))
    else:
        _print_status(st)
    if check and (problems := health_problems(st)):
        raise TunnelMeshError("cluster unhealthy: " + "; ".join(problems))


def _print_status(st: admin_pb2.GetClusterStatusResponse) -> None:
    click.echo(f"cluster   {st.cluster_id}")
    click.echo(f"serving   {st.member_id}")
    click.echo(f"leader    {st.leader_id or '(none: election in progress or no quorum)'}")
    click.echo(f"term      {st.term}")
    click.echo(f"commit    {st.commit_index}   applied {st.applied_index}   snapshot {st.snapshot_index}")
    click.echo("")
    click.echo("\n".join(members_table(list(st.members), st.commit_index)))


@cluster.command("members")
@connection_options
@_json_option
def members(conn: Connection, as_json: bool) -> None:
    """List voters and learners."""
    ms: list[admin_pb2.Member] = conn.run(lambda c: c.members())
    if as_json:
        click.echo(json.dumps([MessageToDict(m) for m in ms], indent=2))
        return
    click.echo("\n".join(members_table(ms)))


@cluster.command("transfer-leader")
@connection_options
@click.argument("target", required=False, default="")
def transfer_leader(conn: Connection, target: str) -> None:
    """Move leadership to TARGET (member id), or to the most up-to-date other voter."""
    r: admin_pb2.TransferLeadershipResponse = conn.run(lambda c: c.transfer_leadership(target))
    click.echo(f"leader is now {r.leader_id} (term {r.term})")


@cluster.command("remove")
@connection_options
@click.argument("member_id")
def remove(conn: Connection, member_id: str) -> None:
    """Remove MEMBER_ID from the cluster (its id is never reused; wipe its data dir to reuse the host)."""
    r: admin_pb2.RemoveMemberResponse = conn.run(lambda c: c.remove_member(member_id))
    click.echo(f"removed {member_id}; {len(r.members)} members remain")


def _offline_data_dir(help_text: str) -> Callable[[F], F]:
    """``--data-dir`` of the offline recovery commands (the coordinator must be stopped: they rewrite it)."""
    return click.option(
        "--data-dir",
        required=True,
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help=help_text,
    )


@cluster.command("force-new-cluster")
@_offline_data_dir("The data dir of a STOPPED surviving coordinator.")
@click.option("--yes", is_flag=True, help="Confirm: every other member is dropped from the cluster.")
def force_new_cluster(data_dir: Path, yes: bool) -> None:
    """Disaster recovery when a majority of coordinators is lost for good: make this stopped coordinator the
    only member of its cluster, keeping everything in its log. Run once, then start it as usual and join new
    coordinators to it (docs/high-availability.md)."""
    from tunnelmesh.coord.raft.transport import member_label
    from tunnelmesh.coord.recovery import force_new_cluster as recover
    from tunnelmesh.coord.server import RAFT_DIR

    if not yes:
        raise click.UsageError(
            "this drops every other member from the cluster (they can only rejoin wiped, under new ids); "
            "run it only when a majority of the voters is lost for good, and confirm with --yes"
        )
    r = recover(data_dir / RAFT_DIR)
    dropped = ", ".join(member_label(m) for m in r.removed) or "none"
    click.echo(
        f"cluster {r.cluster_id}: member {member_label(r.member_id)} is now its only voter (state up to "
        f"index {r.index - 1}: {r.replayed} log entries replayed, {r.index - 1 - r.committed_before} of them "
        f"not known committed before); removed: {dropped}. Start the coordinator as usual."
    )


@cluster.group("snapshot")
def snapshot() -> None:
    """Online backups of the replicated state: save, inspect, restore (docs/high-availability.md)."""


def _describe(info: admin_pb2.SnapshotInfo) -> str:
    taken = info.taken_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"cluster {info.cluster_id}, index {info.index} (term {info.term}), taken by member {info.taken_by} "
        f"at {taken}, {info.size} bytes"
    )


@snapshot.command("save")
@connection_options
@click.argument("file", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@click.option("--timeout", default=60.0, show_default=True, help="Seconds the whole transfer may take.")
def snapshot_save(conn: Connection, file: Path, timeout: float) -> None:
    """Save a backup of the running cluster to FILE (0600; replaced atomically): every write acknowledged
    before the call, as the serving coordinator has applied it. Needs an admin token."""
    from tunnelmesh.coord.recovery import write_backup

    info, data, sha = conn.run(lambda c: c.save_snapshot(), deadline=timeout, attempt_timeout=timeout)
    write_backup(file, info, data, sha)
    click.echo(f"saved {file}: {_describe(info)}, sha256 {sha.hex()}")


@snapshot.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_json_option
def snapshot_inspect(file: Path, as_json: bool) -> None:
    """Check a backup file (checksum, decodes) and show what it holds."""
    from tunnelmesh.coord.raft.driver import decode_snapshot
    from tunnelmesh.coord.raft.transport import member_label
    from tunnelmesh.coord.recovery import read_backup
    from tunnelmesh.coord.state import MeshState

    backup = read_backup(file)
    registry, state_bytes = decode_snapshot(backup.data)
    st = MeshState.from_snapshot(state_bytes) if state_bytes else MeshState()
    members = {member_label(k): m.raft_address for k, m in sorted(registry.members.items())}
    summary = {
        "info": MessageToDict(backup.info),
        "sha256": backup.sha256.hex(),
        "members": members,
        "removed_members": sorted(member_label(m) for m in registry.removed),
        "nodes": st.node_count,
        "join_tokens": len(st.join_tokens()),
        "api_tokens": len(st.api_tokens()),
        "kv_keys": len(st.kv_items()),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{file}: OK (sha256 {backup.sha256.hex()})")
    click.echo(_describe(backup.info))
    click.echo(f"members   {', '.join(f'{k} ({v})' for k, v in members.items()) or 'none'}")
    click.echo(
        f"holds     {summary['nodes']} nodes, {summary['join_tokens']} join tokens, "
        f"{summary['api_tokens']} API tokens, {summary['kv_keys']} KV keys"
    )


@snapshot.command("restore")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_offline_data_dir("The data dir of a STOPPED coordinator of the backup's cluster.")
@click.option("--yes", is_flag=True, help="Confirm: its state is replaced and every other member dropped.")
def snapshot_restore(file: Path, data_dir: Path, yes: bool) -> None:
    """Make the stopped coordinator in --data-dir the only member of its cluster, with the state saved in
    FILE (what it held beyond that is dropped). Then start it as usual and join new coordinators to it."""
    from tunnelmesh.coord.raft.transport import member_label
    from tunnelmesh.coord.recovery import read_backup, restore_backup
    from tunnelmesh.coord.server import RAFT_DIR

    backup = read_backup(file)  # checked before asking for --yes: a bad file fails either way
    if not yes:
        raise click.UsageError(
            f"this replaces the state of the coordinator in {data_dir} with {file} "
            f"({_describe(backup.info)}) and drops every other member from the cluster; confirm with --yes"
        )
    r = restore_backup(data_dir / RAFT_DIR, backup)
    dropped = ", ".join(member_label(m) for m in r.removed) or "none"
    click.echo(
        f"cluster {r.cluster_id}: member {member_label(r.member_id)} is now its only voter, with the state "
        f"of {file} (index {backup.info.index}; new index {r.index}); removed: {dropped}. Start the "
        "coordinator as usual."
    )
