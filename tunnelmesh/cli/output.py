"""Output helpers shared by the commands that print API objects (nodes, tokens): aligned tables for people,
``--json`` for scripts, and times and durations in one style."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, timedelta
from typing import Any

import click
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunnelmesh.config import parse_duration

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")


def print_json(value: Message | Sequence[Message] | dict[str, Any]) -> None:
    """Protobuf messages in the proto3 JSON mapping (as grpcurl prints them), indented."""
    if isinstance(value, Message):
        doc: Any = MessageToDict(value)
    elif isinstance(value, dict):
        doc = {k: MessageToDict(v) if isinstance(v, Message) else v for k, v in value.items()}
    else:
        doc = [MessageToDict(m) for m in value]
    click.echo(json.dumps(doc, indent=2))


def print_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """An aligned table without borders; cells are plain text (never rich markup)."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for h in headers:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    # A pipe gets the full width: a script's `grep`/`awk` must not see wrapped cells.
    Console(width=None if click.get_text_stream("stdout").isatty() else 250).print(table)


def when(ts: Timestamp, *, unset: str = "-") -> str:
    """A Timestamp as "2026-11-28 09:30:00Z"; ``unset`` for an unset (zero) one."""
    if ts.seconds == 0 and ts.nanos == 0:
        return unset
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def ago(ts: Timestamp, *, unset: str = "never") -> str:
    """How long ago ``ts`` was ("3m ago", "in 2h" for the future)."""
    if ts.seconds == 0 and ts.nanos == 0:
        return unset
    delta = time.time() - ts.ToNanoseconds() / 1e9
    text = span(abs(delta))
    return f"{text} ago" if delta >= 0 else f"in {text}"


def span(seconds: float) -> str:
    """A coarse duration: "45s", "12m", "5h", "3d"."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


class DurationType(click.ParamType[timedelta]):
    """A duration with a unit ("90s", "30m", "12h", "7d"), as in config files."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


DURATION = DurationType()
