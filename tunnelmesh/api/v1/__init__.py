"""Generated code for proto package tunnelmesh.v1 (proto/tunnelmesh/v1/)."""
