"""Generated code for proto package tunnelmesh.raft.v1 (proto/tunnelmesh/raft/v1/)."""
