"""Fault-injection harness: scenarios, faults, invariant checkers, reports."""
