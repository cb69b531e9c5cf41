"""Policy-as-code: the policy language, its compiler, diffs and tests."""
