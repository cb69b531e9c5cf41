"""netlab builds real networks and injects real faults: each test proves it with real packets.

Every check sends traffic through the kernel (veth, bridges, nftables, conntrack) and looks at what arrives;
nothing is mocked. Needs root; the whole file takes about 25 s on two cores.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tunnelmesh.cli.netlab_cmd import netlab as netlab_cli
from tunnelmesh.netlab import Lab, NetlabError, Node, clean_leftovers, list_labs
from tunnelmesh.netlab import cleanup as netlab_cleanup
from tunnelmesh.netlab import namespace as netlab_namespace
from tunnelmesh.netlab.procfs import process_start_time

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="netlab needs root to create network namespaces"),
    pytest.mark.timeout(60),
]

SO_RCVBUFFORCE = 33  # not exported by Python's socket module
# A working path delivers in well under a millisecond; these bound how long a probe waits. Probes that
# expect silence wait briefly, probes that expect an answer are patient with a loaded machine.
BLOCKED_WAIT = 0.4
OPEN_WAIT = 3.0


def lab_netns(lab_id: str) -> list[str]:
    return netlab_cleanup.lab_namespaces(lab_id)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        yield lab
    assert lab_netns(lab.id) == [], "closing the lab must remove all its namespaces"


# -- traffic probes -----------------------------------------------------------------------------------------


def udp_burst(src: Node, dst: Node, count: int, port: int = 9000) -> int:
    """Send `count` numbered datagrams from `src` to `dst` as fast as possible; return how many arrived."""
    with dst.socket() as rx, src.socket() as tx:
        # A big buffer: the burst must not overflow the receiver, or buffer drops would pose as link loss.
        rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        rx.bind((dst.ip, port))
        for seq in range(count):
            tx.sendto(b"%d" % seq, (dst.ip, port))
        return len(drain(rx))


def drain(rx: socket.socket, idle: float = 0.3, deadline: float = 5.0) -> set[int]:
    seen: set[int] = set()
    rx.settimeout(idle)
    end = time.monotonic() + deadline
    with contextlib.suppress(TimeoutError):
        while time.monotonic() < end:
            seen.add(int(rx.recv(64)))
    return seen


def udp_reaches(
    src: Node, dst: Node, dst_ip: str | None = None, *, port: int = 9100, wait: float = OPEN_WAIT
) -> bool:
    """Does a UDP datagram from `src` arrive at `dst` (at `dst_ip`, default its own address)?"""
    with dst.socket() as rx, src.socket() as tx:
        rx.bind(("0.0.0.0", port))
        rx.settimeout(wait)
        for _ in range(3):
            tx.sendto(b"0", (dst_ip or dst.ip, port))
        try:
            rx.recv(16)
        except TimeoutError:
            return False
        return True


def tcp_connects(src: Node, dst: Node, *, port: int = 9200, wait: float = OPEN_WAIT) -> bool:
    """Can `src` open a TCP connection to `dst`?"""
    with dst.socket(type=socket.SOCK_STREAM) as server, src.socket(type=socket.SOCK_STREAM) as client:
        server.bind((dst.ip, port))
        server.listen()
        client.settimeout(wait)
        try:
            client.connect((dst.ip, port))
        except (TimeoutError, ConnectionRefusedError):
            return False
        return True


def udp_blocked(src: Node, dst: Node, dst_ip: str | None = None) -> bool:
    return not udp_reaches(src, dst, dst_ip, wait=BLOCKED_WAIT)


def tcp_blocked(src: Node, dst: Node) -> bool:
    return not tcp_connects(src, dst, wait=BLOCKED_WAIT)


def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll `condition` until it holds or `timeout` s pass (signals and exits take a moment to land)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def reachable_both_ways(x: Node, y: Node, *, wait: float = OPEN_WAIT) -> dict[str, bool]:
    return {
        "tcp x->y": tcp_connects(x, y, wait=wait),
        "tcp y->x": tcp_connects(y, x, wait=wait),
        "udp x->y": udp_reaches(x, y, wait=wait),
        "udp y->x": udp_reaches(y, x, wait=wait),
    }


# -- building -----------------------------------------------------------------------------------------------


def test_hosts_on_one_lan_talk_and_names_fit_the_kernel(lab: Lab) -> None:
    lan = lab.lan("a-rather-long-lan-name", "10.20.0.0/24")
    a = lab.host("a-rather-long-host-name", lan)
    b = lab.host("b", lan, ip="10.20.0.77")

    assert a.ip == "10.20.0.2" and b.ip == "10.20.0.77"
    assert re.fullmatch(r"tm[0-9a-f]{6}-a-rather-long-host-name", a.netns)
    a.run(["ping", "-c1", "-W2", b.ip], timeout=5)
    switch_ifaces = subprocess.run(
        ["ip", "-n", lab.switch_netns, "-o", "link"], capture_output=True, text=True, check=True
    ).stdout
    names = re.findall(r"^\d+: ([^:@]+)", switch_ifaces, re.M)
    assert names and all(len(name) <= 15 for name in names), names
    # The root namespace never sees lab interfaces.
    root = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert not (set(names) - {"lo"}) & set(re.findall(r"^\d+: ([^:@]+)", root, re.M))


def test_bad_input_is_refused_with_a_clear_error(lab: Lab) -> None:
    lan = lab.lan("lan", "10.21.0.0/24")
    lab.host("a", lan, ip="10.21.0.5")
    with pytest.raises(NetlabError, match="overlaps LAN lan"):
        lab.lan("other", "10.21.0.128/25")
    with pytest.raises(NetlabError, match="already taken"):
        lab.host("b", lan, ip="10.21.0.5")
    with pytest.raises(NetlabError, match="name 'Bad_Name' is invalid"):
        lab.host("Bad_Name", lan)
    with pytest.raises(NetlabError, match="already has a node named 'a'"):
        lab.host("a", lan)
    with pytest.raises(NetlabError, match="no router to block UDP at"):
        lab.block_udp(lan)

    inner = lab.lan("inner", "10.22.0.0/24")
    lab.host("squatter", inner, ip=inner.gateway_ip)
    before = (lab_netns(lab.id), [n.name for n in lab.nodes])
    with pytest.raises(NetlabError, match=r"10\.22\.0\.1 is already taken on LAN inner"):
        lab.router("r", wan=lan, lan=inner)
    assert (lab_netns(lab.id), [n.name for n in lab.nodes]) == before, "a refused router leaves no trace"
    assert lab.host("c", lan).ip == "10.21.0.2", "and took no address"


def test_routers_without_nat_announce_their_lan(lab: Lab) -> None:
    core = lab.lan("core", "198.18.0.0/24")
    site = lab.lan("site", "10.30.0.0/24")
    branch = lab.lan("branch", "10.31.0.0/24")
    s = lab.host("s", core)
    a = lab.host("a", site)  # joins before its router exists: gets the default route later
    lab.router("r1", wan=core, lan=site, nat=None)
    lab.router("r2", wan=site, lan=branch, nat=None)
    b = lab.host("b", branch)

    # Private addresses route end to end, two routers deep, both ways.
    s.run(["ping", "-c1", "-W2", b.ip], timeout=5)
    b.run(["ping", "-c1", "-W2", a.ip], timeout=5)
    assert tcp_connects(s, b) and tcp_connects(b, s)


# -- NAT ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eim", "symmetric"])
def test_nat_mapping_behaviour(lab: Lab, mode: str) -> None:
    inet = lab.lan("inet", "198.18.0.0/24")
    home = lab.lan("home", "10.10.1.0/24")
    a = lab.host("a", home)
    servers = [lab.host("s1", inet), lab.host("s2", inet)]
    r = lab.router("r", wan=inet, lan=home, nat=mode)  # type: ignore[arg-type]

    echoes = []
    for s in servers:
        sock = s.socket()
        sock.bind(("0.0.0.0", 3478))
        sock.settimeout(2)
        echoes.append(sock)
    observed = []
    with a.socket() as client:
        client.bind(("0.0.0.0", 40000))
        client.settimeout(2)
        for s, echo in zip(servers, echoes, strict=True):
            client.sendto(b"who am i", (s.ip, 3478))
            _, source = echo.recvfrom(64)
            # Echo the source the server saw; the reply also proves the return path through the NAT.
            echo.sendto(f"{source[0]}:{source[1]}".encode(), source)
            reply, _ = client.recvfrom(64)
            ip, port = reply.decode().split(":")
            observed.append((ip, int(port)))

        assert [ip for ip, _ in observed] == [r.wan_ip, r.wan_ip], (
            "the source must be the router's WAN address"
        )
        ports = [port for _, port in observed]
        if mode == "eim":
            assert ports[0] == ports[1], f"eim must keep one external port for one socket: {observed}"
        else:
            assert ports[0] != ports[1], f"symmetric must map each destination anew: {observed}"

        # Unsolicited packets to the mapping from a port the client never talked to are filtered.
        with servers[0].socket() as stranger:
            stranger.sendto(b"unsolicited", (r.wan_ip, ports[0]))
            client.settimeout(BLOCKED_WAIT)
            with pytest.raises(TimeoutError):
                client.recvfrom(64)
    for sock in echoes:
        sock.close()


def test_nat_hides_the_lan_from_the_internet(lab: Lab) -> None:
    inet = lab.lan("inet", "198.18.0.0/24")
    home = lab.lan("home", "10.10.1.0/24")
    a = lab.host("a", home)
    s = lab.host("s", inet)
    r = lab.router("r", wan=inet, lan=home, nat="eim")

    assert tcp_connects(a, s)
    # Even with a route to the private range, the NAT drops connections that were not started inside.
    s.run(["ip", "route", "add", str(home.subnet), "via", r.wan_ip])
    assert tcp_blocked(s, a)


@pytest.mark.parametrize(("nat_b", "punches"), [("eim", True), ("symmetric", False)])
def test_udp_hole_punching_between_two_nats(lab: Lab, nat_b: str, punches: bool) -> None:
    inet = lab.lan("inet", "198.18.0.0/24")
    home_a = lab.lan("home-a", "10.10.1.0/24")
    home_b = lab.lan("home-b", "10.10.2.0/24")
    a = lab.host("a", home_a)
    b = lab.host("b", home_b)
    reflector = lab.host("reflector", inet)
    lab.router("ra", wan=inet, lan=home_a, nat="eim")
    lab.router("rb", wan=inet, lan=home_b, nat=nat_b)  # type: ignore[arg-type]

    with reflector.socket() as refl, a.socket() as sock_a, b.socket() as sock_b:
        refl.bind(("0.0.0.0", 3478))
        refl.settimeout(2)
        seen_as: dict[str, tuple[str, int]] = {}
        for name, sock in (("a", sock_a), ("b", sock_b)):
            sock.bind(("0.0.0.0", 41641))
            sock.sendto(name.encode(), (reflector.ip, 3478))
            data, source = refl.recvfrom(16)
            seen_as[data.decode()] = source
        # Each side sends to the other's endpoint as the reflector saw it; its own outbound packet opens its
        # NAT for the answer. a sends first, so a's first packet reaches b's NAT before b opened it.
        for _ in range(3):
            sock_a.sendto(b"from a", seen_as["b"])
            sock_b.sendto(b"from b", seen_as["a"])
        wait = OPEN_WAIT if punches else BLOCKED_WAIT
        a_heard = udp_received(sock_a, wait)
        b_heard = udp_received(sock_b, wait)
    if punches:
        assert a_heard and b_heard, "two endpoint-independent NATs let a simultaneous punch through"
    else:
        assert not a_heard and not b_heard, "a symmetric NAT defeats hole punching"


def udp_received(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        sock.recv(64)
    except TimeoutError:
        return False
    return True


# -- loss ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_loss_is_measured_in_the_chosen_direction_only(lab: Lab, direction: str) -> None:
    lan = lab.lan("lan", "10.40.0.0/24")
    a = lab.host("a", lan)
    b = lab.host("b", lan)
    lab.set_loss(a, 30, direction)  # type: ignore[arg-type]

    # Egress loss on a hits a->b; ingress loss on a hits b->a.
    sender, receiver = (a, b) if direction == "egress" else (b, a)
    sent = 2000
    lost = 1 - udp_burst(sender, receiver, sent) / sent
    assert 0.25 <= lost <= 0.35, f"30 % {direction} loss measured as {lost:.1%}"
    other = 1 - udp_burst(receiver, sender, sent) / sent
    assert other <= 0.005, f"the other direction must be unaffected, lost {other:.1%}"

    lab.set_loss(a, 0)  # changeable at runtime: 0 removes it
    assert udp_burst(sender, receiver, 500) == 500


def test_loss_on_both_directions_and_on_one_link(lab: Lab) -> None:
    inet = lab.lan("inet", "198.18.0.0/24")
    home = lab.lan("home", "10.10.1.0/24")
    a = lab.host("a", home)
    b = lab.host("b", home)
    s = lab.host("s", inet)
    r = lab.router("r", wan=inet, lan=home, nat=None)
    lab.set_loss(r, 20, "both", lan=inet)  # only the router's uplink

    sent = 2000
    up = 1 - udp_burst(a, s, sent) / sent
    down = 1 - udp_burst(s, a, sent) / sent
    assert 0.15 <= up <= 0.25 and 0.15 <= down <= 0.25, (up, down)
    assert udp_burst(a, b, 500) == 500, "traffic inside the LAN does not cross the lossy uplink"


# -- partitions ---------------------------------------------------------------------------------------------


def test_partition_blocks_tcp_and_udp_both_ways_and_heals(lab: Lab) -> None:
    core = lab.lan("core", "198.18.0.0/24")
    site = lab.lan("site", "10.50.0.0/24")
    a = lab.host("a", site)
    b = lab.host("b", site)
    c = lab.host("c", core)
    lab.router("r", wan=core, lan=site, nat=None)
    everything_up = {"tcp x->y": True, "tcp y->x": True, "udp x->y": True, "udp y->x": True}
    everything_down = dict.fromkeys(everything_up, False)

    p = lab.partition([a], [b, c])
    assert reachable_both_ways(a, b, wait=BLOCKED_WAIT) == everything_down  # same LAN
    assert reachable_both_ways(a, c, wait=BLOCKED_WAIT) == everything_down  # through a router
    assert reachable_both_ways(b, c) == everything_up  # the rest of the network is untouched
    p.heal()
    assert reachable_both_ways(a, b) == everything_up
    assert reachable_both_ways(a, c) == everything_up


def test_partition_through_nat_and_as_context_manager(lab: Lab) -> None:
    inet = lab.lan("inet", "198.18.0.0/24")
    home = lab.lan("home", "10.10.1.0/24")
    a = lab.host("a", home)
    s = lab.host("s", inet)
    other = lab.host("other", inet)
    lab.router("r", wan=inet, lan=home, nat="symmetric")

    with lab.partition([a]):  # a against everyone else
        assert tcp_blocked(a, s) and udp_blocked(a, s)
        assert tcp_connects(other, s), "hosts outside the partition still talk"
        late = lab.host("late", inet)
        assert tcp_blocked(a, late), "'everyone else' includes nodes added later"
    assert tcp_connects(a, s) and udp_reaches(a, s)


# -- UDP blocking -------------------------------------------------------------------------------------------


def test_udp_blocked_network_keeps_tcp_and_local_udp(lab: Lab) -> None:
    inet = lab.lan("inet", "198.18.0.0/24")
    office = lab.lan("office", "10.10.1.0/24")
    a = lab.host("a", office)
    b = lab.host("b", office)
    s = lab.host("s", inet)
    r = lab.router("r", wan=inet, lan=office, nat=None)

    with lab.block_udp(office):
        assert udp_blocked(a, s), "UDP must not leave the blocked network"
        assert udp_blocked(s, a), "UDP must not enter the blocked network"
        assert udp_blocked(s, r, r.wan_ip), "the firewall itself is not reachable over UDP either"
        assert tcp_connects(a, s), "TCP still works"
        assert udp_reaches(a, b), "UDP inside the network still works"
        a.run(["ping", "-c1", "-W2", s.ip], timeout=5)
    assert udp_reaches(a, s) and udp_reaches(s, a)


def test_udp_blocked_host(lab: Lab) -> None:
    lan = lab.lan("lan", "10.60.0.0/24")
    a = lab.host("a", lan)
    b = lab.host("b", lan)
    block = lab.block_udp(a)
    assert udp_blocked(a, b) and udp_blocked(b, a)
    assert tcp_connects(a, b) and tcp_connects(b, a)
    block.remove()
    assert udp_reaches(a, b) and udp_reaches(b, a)

    lab.partition([a], [b])
    lab.block_udp(b)
    lab.set_loss(a, 50)
    lab.clear_faults()
    assert lab.faults == []
    assert udp_burst(a, b, 500) == 500 and tcp_connects(b, a)


# -- processes and entering namespaces ----------------------------------------------------------------------


def test_run_returns_output_and_fails_loudly(lab: Lab) -> None:
    lan = lab.lan("lan", "10.70.0.0/24")
    a = lab.host("a", lan)

    done = a.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
    assert done.returncode == 0 and f"inet {a.ip}/24" in done.stdout
    assert done.args == ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]
    assert a.run("sh -c 'exit 3'", check=False).returncode == 3
    with pytest.raises(NetlabError, match=r"`ls /nonexistent` on a failed \(exit 2\): .*No such file"):
        a.run(["ls", "/nonexistent"])
    started = time.monotonic()
    with pytest.raises(NetlabError, match=r"`sleep 10` on a did not finish within 0.3s"):
        a.run(["sleep", "10"], timeout=0.3)
    # A background child holding the output pipe does not stretch the deadline, and dies with the command.
    with pytest.raises(NetlabError, match=r"did not finish within 0\.3s"):
        a.run(["sh", "-c", "sleep 20 &"], timeout=0.3)
    assert time.monotonic() - started < 3
    assert eventually(lambda: not any(netlab_namespace.pids_in([a.netns]).values())), "the child was killed"


def test_spawned_processes_log_and_stop(lab: Lab) -> None:
    inet = lab.lan("inet", "198.18.0.0/24")
    home = lab.lan("home", "10.10.1.0/24")
    a = lab.host("a", home)
    s = lab.host("s", inet)
    r = lab.router("r", wan=inet, lan=home, nat="eim")

    talker = a.spawn(["sh", "-c", "echo to-stdout; echo to-stderr >&2; exec sleep 30"], name="talker")
    talker.wait_for_log("to-stderr", timeout=5)
    with pytest.raises(NetlabError, match=r"still running after 0\.1s"):
        talker.wait(timeout=0.1)
    assert talker.stop(timeout=2) == -signal.SIGTERM
    assert talker.log_path.parent == lab.log_dir
    assert "to-stdout" in talker.log_text() and "to-stderr" in talker.log_text()

    server = s.spawn(["iperf3", "-s", "-1"], name="iperf")
    s.wait_listening(5201, timeout=5)
    client = a.run(["iperf3", "-c", s.ip, "-t", "1", "-J"], timeout=15)
    assert '"sum_received"' in client.stdout
    assert server.wait(timeout=5) == 0
    assert f"Accepted connection from {r.wan_ip}" in server.log_text(), "the server sees the NAT's address"

    stubborn = a.spawn("sleep 300")
    assert stubborn.running
    lab.close()
    assert not stubborn.running, "closing the lab stops processes still running"


def test_enter_moves_only_the_current_thread(lab: Lab) -> None:
    lan = lab.lan("lan", "10.80.0.0/24")
    a = lab.host("a", lan)

    def own_netns() -> str:
        return os.readlink("/proc/thread-self/ns/net")

    outside = own_netns()
    go = threading.Event()
    seen_by_other_thread: list[str] = []

    def look_when_told() -> None:
        go.wait(5)
        seen_by_other_thread.append(own_netns())

    other = threading.Thread(target=look_when_told)
    other.start()
    with a.enter():
        inside = own_netns()
        go.set()
        other.join(5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((a.ip, 0))  # only possible inside a's namespace
    assert inside != outside
    assert seen_by_other_thread == [outside], "a thread already running stays where it was"
    assert own_netns() == outside, "leaving the block returns the thread home"


# -- clean-up -----------------------------------------------------------------------------------------------


def test_close_removes_namespaces_state_and_temporary_logs() -> None:
    with Lab() as lab:
        lan = lab.lan("lan", "10.90.0.0/24")
        lab.host("a", lan)
        lab.router("r", wan=lan, lan=lab.lan("in", "10.91.0.0/24"))
        assert len(lab_netns(lab.id)) == 3 and netlab_cleanup.state_path(lab.id).exists()
        log_dir = lab.log_dir
    assert lab_netns(lab.id) == []
    assert not netlab_cleanup.state_path(lab.id).exists()
    assert not log_dir.exists()

    with pytest.raises(RuntimeError), Lab() as failed:
        raise RuntimeError("test failure")
    assert lab_netns(failed.id) == []
    assert failed.log_dir.is_dir(), "logs are kept when the lab exits with an error"
    failed.log_dir.rmdir()


CRASHING_OWNER = textwrap.dedent(
    """
    import sys, time
    from tunnelmesh.netlab import Lab
    lab = Lab(clean_stale=False)
    lan = lab.lan("lan", "10.99.0.0/24")
    a = lab.host("a", lan)
    lab.host("b", lan)
    sleeper = a.spawn(["sleep", "300"])
    print(lab.id, sleeper.pid, flush=True)
    if sys.argv[1] == "exit":
        sys.exit(0)  # without closing: atexit must clean up
    time.sleep(300)
    """
)


@pytest.fixture
def private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep this test's crashed lab out of sight of other test runs on the machine: their `Lab()` would
    otherwise clean it up (correctly) before this test gets to check that clean-up works."""
    state_dir = tmp_path / "state"
    monkeypatch.setattr(netlab_cleanup, "STATE_DIR", state_dir)
    monkeypatch.setenv("TUNNELMESH_NETLAB_STATE_DIR", str(state_dir))
    return state_dir


