"""Hosts of their own for agents, so that a test can cut one off the network: each host is a
network namespace joined to this machine by two veth links, one to the database and one to
the broker, with this machine's end of each link as the address the host's agent connects to.
Taking a link's far end down is a pulled cable: the agent's packets are dropped without a
word, its connections hang, and nothing on either side is told. (No iptables or nftables on
this machine: a link per service is what lets a test cut the database or the broker alone.)"""

import contextlib
import ipaddress
import os
import subprocess

SERVICES = ("db", "broker")


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(
            f"ip {' '.join(args)} failed ({done.stderr.strip()}): the network fault tests need"
            " root, network namespaces and veth (iproute2)"
        )
    return done.stdout


def _free_subnet(taken: set) -> ipaddress.IPv4Network:
    """A /24 of 10.200.0.0/13 that no interface of this machine is on (another test run's
    hosts, say)."""
    in_use = [
        ipaddress.ip_interface(line.split()[3]).network
        for line in ip("-o", "-4", "addr", "show").splitlines()
    ]
    for subnet in ipaddress.ip_network("10.200.0.0/13").subnets(new_prefix=24):
        if subnet not in taken and not any(subnet.overlaps(net) for net in in_use):
            taken.add(subnet)
            return subnet
    raise RuntimeError("no free /24 in 10.200.0.0/13 for test hosts")


class Host:
    """A network namespace with a link per service. `address[service]` is this machine's end
    (servers listen there); the host reaches nothing else, not even this machine's loopback."""

    _subnets: set = set()

    def __init__(self, index: int):
        tag = f"{os.getpid() % 100000}x{index}"
        self.ns = f"ciproject-{tag}"
        subnet = _free_subnet(Host._subnets)
        self.ends = {service: f"c{tag}{service[0]}" for service in SERVICES}  # <= 15 chars
        self.address = {}
        ip("netns", "add", self.ns)
        ip("-n", self.ns, "link", "set", "lo", "up")
        for number, service in enumerate(SERVICES):
            here, there = list(subnet.subnets(new_prefix=30))[number].hosts()
            ip("link", "add", self.ends[service], "type", "veth", "peer", "name", service,
               "netns", self.ns)  # fmt: skip
            ip("addr", "add", f"{here}/30", "dev", self.ends[service])
            ip("-n", self.ns, "addr", "add", f"{there}/30", "dev", service)
            ip("-n", self.ns, "link", "set", service, "up")
            self.address[service] = str(here)
        self.heal()

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run on this host."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def cut(self, *services: str) -> None:
        """Take the links down: every service, or those named."""
        for service in services or SERVICES:
            ip("link", "set", self.ends[service], "down")

    def heal(self) -> None:
        for service in SERVICES:
            ip("link", "set", self.ends[service], "up")

    @contextlib.contextmanager
    def cut_off(self, *services: str):
        self.cut(*services)
        try:
            yield
        finally:
            self.heal()

    def remove(self) -> None:
        for end in self.ends.values():  # deleting one end of a veth deletes both
            with contextlib.suppress(RuntimeError):
                ip("link", "del", end)
        with contextlib.suppress(RuntimeError):
            ip("netns", "del", self.ns)
