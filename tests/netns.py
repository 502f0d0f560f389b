"""A small private network of hosts built from Linux network namespaces, for partition tests.

Topology (all of it created here, removed by :meth:`Lan.close`; nothing else is touched)::

    root namespace (the test, ZooKeeper, the API server)
      10.A.B.1/25 ── veth ──┐
                            br0 (in its own namespace)
    host h1: 10.A.B.11/25 ──┤      also, per host, a direct veth to the root namespace:
    host h2: 10.A.B.12/25 ──┤        root 10.A.B.(129+4i)/30 <-> host 10.A.B.(130+4i)/30
    host h3: 10.A.B.13/25 ──┘        (its clients' path, which a partition leaves up)

``A.B`` is derived from the test process id so that concurrent runs do not collide; the subnets
are checked to be unused on this machine first. Traffic flows only between these hosts and the
root namespace's new addresses (and each namespace's own loopback): there is no route, NAT or
forwarding to any other address.

:meth:`cut` takes a host's LAN port down (it loses its peers, ZooKeeper and the API server, its
direct client path stays); :meth:`heal` brings it back. Needs root and iproute2's ``ip``.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def unavailable_reason() -> str | None:
    """Why partition tests cannot run here (None if they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2's 'ip' is not installed"
    probe = f"chatd-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class Lan:
    def __init__(self, hosts: list[str]):
        pid = os.getpid()
        self.tag = f"{pid % 100000}"
        a, b = 100 + pid % 100, (pid // 100) % 250
        self.net = f"10.{a}.{b}"
        used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
        if f"10.{a}.{b}." in used:
            raise RuntimeError(f"subnet 10.{a}.{b}.0/24 is in use on this machine")
        self.bridge_ns = f"chatd-{self.tag}-br"
        self.root_addr = f"{self.net}.1"
        self.hosts = {h: f"chatd-{self.tag}-{h}" for h in hosts}  # host -> namespace
        self.addrs = {h: f"{self.net}.{11 + i}" for i, h in enumerate(hosts)}
        self.direct = {h: f"{self.net}.{130 + 4 * i}" for i, h in enumerate(hosts)}
        self._root_links: list[str] = []
        self._namespaces: list[str] = []
        try:
            self._build(hosts)
        except BaseException:
            self.close()
            raise

    def _ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("link", "set", "lo", "up", ns=name)

    def _build(self, hosts: list[str]) -> None:
        self._ns(self.bridge_ns)
        _ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
        _ip("link", "set", "br0", "up", ns=self.bridge_ns)
        self._lan_port("r", None, f"{self.root_addr}/25")
        for i, h in enumerate(hosts):
            ns = self.hosts[h]
            self._ns(ns)
            self._lan_port(f"h{i}", ns, f"{self.addrs[h]}/25")
            # the direct client path: root <-> host, a /30 of its own
            root_end, host_end = f"c{self.tag}d{i}", f"c{self.tag}e{i}"
            _ip("link", "add", root_end, "type", "veth", "peer", "name", host_end)
            self._root_links.append(root_end)
            _ip("link", "set", host_end, "netns", ns)
            _ip("addr", "add", f"{self.net}.{129 + 4 * i}/30", "dev", root_end)
            _ip("link", "set", root_end, "up")
            _ip("addr", "add", f"{self.direct[h]}/30", "dev", host_end, ns=ns)
            _ip("link", "set", host_end, "up", ns=ns)

    def _lan_port(self, name: str, ns: str | None, addr: str) -> None:
        """A veth from ``ns`` (None: the root namespace) to the bridge, with ``addr`` on it."""
        end, port = f"c{self.tag}{name}", f"p{name}"
        _ip("link", "add", end, "type", "veth", "peer", "name", f"c{self.tag}{name}x")
        if ns is None:
            self._root_links.append(end)
        else:
            _ip("link", "set", end, "netns", ns)
        _ip("link", "set", f"c{self.tag}{name}x", "netns", self.bridge_ns)
        _ip("link", "set", f"c{self.tag}{name}x", "name", port, ns=self.bridge_ns)
        _ip("link", "set", port, "master", "br0", ns=self.bridge_ns)
        _ip("link", "set", port, "up", ns=self.bridge_ns)
        _ip("addr", "add", addr, "dev", end, ns=ns)
        _ip("link", "set", end, "up", ns=ns)

    def _port_of(self, host: str) -> str:
        return f"ph{list(self.hosts).index(host)}"

    def cut(self, host: str) -> None:
        """Partition ``host`` from every other host and the root namespace's LAN address."""
        _ip("link", "set", self._port_of(host), "down", ns=self.bridge_ns)

    def heal(self, host: str) -> None:
        _ip("link", "set", self._port_of(host), "up", ns=self.bridge_ns)

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host]]

    def close(self) -> None:
        for ns in reversed(self._namespaces):  # deleting a namespace deletes the veths in it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in self._root_links:  # normally gone with their peers already
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self._namespaces.clear()
        self._root_links.clear()