def start_owner(mode: str) -> tuple[subprocess.Popen[str], str, int]:
    owner = subprocess.Popen(
        [sys.executable, "-c", CRASHING_OWNER, mode],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert owner.stdout is not None
    line = owner.stdout.readline().split()  # bounded by the test timeout
    assert len(line) == 2, f"owner did not report its lab (exit {owner.poll()})"
    return owner, line[0], int(line[1])


def pid_alive(pid: int) -> bool:
    return process_start_time(pid) is not None


def test_leftovers_of_a_killed_owner_are_cleaned(private_state_dir: Path) -> None:
    owner, lab_id, sleeper_pid = start_owner("crash")
    try:
        assert netlab_cleanup.state_path(lab_id).parent == private_state_dir
        assert netlab_cleanup.state_path(lab_id).exists()
        assert len(lab_netns(lab_id)) == 3
        owner.kill()  # SIGKILL: no atexit, no finally
        owner.wait(timeout=5)
        assert len(lab_netns(lab_id)) == 3 and pid_alive(sleeper_pid), "a SIGKILL leaves the lab behind"

        listed = CliRunner().invoke(netlab_cli, ["list"])
        assert listed.exit_code == 0
        assert re.search(rf"^{lab_id}\s+{owner.pid}\s+orphaned\s", listed.output, re.M), listed.output
        cleaned = CliRunner().invoke(netlab_cli, ["clean"])
        assert cleaned.exit_code == 0 and lab_id in cleaned.output, cleaned.output

        assert lab_netns(lab_id) == []
        assert not pid_alive(sleeper_pid), "processes of the dead lab are killed"
        assert lab_id not in {rec.lab_id for rec in list_labs()}
        assert not netlab_cleanup.state_path(lab_id).exists()
    finally:
        if owner.poll() is None:
            owner.kill()
        with contextlib.suppress(NetlabError):
            netlab_cleanup.destroy_lab(lab_id)


def test_live_labs_are_never_cleaned_and_atexit_cleans_on_exit() -> None:
    with Lab() as mine:
        assert mine.id not in clean_leftovers(), "a lab whose owner is alive is left alone"
        assert lab_netns(mine.id)

    owner, lab_id, sleeper_pid = start_owner("exit")
    try:
        owner.wait(timeout=15)
        assert lab_netns(lab_id) == [] and not pid_alive(sleeper_pid)
        assert not netlab_cleanup.state_path(lab_id).exists()
    finally:
        if owner.poll() is None:
            owner.kill()
        with contextlib.suppress(NetlabError):
            netlab_cleanup.destroy_lab(lab_id)
