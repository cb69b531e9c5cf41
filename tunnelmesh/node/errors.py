"""Errors of the node's data plane I/O layer (TUN device, UDP socket, offload helpers)."""

from tunnelmesh.errors import TunnelMeshError


class DataplaneError(TunnelMeshError):
    """The data plane could not open, configure or use a TUN device or UDP socket."""


class OffloadError(DataplaneError):
    """A packet or super-packet could not be segmented or checksummed: malformed headers or an unsupported
    offload type. The packet is dropped; nothing else changes."""
