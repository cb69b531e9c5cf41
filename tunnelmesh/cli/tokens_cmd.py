"""`tunnelmesh tokens`: join tokens (to add nodes) and, with ``--api``, API tokens (for the CLI and scripts).

Connection flags (--coord, --ca, --token, --data-dir, --profile): see cli/connect.py and docs/cli.md."""

from __future__ import annotations

import time
from datetime import timedelta

import click
from google.protobuf.timestamp_pb2 import Timestamp

from tunnelmesh.api.v1 import admin_pb2, common_pb2
from tunnelmesh.cli.connect import Connection, connection_options
from tunnelmesh.cli.output import DURATION, ago, json_option, print_json, print_table, when

ROLES = {
    "read-only": common_pb2.ROLE_READ_ONLY,
    "operator": common_pb2.ROLE_OPERATOR,
    "admin": common_pb2.ROLE_ADMIN,
}
_ROLE_NAMES = {v: k for k, v in ROLES.items()}


def join_token_state(t: admin_pb2.JoinToken, now: float | None = None) -> str:
    """active, revoked, expired or used up (the server decides at Register; this is for display)."""
    now = time.time() if now is None else now
    if t.HasField("revoked_at"):
        return "revoked"
    if t.expires_at.ToNanoseconds() <= now * 1e9:
        return "expired"
    limit = t.max_uses if t.reusable else 1
    if limit and t.uses >= limit:
        return "used up"
    return "active"


def api_token_state(t: admin_pb2.ApiToken, now: float | None = None) -> str:
    now = time.time() if now is None else now
    if t.HasField("revoked_at"):
        return "revoked"
    if t.HasField("expires_at") and t.expires_at.ToNanoseconds() <= now * 1e9:
        return "expired"
    return "active"


def _uses(t: admin_pb2.JoinToken) -> str:
    if not t.reusable:
        return f"{t.uses} of 1"
    return f"{t.uses} of {t.max_uses}" if t.max_uses else f"{t.uses} (no limit)"


def _expiry(ts: Timestamp) -> str:
    return f"{when(ts)} ({ago(ts)})" if ts.seconds else "never"


@click.group("tokens")
def tokens() -> None:
    """Join tokens that add nodes, and (--api) API tokens with a role for the CLI and scripts.

    Join tokens need an operator API token; API tokens an admin one."""


