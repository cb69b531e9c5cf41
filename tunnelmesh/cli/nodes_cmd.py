"""`tunnelmesh nodes`: list, show, rename and remove the mesh's nodes (AdminService through the client).

Connection flags (--coord, --ca, --token, --data-dir, --profile): see cli/connect.py and docs/cli.md."""

from __future__ import annotations

import base64

import click
import grpc

from tunnelmesh.api.v1 import admin_pb2, common_pb2
from tunnelmesh.cli.connect import Connection, connection_options
from tunnelmesh.cli.output import ago, json_option, print_json, print_table, when
from tunnelmesh.client import Client, ClientError

_CANDIDATE = {
    common_pb2.CANDIDATE_TYPE_HOST: "host",
    common_pb2.CANDIDATE_TYPE_REFLEXIVE: "reflexive",
    common_pb2.CANDIDATE_TYPE_RELAY: "relay",
}


async def resolve_node(c: Client, ref: str) -> admin_pb2.Node:
    """The node whose id or, failing that, name is ``ref``."""
    try:
        return await c.get_node(ref)
    except ClientError as exc:
        if exc.code != grpc.StatusCode.NOT_FOUND:
            raise
    try:
        return await c.get_node(name=ref)
    except ClientError as exc:
        if exc.code == grpc.StatusCode.NOT_FOUND:
            raise ClientError(
                exc.code, f"no node with id or name {ref!r} (see `tunnelmesh nodes list`)"
            ) from None
        raise


def _public_key(node: admin_pb2.Node) -> str:
    return base64.b64encode(node.public_key).decode()  # as `wg show` prints keys


def _show(node: admin_pb2.Node) -> None:
    rows = [
        ("name", node.name),
        ("id", node.node_id),
        ("mesh ips", ", ".join(node.mesh_ips) or "-"),
        ("public key", _public_key(node)),
        ("online", "yes" if node.online else "no"),
        (
            "last seen",
            f"{when(node.last_seen)} ({ago(node.last_seen)})" if node.last_seen.seconds else "never",
        ),
        ("hostname", node.hostname or "-"),
        ("platform", node.platform or "-"),
        ("agent", node.agent_version or "-"),
        ("tags", ", ".join(node.tags) or "-"),
        ("created", when(node.created_at)),
        ("join token", node.join_token_id or "-"),
    ]
    for key, value in rows:
        click.echo(f"{key:<12}{value}")
    click.echo("endpoints" if node.endpoints else "endpoints   -")
    for e in node.endpoints:
        relay = f" via {e.relay_coordinator_id}" if e.relay_coordinator_id else ""
        click.echo(f"  {_CANDIDATE.get(e.type, '?'):<10}{e.address}{relay}")


@click.group("nodes")
def nodes() -> None:
    """List, show, rename and remove nodes (needs an API token: read-only to look, operator to change)."""


@nodes.command("list")
@connection_options
@click.option("--tag", "tags", multiple=True, help="Only nodes carrying this tag (repeat: all of them).")
@json_option
def list_cmd(conn: Connection, tags: tuple[str, ...], as_json: bool) -> None:
    """List nodes, ordered by name."""
    found: list[admin_pb2.Node] = conn.run(lambda c: c.all_nodes(tags))
    if as_json:
        print_json(found)
        return
    if not found:
        click.echo(
            "no nodes"
            + (f" tagged {', '.join(tags)}" if tags else "")
            + "; add one with `tunnelmesh tokens create`"
        )
        return
    print_table(
        ["NAME", "ID", "MESH IP", "ONLINE", "LAST SEEN", "TAGS", "AGENT"],
        (
            [
                n.name,
                n.node_id,
                ", ".join(n.mesh_ips),
                "yes" if n.online else "no",
                ago(n.last_seen),
                ",".join(n.tags) or "-",
                n.agent_version or "-",
            ]
            for n in found
        ),
    )


@nodes.command("show")
@connection_options
@click.argument("node")
@json_option
def show_cmd(conn: Connection, node: str, as_json: bool) -> None:
    """Show NODE (its id or name)."""
    found: admin_pb2.Node = conn.run(lambda c: resolve_node(c, node))
    if as_json:
        print_json(found)
        return
    _show(found)


@nodes.command("rename")
@connection_options
@click.argument("node")
@click.argument("new_name")
@json_option
def rename_cmd(conn: Connection, node: str, new_name: str, as_json: bool) -> None:
    """Rename NODE (id or name) to NEW_NAME, a DNS label; its DNS name follows."""

    async def run(c: Client) -> tuple[str, admin_pb2.Node]:
        target = await resolve_node(c, node)
        return target.name, await c.rename_node(target.node_id, new_name)

    old, renamed = conn.run(run)
    if as_json:
        print_json(renamed)
        return
    click.echo(f"renamed node {renamed.node_id}: {old} -> {renamed.name}")


@nodes.command("remove")
@connection_options
@click.argument("node")
@json_option
def remove_cmd(conn: Connection, node: str, as_json: bool) -> None:
    """Remove NODE (id or name): its key is refused from now on, peers drop it, its address is freed."""

    async def run(c: Client) -> admin_pb2.Node:
        target = await resolve_node(c, node)
        await c.remove_node(target.node_id)
        return target

    removed: admin_pb2.Node = conn.run(run)
    if as_json:
        print_json({"removed": removed})
        return
    click.echo(
        f"removed node {removed.name} ({removed.node_id}, {', '.join(removed.mesh_ips) or 'no address'})"
    )
