"""Output paths of the benchmarks, checked before a run starts: a run takes minutes, and it must not fail at
its end because the file or directory it was asked to write cannot be made."""

from __future__ import annotations

import os
from pathlib import Path


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written as a new or replaced file, or None if it can."""
    if path.is_dir():
        return f"{path} is a directory"
    parent = path.parent
    if not parent.is_dir():
        return f"directory {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{path} is not writable"
    return None


def dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used (or made, with its parents) as an output directory, or None if it can."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} exists and is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
