"""wg-quick's ``DNS`` in `tunnelmesh dataplane up` (a real process in a netlab host): the name servers and
search domains go to the system through a real openresolv while the interface is up, names resolve through the
tunnel (glibc's resolver asking a dnsmasq behind a Debian wireguard-go peer), and they are taken back on the
way down; a missing or failing resolvconf fails `up` with the reason and leaves nothing behind.

Isolation: every process netlab starts runs under ``ip netns exec``, which bind-mounts the files of
``/etc/netns/<namespace>/`` over ``/etc``. The test puts a ``resolv.conf`` and a ``resolvconf.conf`` (state
in the test's directory, no subscriber but libc) there, so neither the machine's resolver nor its
openresolv state is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop.dataplane_helpers import ROOT, WG_PORT, PeerSpec, TmNode, WgGoNode, genkey, wg_quick_text
from tunnelmesh.netlab import Lab
from tunnelmesh.netlab.process import Process
from tunnelmesh.netlab.topology import Host, Lan
from tunnelmesh.node import resolvconf


def _openresolv() -> bool:
    """The isolation below relies on openresolv's resolvconf.conf (state_dir, resolv_conf)."""
    exe = shutil.which("resolvconf")
    if exe is None:
        return False
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10, check=False)
    return out.stdout.startswith("openresolv")


pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates network namespaces and TUN devices"),
    pytest.mark.skipif(
        not _openresolv(),
        reason="another resolvconf than openresolv is installed (scripts/install-system-deps)",
    ),
    pytest.mark.timeout(90),
]

TM_IP, WG_IP = "10.68.1.1", "10.68.1.2"
PRINTER = "10.68.9.9"  # what the DNS server behind the tunnel answers for printer.corp.test
BEFORE = "# the namespace's own resolver\nnameserver 127.0.0.1\n"
RESOLVE = "import socket, sys; print(socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET)[0][4][0])"


class NetnsEtc:
    """``/etc/netns/<namespace>/``: the resolver files processes in that namespace see as /etc's."""

    def __init__(self, host: Host, state: Path) -> None:
        self.dir = Path("/etc/netns") / host.netns
        self.dir.mkdir(parents=True)
        self.resolv_conf = self.dir / "resolv.conf"
        self.resolv_conf.write_text(BEFORE)
        self.state = state
        (self.dir / "resolvconf.conf").write_text(f"resolv_conf=/etc/resolv.conf\nstate_dir={state}\n")

    def records(self) -> list[str]:
        d = self.state / "interfaces"
        return sorted(p.name for p in d.iterdir()) if d.exists() else []

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(log_dir=tmp_path / "netlab") as lab:
        yield lab


@dataclass
class Setup:
    lan: Lan
    host: Host  # where `dataplane up` runs, with its own resolver files
    files: NetnsEtc


@pytest.fixture
def setup(lab: Lab, tmp_path: Path) -> Iterator[Setup]:
    lan = lab.lan("l", "10.68.0.0/24")
    host = lab.host("tm", lan)
    files = NetnsEtc(host, tmp_path / "resolvconf-state")
    try:
        yield Setup(lan, host, files)
    finally:
        files.remove()


def test_dns_servers_and_search_domains_are_used_while_up(lab: Lab, setup: Setup, tmp_path: Path) -> None:
    h_tm, files = setup.host, setup.files
    h_wg = lab.host("wg", setup.lan)
    tm = TmNode(h_tm, f"tmd{lab.id}", tmp_path, tmp_path / "run")
    wgo = WgGoNode(h_wg, f"wgd{lab.id}", tmp_path)
    wgo.up(f"{WG_IP}/24", [PeerSpec(tm.pub, f"{TM_IP}/32")])
    queries = tmp_path / "dnsmasq.log"
    dnsmasq = h_wg.spawn(
        [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--user=root", "--no-resolv",
            "--no-hosts", "--bind-interfaces", f"--listen-address={WG_IP}", "--log-queries",
            f"--log-facility={queries}", f"--address=/printer.corp.test/{PRINTER}",
        ],
        name=f"dnsmasq-{time.monotonic_ns()}",
    )  # fmt: skip
    h_wg.wait_listening(53, proto="udp", timeout=10)

    tm.up(
        f"{TM_IP}/24",
        [PeerSpec(wgo.pub, f"{WG_IP}/32", f"{h_wg.ip}:{WG_PORT}")],
        interface=[f"DNS = {WG_IP}, corp.test", "DNS = corp.test"],  # repeated items count once
    )
    conf = files.resolv_conf.read_text()
    assert f"nameserver {WG_IP}" in conf and "search corp.test" in conf
    assert "127.0.0.1" not in conf  # exclusive (-x): only the tunnel's name server
    assert files.records() == [resolvconf.record_name(tm.iface)]
    # A short name: the search domain completes it, and the query goes through the tunnel.
    got = h_tm.run([sys.executable, "-c", RESOLVE, "printer"], timeout=20).stdout.strip()
    assert got == PRINTER
    assert f"query[A] printer.corp.test from {TM_IP}" in queries.read_text()
    assert tm.peer(wgo.pub)["rx_bytes"] > 0

    tm.down()
    assert tm.proc is not None and tm.proc.returncode == 0
    assert files.resolv_conf.read_text() == BEFORE  # openresolv put back what was there
    assert files.records() == []
    assert "event=dns_unset" in tm.proc.log_text()
    dnsmasq.stop()


