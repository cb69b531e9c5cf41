"""TunnelMesh: a self-hosted peer-to-peer encrypted mesh network."""

__version__ = "0.1.0.dev0"
