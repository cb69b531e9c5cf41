"""Unit tests of the node data plane (offload helpers)."""