def _spawn_up(host: Host, tmp_path: Path, iface: str, fake_resolvconf: str | None) -> tuple[Path, Process]:
    """`dataplane up` of a one-interface config with DNS; returns the PostUp log and the process. PATH has no
    resolvconf (it is in /usr/sbin) but, if given, a shell script ``fake_resolvconf`` by that name."""
    log = tmp_path / "postup.log"
    key, _ = genkey()
    conf = tmp_path / f"{iface}.conf"
    conf.write_text(
        wg_quick_text(key, "10.68.2.1/24", [], interface=["DNS = 10.68.2.53", f"PostUp = touch {log}"])
    )
    conf.chmod(0o600)
    path = ["/usr/bin", "/bin"]
    if fake_resolvconf is not None:
        fake = tmp_path / "bin"
        fake.mkdir()
        (fake / "resolvconf").write_text(f"#!/bin/sh\n{fake_resolvconf}\n")
        (fake / "resolvconf").chmod(0o755)
        path.insert(0, str(fake))
    proc = host.spawn(
        [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "up", "--config", str(conf)],
        name=f"tm-{iface}-{time.monotonic_ns()}",
        env={"TUNNELMESH_RUN_DIR": str(tmp_path / "run"), "PYTHONPATH": str(ROOT), "PATH": ":".join(path)},
    )
    return log, proc


def test_up_fails_without_resolvconf(setup: Setup, tmp_path: Path) -> None:
    host, files = setup.host, setup.files
    iface = f"tmn{os.getpid() % 10000}"
    log, proc = _spawn_up(host, tmp_path, iface, None)
    assert proc.wait(30) == 1
    assert "the config sets DNS, which needs `resolvconf`" in proc.log_text()
    assert host.run(["ip", "link", "show", iface], check=False).returncode != 0  # taken down again
    assert not log.exists()  # PostUp never ran
    assert files.resolv_conf.read_text() == BEFORE


def test_a_failing_resolvconf_fails_up_and_is_reported(setup: Setup, tmp_path: Path) -> None:
    host, files = setup.host, setup.files
    iface = f"tmr{os.getpid() % 10000}"
    log, proc = _spawn_up(
        host, tmp_path, iface, "echo 'resolvconf: cannot write /etc/resolv.conf' >&2; exit 4"
    )
    assert proc.wait(30) == 1
    assert "exited with status 4: resolvconf: cannot write /etc/resolv.conf" in proc.log_text()
    assert host.run(["ip", "link", "show", iface], check=False).returncode != 0
    assert not log.exists()
    assert files.resolv_conf.read_text() == BEFORE


