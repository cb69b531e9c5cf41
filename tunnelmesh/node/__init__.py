"""The node: WireGuard-compatible data plane, agent, NAT traversal, DNS, policy enforcement."""
