"""The root of TunnelMesh's exception hierarchy.

Each layer raises its own subclass (``ConfigError``, ``ProtocolError``, ``NetlabError`` ...) so callers can
catch one layer's failures without swallowing programming errors. A message says what was wrong, where (file,
field, peer) and what to do about it: the CLI prints it as-is, without a traceback.
"""


class TunnelMeshError(Exception):
    """Base class of every error TunnelMesh raises on purpose."""


class ConfigError(TunnelMeshError):
    """Invalid or unreadable configuration: names the source, the field and the fix."""


class IdentityError(TunnelMeshError):
    """A node key could not be created, loaded or derived."""


class ProtocolError(TunnelMeshError):
    """Malformed or unauthenticated bytes from the network. Never changes protocol state."""


class NotBuiltError(TunnelMeshError):
    """A command or feature that exists in the product's design but is not built yet."""