def test_a_failing_dns_removal_is_reported_and_the_interface_still_goes(setup: Setup, tmp_path: Path) -> None:
    host = setup.host
    iface = f"tmu{os.getpid() % 10000}"
    calls = tmp_path / "calls"
    script = f'echo "$*" >> {calls}; [ "$1" = -a ] && exit 0; echo "no such record" >&2; exit 5'
    log, proc = _spawn_up(host, tmp_path, iface, script)
    proc.wait_for_log(r"interface \S+ up", timeout=20)
    assert log.exists()  # PostUp ran after DNS was set
    subprocess.run(
        [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "down", iface],
        env={"TUNNELMESH_RUN_DIR": str(tmp_path / "run"), "PYTHONPATH": str(ROOT)},
        check=True,
        timeout=15,
    )
    assert proc.wait(15) == 1
    assert (
        "cannot remove DNS: " in proc.log_text() and "exited with status 5: no such record" in proc.log_text()
    )
    assert host.run(["ip", "link", "show", iface], check=False).returncode != 0
    record = resolvconf.record_name(iface)
    assert calls.read_text().splitlines() == [f"-a {record} -m 0 -x", f"-d {record} -f"]
    # The record may still be set: the marker stays, and `down` (no process left) tries again.
    assert (tmp_path / "run" / f"{iface}.dns").exists()
    retry = subprocess.run(
        [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "down", iface],
        env={
            "TUNNELMESH_RUN_DIR": str(tmp_path / "run"),
            "PYTHONPATH": str(ROOT),
            "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert retry.returncode != 0 and "exited with status 5: no such record" in retry.stderr
    assert calls.read_text().splitlines()[2:] == [f"-d {record} -f"]


def test_a_killed_up_leaves_its_dns_record_to_down_or_the_next_up(setup: Setup, tmp_path: Path) -> None:
    """`kill -9` of `up` leaves the record (nothing runs on the way down): the host keeps asking the dead
    tunnel's name server. `down IFACE` finds no process and takes the record back; so does the next `up` of
    the interface, even one without DNS."""
    host, files = setup.host, setup.files
    iface = f"tmk{os.getpid() % 10000}"
    run = tmp_path / "run"
    env = {"TUNNELMESH_RUN_DIR": str(run), "PYTHONPATH": str(ROOT), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    marker, record = run / f"{iface}.dns", resolvconf.record_name(iface)
    key, _ = genkey()
    with_dns, without_dns = tmp_path / "dns.conf", tmp_path / "plain.conf"
    with_dns.write_text(wg_quick_text(key, "10.68.2.1/24", [], interface=["DNS = 10.68.2.53"]))
    without_dns.write_text(wg_quick_text(key, "10.68.2.1/24", []))
    for conf in (with_dns, without_dns):
        conf.chmod(0o600)

    def up(conf: Path) -> Process:
        argv = [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "up", "--config", str(conf)]
        proc = host.spawn([*argv, "--interface", iface], name=f"tm-{iface}-{time.monotonic_ns()}", env=env)
        proc.wait_for_log(r"interface \S+ up", timeout=20)
        return proc

    def down() -> subprocess.CompletedProcess[str]:  # in the namespace: resolvconf works on its files
        argv = [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "down", iface]
        return host.run(argv, env=env, check=False, timeout=30)

    def killed_with_its_record_left() -> None:
        proc = up(with_dns)
        assert marker.exists()
        proc.kill()
        assert "nameserver 10.68.2.53" in files.resolv_conf.read_text()
        assert files.records() == [record]

    def record_gone() -> None:
        assert files.resolv_conf.read_text() == BEFORE
        assert files.records() == [] and not marker.exists()

    killed_with_its_record_left()
    out = down()
    assert out.returncode == 0, out.stderr
    assert "was not running (its `up` process died); removed its DNS record" in out.stdout
    record_gone()
    again = down()  # nothing left to clean: the usual answer
    assert again.returncode != 0 and "is not running" in again.stderr

    killed_with_its_record_left()
    plain = up(without_dns)
    assert "event=dns_stale_record_removed" in plain.log_text()
    record_gone()
    plain.stop()


def _spawn_up_to_peer(host: Host, tmp_path: Path, iface: str, endpoint: str, env: dict[str, str]) -> Process:
    """`dataplane up` of a config with one peer at ``endpoint`` (a host name)."""
    key, _ = genkey()
    _, peer_pub = genkey()
    conf = tmp_path / f"{iface}.conf"
    conf.write_text(wg_quick_text(key, f"{TM_IP}/24", [PeerSpec(peer_pub, f"{WG_IP}/32", endpoint)]))
    conf.chmod(0o600)
    return host.spawn(
        [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "up", "--config", str(conf)],
        name=f"tm-{iface}-{time.monotonic_ns()}",
        env={"TUNNELMESH_RUN_DIR": str(tmp_path / "run"), "PYTHONPATH": str(ROOT), **env},
    )


def _name_server(host: Host, tmp_path: Path, answers: dict[str, str]) -> Process:
    """dnsmasq on the namespace's 127.0.0.1 (its resolv.conf's server), the only server for ``.test``: other
    names there get NXDOMAIN."""
    records = [f"--host-record={name},{ip}" for name, ip in answers.items()]
    proc = host.spawn(
        [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--user=root", "--no-resolv",
            "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1", "--local=/test/", *records,
        ],
        name=f"dnsmasq-{time.monotonic_ns()}",
    )  # fmt: skip
    host.wait_listening(53, proto="udp", timeout=10)
    return proc


def test_endpoint_names_wait_for_a_name_server_that_is_not_up_yet(
    lab: Lab, setup: Setup, tmp_path: Path
) -> None:
    """As wg(8) at boot: the name server does not answer yet (nothing listens on the resolv.conf's 127.0.0.1),
    so `up` retries, saying so, and comes up once the name resolves; the peer is reached at that address."""
    host = setup.host
    h_wg = lab.host("wg", setup.lan)
    tm = TmNode(host, f"tmw{lab.id}", tmp_path, tmp_path / "run")  # for show and down
    wgo = WgGoNode(h_wg, f"wgw{lab.id}", tmp_path)
    wgo.up(f"{WG_IP}/24", [PeerSpec(tm.pub, f"{TM_IP}/32")])
    conf = tmp_path / f"{tm.iface}.conf"
    conf.write_text(
        wg_quick_text(tm.key, f"{TM_IP}/24", [PeerSpec(wgo.pub, f"{WG_IP}/32", f"peer.test:{WG_PORT}")])
    )
    conf.chmod(0o600)
    tm.proc = host.spawn(
        [sys.executable, "-m", "tunnelmesh.cli.dataplane_cmd", "up", "--config", str(conf)],
        name=f"tm-{tm.iface}-{time.monotonic_ns()}",
        env=tm.env,
    )
    tm.proc.wait_for_log(r"event=endpoint_resolve_retry .*host=peer\.test .*retry=1/15", timeout=20)
    dnsmasq = _name_server(host, tmp_path, {"peer.test": h_wg.ip})
    tm.proc.wait_for_log(r"interface \S+ up", timeout=30)
    assert tm.peer(wgo.pub)["endpoint"] == f"{h_wg.ip}:{WG_PORT}"
    host.run(["ping", "-c", "2", "-W", "3", WG_IP], timeout=15)  # the handshake went to that address
    assert tm.peer(wgo.pub)["latest_handshake"]
    tm.down()
    assert tm.proc.returncode == 0
    dnsmasq.stop()


def test_endpoint_names_that_cannot_resolve_fail_up_without_waiting(setup: Setup, tmp_path: Path) -> None:
    """A name the server says does not exist is final: no retry. With WG_ENDPOINT_RESOLUTION_RETRIES=0, a
    server that does not answer fails `up` at once too. Nothing is left behind either way."""
    host = setup.host
    iface = f"tmx{os.getpid() % 10000}"
    proc = _spawn_up_to_peer(
        host, tmp_path, iface, f"peer.test:{WG_PORT}", {"WG_ENDPOINT_RESOLUTION_RETRIES": "0"}
    )
    assert proc.wait(30) == 1
    assert "Endpoint host 'peer.test' does not resolve now:" in proc.log_text()
    assert "endpoint_resolve_retry" not in proc.log_text()

    dnsmasq = _name_server(host, tmp_path, {"other.test": "10.68.0.99"})
    proc = _spawn_up_to_peer(host, tmp_path, iface, f"peer.test:{WG_PORT}", {})
    assert proc.wait(30) == 1
    assert "Endpoint host 'peer.test' does not resolve: Name or service not known" in proc.log_text()
    assert "endpoint_resolve_retry" not in proc.log_text()
    assert host.run(["ip", "link", "show", iface], check=False).returncode != 0

    proc = _spawn_up_to_peer(
        host, tmp_path, iface, f"peer.test:{WG_PORT}", {"WG_ENDPOINT_RESOLUTION_RETRIES": "x"}
    )
    assert proc.wait(30) == 1
    assert "WG_ENDPOINT_RESOLUTION_RETRIES='x': expected a number of retries or 'infinity'" in proc.log_text()
    dnsmasq.stop()
