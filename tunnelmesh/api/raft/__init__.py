"""Generated code for proto package tunnelmesh.raft (proto/tunnelmesh/raft/)."""
