"""The benchmarks refuse bad arguments (an output path they could not write) before they start, not after
minutes of run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from output_paths import dir_problem, file_problem  # noqa: E402 - bench/ is not a package


def test_file_problem_names_what_is_wrong(tmp_path: Path) -> None:
    assert file_problem(tmp_path / "out.json") is None
    (tmp_path / "old.json").write_text("{}")
    assert file_problem(tmp_path / "old.json") is None  # replaced
    assert file_problem(tmp_path) == f"{tmp_path} is a directory"
    assert file_problem(tmp_path / "no" / "out.json") == f"directory {tmp_path / 'no'} does not exist"
    (tmp_path / "f").write_text("")
    assert file_problem(tmp_path / "f" / "out.json") == f"directory {tmp_path / 'f'} does not exist"


def test_dir_problem_allows_dirs_to_be_made(tmp_path: Path) -> None:
    assert dir_problem(tmp_path) is None
    assert dir_problem(tmp_path / "a" / "b") is None  # made with its parents
    (tmp_path / "f").write_text("")
    assert dir_problem(tmp_path / "f") == f"{tmp_path / 'f'} exists and is not a directory"
    assert dir_problem(tmp_path / "f" / "sub") == f"{tmp_path / 'f'} exists and is not a directory"


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("raft.py", ["--json", "{tmp}/missing/r.json"], "--json: directory {tmp}/missing does not exist"),
        ("raft.py", ["--profile", "{tmp}/file"], "--profile: {tmp}/file exists and is not a directory"),
        ("raft.py", ["--clients", "1,x"], "--clients: a comma-separated list of client counts"),
        ("control.py", ["--json", "{tmp}"], "--json: {tmp} is a directory"),
        (
            "dataplane.py",
            ["--json", "{tmp}/missing/d.json"],
            "--json: directory {tmp}/missing does not exist",
        ),
    ],
)
def test_benchmarks_refuse_an_unwritable_output_at_once(
    tmp_path: Path, script: str, args: list[str], message: str
) -> None:
    (tmp_path / "file").write_text("")
    argv = [a.format(tmp=tmp_path) for a in args]
    # Nothing is started: the refusal comes from argument parsing, in well under the timeout.
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert message.format(tmp=tmp_path) in proc.stderr