@tokens.command("create")
@connection_options
@click.option("--api", "api", is_flag=True, help="Create an API token (with --role) instead of a join token.")
@click.option(
    "--role",
    type=click.Choice(list(ROLES)),
    default=None,
    help="With --api: the token's role (read-only < operator < admin).",
)
@click.option("--description", "-d", default="", help="Free-form note (who or what the token is for).")
@click.option(
    "--tag", "tags", multiple=True, help="Join tokens: tag for nodes that join with it (repeatable)."
)
@click.option(
    "--ttl",
    type=DURATION,
    default=None,
    help="Validity, e.g. 30m, 12h, 7d. Join tokens: default 1h, at most 365d. API tokens: default never.",
)
@click.option("--reusable", is_flag=True, help="Join tokens: usable by several nodes (default: single use).")
@click.option(
    "--max-uses",
    type=click.IntRange(min=1),
    default=None,
    help="Join tokens: at most N nodes (implies --reusable).",
)
@click.option("--quiet", "-q", is_flag=True, help="Print only the secret.")
@json_option
def create_cmd(
    conn: Connection,
    api: bool,
    role: str | None,
    description: str,
    tags: tuple[str, ...],
    ttl: timedelta | None,
    reusable: bool,
    max_uses: int | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Create a join token (or, with --api, an API token). The secret is shown only now."""
    seconds = ttl.total_seconds() if ttl is not None else None
    if api:
        if role is None:
            raise click.UsageError("--api needs --role admin|operator|read-only")
        if tags or reusable or max_uses is not None:
            raise click.UsageError("--tag, --reusable and --max-uses are for join tokens, not --api")
        r: admin_pb2.CreateApiTokenResponse = conn.run(
            lambda c: c.create_api_token(ROLES[role], description=description, ttl=seconds)
        )
        if as_json:
            print_json(r)
        elif quiet:
            click.echo(r.secret)
        else:
            click.echo(f"API token {r.token.token_id}: role {role}, expires {_expiry(r.token.expires_at)}")
            click.echo(f"secret (shown only now; keep it secret):\n  {r.secret}")
            click.echo("use it with --token or TUNNELMESH_API_TOKEN (see docs/cli.md)")
        return
    if role is not None:
        raise click.UsageError("--role is for API tokens: add --api")
    jr: admin_pb2.CreateJoinTokenResponse = conn.run(
        lambda c: c.create_join_token(
            description=description,
            tags=tags,
            ttl=seconds,
            reusable=reusable or max_uses is not None,
            max_uses=max_uses or 0,
        )
    )
    if as_json:
        print_json(jr)
    elif quiet:
        click.echo(jr.secret)
    else:
        t = jr.token
        use = f"reusable, {_uses(t)} uses" if t.reusable else "single use"
        click.echo(f"join token {t.token_id}: {use}, expires {_expiry(t.expires_at)}")
        if t.tags:
            click.echo(f"tags: {', '.join(t.tags)}")
        click.echo(f"secret (shown only now; keep it secret):\n  {jr.secret}")
        click.echo(f"on the new machine run:\n  {jr.join_command}")


@tokens.command("list")
@connection_options
@click.option("--api", "api", is_flag=True, help="List API tokens instead of join tokens.")
@click.option("--all", "include_inactive", is_flag=True, help="Include revoked, expired and used-up tokens.")
@json_option
def list_cmd(conn: Connection, api: bool, include_inactive: bool, as_json: bool) -> None:
    """List join tokens (or, with --api, API tokens), newest first. Secrets are never shown."""
    if api:
        found: list[admin_pb2.ApiToken] = conn.run(
            lambda c: c.list_api_tokens(include_inactive=include_inactive)
        )
        if as_json:
            print_json(found)
            return
        print_table(
            ["ID", "ROLE", "STATE", "EXPIRES", "CREATED", "CREATED BY", "DESCRIPTION"],
            (
                [
                    t.token_id,
                    _ROLE_NAMES.get(t.role, "?"),
                    api_token_state(t),
                    when(t.expires_at, unset="never"),
                    when(t.created_at),
                    t.created_by or "-",
                    t.description or "-",
                ]
                for t in found
            ),
        )
        return
    joins: list[admin_pb2.JoinToken] = conn.run(
        lambda c: c.list_join_tokens(include_inactive=include_inactive)
    )
    if as_json:
        print_json(joins)
        return
    if not joins:
        click.echo("no active join tokens" + ("" if include_inactive else " (--all shows inactive ones)"))
        return
    print_table(
        ["ID", "STATE", "USES", "EXPIRES", "TAGS", "CREATED BY", "DESCRIPTION"],
        (
            [
                t.token_id,
                join_token_state(t),
                _uses(t),
                when(t.expires_at),
                ",".join(t.tags) or "-",
                t.created_by or "-",
                t.description or "-",
            ]
            for t in joins
        ),
    )


@tokens.command("revoke")
@connection_options
@click.option("--api", "api", is_flag=True, help="TOKEN_ID is an API token.")
@click.argument("token_id")
@json_option
def revoke_cmd(conn: Connection, api: bool, token_id: str, as_json: bool) -> None:
    """Revoke TOKEN_ID (as `tokens list` shows it). Nodes that already joined stay; a revoked API token is
    refused from now on."""
    if api:
        at: admin_pb2.ApiToken = conn.run(lambda c: c.revoke_api_token(token_id))
        if as_json:
            print_json(at)
            return
        click.echo(
            f"revoked API token {at.token_id} ({_ROLE_NAMES.get(at.role, '?')}) at {when(at.revoked_at)}"
        )
        return
    jt: admin_pb2.JoinToken = conn.run(lambda c: c.revoke_join_token(token_id))
    if as_json:
        print_json(jt)
        return
    click.echo(
        f"revoked join token {jt.token_id} at {when(jt.revoked_at)} ({jt.uses} node(s) joined with it stay)"
    )
