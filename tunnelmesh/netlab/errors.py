"""The one exception type netlab raises on purpose."""

from tunnelmesh.errors import TunnelMeshError


class NetlabError(TunnelMeshError):
    """A virtual network could not be built, changed or torn down.

    The message names what failed: the command line and its stderr, or the lab, node or file involved.
    """
