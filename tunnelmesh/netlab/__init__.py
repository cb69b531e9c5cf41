"""Virtual networks built from network namespaces, for tests, benchmarks, the chaos harness and the demo.

A `Lab` holds hosts and routers (one network namespace each) on LAN segments (bridges in a lab-private
switch namespace), NAT routers ("eim" or "symmetric"), and faults switched on at runtime: packet loss,
partitions, UDP-blocking firewalls. Everything is removed when the lab closes, and `clean_leftovers()`
removes labs whose owner process died. See docs/netlab.md.
"""

from tunnelmesh.netlab.cleanup import LabRecord, clean_leftovers, list_labs
from tunnelmesh.netlab.errors import NetlabError
from tunnelmesh.netlab.faults import Fault, Partition, UdpBlock
from tunnelmesh.netlab.lab import Lab
from tunnelmesh.netlab.process import Process
from tunnelmesh.netlab.topology import Host, Interface, Lan, Node, Router

__all__ = [
    "Fault",
    "Host",
    "Interface",
    "Lab",
    "LabRecord",
    "Lan",
    "NetlabError",
    "Node",
    "Partition",
    "Process",
    "Router",
    "UdpBlock",
    "clean_leftovers",
    "list_labs",
]
