"""`tunnelmesh config`: show and validate the effective configuration (docs/configuration.md)."""

from __future__ import annotations

from pathlib import Path

import click

from tunnelmesh.config import load_config_with_sources, render_config

_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Config file (default: $TUNNELMESH_CONFIG, else the default path if it exists).",
)


@click.group()
def config() -> None:
    """Show and validate the effective configuration."""


@config.command()
@_config_option
@click.option("--sources", is_flag=True, help="Annotate each non-default setting with where it came from.")
@click.option(
    "--section", type=click.Choice(["coord", "node", "log"]), default=None, help="Show one section only."
)
def show(config_path: Path | None, sources: bool, section: str | None) -> None:
    """Print the effective configuration as YAML (defaults < file < environment < flags), secrets redacted."""
    loaded = load_config_with_sources(config_path)
    shown = loaded.config if section is None else getattr(loaded.config, section)
    if sources:
        origin = loaded.file if loaded.file is not None else "(none: defaults and environment)"
        click.echo(f"# file: {origin}")
    click.echo(render_config(shown, sources=loaded.sources if sources else None), nl=False)


@config.command()
@_config_option
def validate(config_path: Path | None) -> None:
    """Check a configuration; print every problem (file, line, field, fix) and exit 1 if there is one."""
    loaded = load_config_with_sources(config_path)
    where = loaded.file if loaded.file is not None else "defaults and environment"
    click.echo(f"ok: {where}")
