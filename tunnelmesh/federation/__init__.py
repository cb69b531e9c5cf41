"""Federation between separately administered meshes: gateways, peering tokens, exports and imports."""
