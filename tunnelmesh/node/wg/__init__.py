"""Sans-I/O WireGuard protocol: Noise IKpsk2 handshake, cookies, replay window, timers, sessions.

No sockets, threads, clock reads or OS randomness: the I/O shell (``node/dataplane.py``) feeds
:class:`~.device.Device` datagrams, IP packets and ``now``, and carries out the actions it returns
(see ``device.py``). One module per concern, as in wireguard-go's ``device/`` package.
"""

from .actions import (
    Action,
    DeliverPacket,
    Drop,
    DropReason,
    EndpointChanged,
    HandshakeCompleted,
    HandshakeGaveUp,
    KeysZeroed,
    SendDatagram,
)
from .device import Device
from .keypair import Keypair

__all__ = [
    "Action",
    "DeliverPacket",
    "Device",
    "Drop",
    "DropReason",
    "EndpointChanged",
    "HandshakeCompleted",
    "HandshakeGaveUp",
    "Keypair",
    "KeysZeroed",
    "SendDatagram",
]
