"""The coordinator: Raft cluster, replicated mesh state, node and admin APIs, relay, storage."""
