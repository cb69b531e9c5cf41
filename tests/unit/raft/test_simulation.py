"""Randomized fault schedules against the Raft core (see ``sim.py`` for the world and the invariants).

* ``test_quick_profile``: the default CI profile, ``TM_RAFT_SIM_SCHEDULES`` schedules (default 600) from a
  fixed base seed; or exactly the seeds listed in ``TM_RAFT_SIM_SEEDS`` (comma-separated, ``a-b`` ranges
  allowed).
* ``test_long_profile`` (``slow``): 5000 other schedules (``TM_RAFT_SIM_LONG`` overrides the count).
* ``test_replay``: replays ``TM_RAFT_SIM_SEED`` with the full event trace (every failure prints the command:
  ``TM_RAFT_SIM_SEED=<seed> pytest tests/unit/raft/test_simulation.py -k replay``).
"""

from __future__ import annotations

import os
import time

import pytest

from .sim import InvariantViolation, Simulation


def _parse_seeds(spec: str) -> list[int]:
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    return seeds


def _quick_seeds() -> list[int]:
    spec = os.environ.get("TM_RAFT_SIM_SEEDS")
    if spec:
        return _parse_seeds(spec)
    n = int(os.environ.get("TM_RAFT_SIM_SCHEDULES", "600"))
    return list(range(1, n + 1))


def _run(seeds: list[int]) -> dict[str, int]:
    """Run every schedule; on failures, report each failing seed and the full report of the first one."""
    totals: dict[str, int] = {}
    failures: list[tuple[int, str]] = []
    for seed in seeds:
        sim = Simulation(seed)
        try:
            sim.run()
        except InvariantViolation as e:
            failures.append((seed, str(e)))
        except Exception as e:  # a crash inside the core is a failed schedule too
            failures.append((seed, f"seed={seed}: {type(e).__name__}: {e}\n{sim.trace_text()}"))
        for k, v in sim.stats.items():
            totals[k] = totals.get(k, 0) + v
    if failures:
        seeds_txt = ",".join(str(seed) for seed, _ in failures)
        pytest.fail(
            f"{len(failures)}/{len(seeds)} raft schedules failed (seeds {seeds_txt}).\n"
            f"First failure:\n{failures[0][1]}",
            pytrace=False,
        )
    return totals


def test_quick_profile() -> None:
    seeds = _quick_seeds()
    t0 = time.perf_counter()
    totals = _run(seeds)
    dt = time.perf_counter() - t0
    print(f"\nraft sim: {len(seeds)} schedules in {dt:.1f}s: {totals}")
    assert totals["acked"] > 0


@pytest.mark.slow
def test_long_profile() -> None:
    n = int(os.environ.get("TM_RAFT_SIM_LONG", "5000"))
    seeds = list(range(100_000, 100_000 + n))
    t0 = time.perf_counter()
    totals = _run(seeds)
    print(f"\nraft sim (long): {len(seeds)} schedules in {time.perf_counter() - t0:.1f}s: {totals}")


def test_replay() -> None:
    """Replay one schedule (TM_RAFT_SIM_SEED, default 1) with its whole event trace in the failure report."""
    sim = Simulation(int(os.environ.get("TM_RAFT_SIM_SEED", "1")), trace_len=None)
    try:
        sim.run()
    except InvariantViolation:
        raise
    except Exception as e:
        pytest.fail(f"{type(e).__name__}: {e}\n{sim.trace_text()}")
    print(f"\nreplayed seed {sim.seed}: {sim.stats}")
