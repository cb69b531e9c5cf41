"""The `tunnelmesh` command line."""
