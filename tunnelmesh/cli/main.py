"""The root of the `tunnelmesh` command.

Every command group of the product is listed here in the order a user meets them, so `tunnelmesh --help`
shows the whole product. Groups that are not built yet are still listed (marked "not built yet") and, when
run, say so and exit non-zero: a user must never mistake a silent stub for a working command.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click
from rich.console import Console

from tunnelmesh import __version__
from tunnelmesh.errors import NotBuiltError, TunnelMeshError

# Exit codes: 1 for a TunnelMesh error the user can fix, 3 for a command that is not built yet,
# 2 stays click's usage error, 130 for Ctrl-C.
EXIT_ERROR = 1
EXIT_NOT_BUILT = 3
EXIT_INTERRUPTED = 130

_stderr = Console(stderr=True, highlight=False, soft_wrap=True)  # never re-wrap error text

# The order of `tunnelmesh --help`: the order a user meets the commands.
_ORDER = ["up", "down", "service", "coord", "join", "node", "status", "nodes", "tokens", "cluster"]
_ORDER += ["dataplane", "policy", "export", "federation", "s3", "nfs", "demo", "chaos"]
_ORDER += ["config", "netlab", "version"]

# Built commands: where each lives. A command's module (and what it imports: gRPC, the coordinator, the data
# plane) is loaded only when that command runs, so `tunnelmesh dataplane show` does not pay for the rest.
_BUILT: dict[str, tuple[str, str]] = {
    "up": ("tunnelmesh.cli.up_cmd", "up"),
    "down": ("tunnelmesh.cli.up_cmd", "down"),
    "service": ("tunnelmesh.cli.up_cmd", "service"),
    "coord": ("tunnelmesh.cli.coord_cmd", "coord"),
    "join": ("tunnelmesh.cli.join_cmd", "join"),
    "node": ("tunnelmesh.cli.node_cmd", "node"),
    "status": ("tunnelmesh.cli.status_cmd", "status"),
    "nodes": ("tunnelmesh.cli.nodes_cmd", "nodes"),
    "tokens": ("tunnelmesh.cli.tokens_cmd", "tokens"),
    "cluster": ("tunnelmesh.cli.cluster_cmd", "cluster"),
    "dataplane": ("tunnelmesh.cli.dataplane_cmd", "dataplane"),
    "demo": ("tunnelmesh.cli.demo_cmd", "demo"),
    "config": ("tunnelmesh.cli.config_cmd", "config"),
    "netlab": ("tunnelmesh.cli.netlab_cmd", "netlab"),
    "version": ("tunnelmesh.cli.version_cmd", "version"),
}

# Groups not built yet: (one-line help, issue that builds it; 0 = not filed yet).
_PLANNED: dict[str, tuple[str, int]] = {
    "policy": ("Policy-as-code: plan, apply, history, rollback, test.", 0),
    "export": ("Export services to federated meshes.", 0),
    "federation": ("Peer with another mesh through federation gateways.", 0),
    "s3": ("Mesh-only S3-compatible object storage.", 0),
    "nfs": ("Mesh-only NFSv3 file shares.", 0),
    "chaos": ("Run fault-injection scenarios against a topology.", 0),
}


def _planned_command(name: str, help_text: str, issue: int) -> click.Command:
    tracked = f"tracked in issue #{issue}" if issue else "planned on the roadmap"

    @click.command(
        name=name,
        help=f"{help_text}\n\nNot built yet ({tracked}).",
        short_help=f"{help_text} [not built yet]",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        add_help_option=False,
    )
    @click.pass_context
    def command(ctx: click.Context) -> None:
        raise NotBuiltError(f"`tunnelmesh {name}` is not built yet ({tracked}).")

    return command


class _ProductGroup(click.Group):
    """Lists commands in the product's order, not alphabetically, and loads each one when it is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_ORDER)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _BUILT:
            module, attr = _BUILT[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        if cmd_name in _PLANNED:
            return _planned_command(cmd_name, *_PLANNED[cmd_name])
        return None


@click.group(cls=_ProductGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tunnelmesh", message="%(prog)s %(version)s")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    envvar="TUNNELMESH_LOG_LEVEL",
    help="Log level for messages on stderr.",
)
def cli(log_level: str) -> None:
    """TunnelMesh: a self-hosted peer-to-peer encrypted mesh network.

    Start with `tunnelmesh up` on one machine; it prints the command other machines run to join.
    Docs: docs/README.md.
    """
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def run_cli(entry: click.Command, args: list[str] | None = None) -> int:
    """Runs a click entry point and turns TunnelMesh errors into a one-line message and an exit code."""
    try:
        # Non-standalone mode returns the exit code of --help/--version/ctx.exit() instead of raising.
        code = entry.main(args=args, prog_name="tunnelmesh", standalone_mode=False)
    except NotBuiltError as exc:
        _stderr.print(f"[yellow]not built yet:[/] {exc}")
        return EXIT_NOT_BUILT
    except TunnelMeshError as exc:
        _stderr.print(f"[red]error:[/] {exc}")
        return EXIT_ERROR
    except click.exceptions.Abort:
        _stderr.print("aborted")
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run_cli(cli))
