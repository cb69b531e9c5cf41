"""Unit tests of the sans-I/O WireGuard core, named after the whitepaper sections they check."""
