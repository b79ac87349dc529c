"""The network lab for connectivity tests: tests/netlab.sh's namespaces, a Moselle server in
the server namespace, and nftables rules in the client namespace (where pytest runs).

    tests/netlab.sh .venv/bin/pytest tests/connectivity -q

Firewall: table `inet moselle_lab` in the client namespace, output chain with `policy drop`.
Loopback is always allowed; then UDP (see the cases), established/related, and what the case
allows. Two ways to block UDP:
  * udp-blocked: the client's own output chain drops it (before the conntrack rule, so no
    flow left over from an earlier case gets through), as a host firewall does; the sender's
    sendto() fails with EPERM at once;
  * udp-blackholed: the client may send UDP, but the bridge (table `bridge moselle_path` in
    the hub namespace) drops the client's UDP frames silently, as a network firewall does.
Named counters (packets), in the client's table and, for udp-blackholed, the hub's:
    udp_dropped            every UDP packet dropped
    udp_dropped_to_server  the part of it addressed to the server (its ICE checks)
    other_dropped          anything else the client's policy dropped
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "python"))

# tests/python/conftest.py doubles as the module that starts servers (as in test_matrix.py).
from conftest import MoselleServer, start_moselle, stop_moselle  # noqa: E402

TABLE = "moselle_lab"  # inet, client namespace
PATH_TABLE = "moselle_path"  # bridge, hub namespace
COUNTERS = ("udp_dropped", "udp_dropped_to_server", "other_dropped")

# Fixed ports: pytest runs in the client namespace and cannot probe the server's for free ones.
HTTP_PORT, ICE_TCP_PORT, UDP_PORT = 17880, 17881, 17882


@dataclass(frozen=True)
class Lab:
    ns_server: str
    ns_client: str
    ns_proxy: str
    ns_hub: str
    server_ip: str
    client_ip: str
    proxy_ip: str


def lab() -> Lab:
    """The lab tests/netlab.sh made; fails (never skips) outside it."""
    names = ["MOSELLE_NS_SERVER", "MOSELLE_NS_CLIENT", "MOSELLE_NS_PROXY", "MOSELLE_NS_HUB",
             "MOSELLE_SERVER_IP", "MOSELLE_CLIENT_IP", "MOSELLE_PROXY_IP"]
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        pytest.fail(f"not inside tests/netlab.sh (unset: {', '.join(missing)}); run "
                    f"`tests/netlab.sh .venv/bin/pytest tests/connectivity`", pytrace=False)
    return Lab(*(os.environ[n] for n in names))


def start_lab_server(log_dir: Path, the_lab: Lab, args: tuple[str, ...] = ()) -> MoselleServer:
    """`moselle serve --dev` in the server namespace, bound to the server's address, on
    HTTP_PORT, UDP_PORT and ICE-TCP on ICE_TCP_PORT; healthy when this returns.
    MOSELLE_LAB_SERVER_ARGS adds arguments (e.g. `--no-ice-tcp` to watch the TCP-only
    cases fail)."""
    os.environ.setdefault("NO_COLOR", "1")  # plain server log lines in failure messages
    extra = ["--tcp-port", str(ICE_TCP_PORT), *args, *shlex.split(os.environ.get("MOSELLE_LAB_SERVER_ARGS", ""))]
    return start_moselle(log_dir, extra, host=the_lab.server_ip, ports=(HTTP_PORT, UDP_PORT),
                         netns=the_lab.ns_server)


def _nft(*args: str, stdin: str | None = None, netns: str | None = None) -> str:
    cmd = ["nft", *args] if netns is None else ["ip", "netns", "exec", netns, "nft", *args]
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}\n{stdin or ''}")
    return r.stdout


def _counters_block() -> str:
    return "".join(f"    counter {c} {{ }}\n" for c in COUNTERS)


def _udp_drop_rules(server_ip: str) -> list[str]:
    return [
        f'meta l4proto udp counter name "udp_dropped" ip daddr {server_ip} counter name "udp_dropped_to_server" drop',
        "meta l4proto udp drop",
    ]


class Firewall:
    """The output filter for one test case (module docstring). Use as a context manager: the
    tables exist inside the block and are deleted after it."""

    KINDS = ("udp-blocked", "udp-blackholed", "udp-allowed")

    def __init__(self, the_lab: Lab, kind: str) -> None:
        assert kind in self.KINDS, kind
        self.lab = the_lab
        self.kind = kind

    def client_ruleset(self) -> str:
        s = self.lab.server_ip
        udp = _udp_drop_rules(s) if self.kind == "udp-blocked" else [f"ip daddr {s} meta l4proto udp accept"]
        # Signaling and ICE-TCP: TCP to the server, any port.
        rules = ['oif "lo" accept', *udp, "ct state established,related accept",
                 f"ip daddr {s} meta l4proto tcp accept", 'counter name "other_dropped"']
        body = "".join(f"        {r}\n" for r in rules)
        return (f"table inet {TABLE} {{\n{_counters_block()}    chain output {{\n"
                f"        type filter hook output priority filter; policy drop;\n{body}    }}\n}}\n")

    def path_ruleset(self) -> str:
        body = "".join(f'        iifname "v-client" {r}\n' for r in _udp_drop_rules(self.lab.server_ip))
        return (f"table bridge {PATH_TABLE} {{\n{_counters_block()}    chain forward {{\n"
                f"        type filter hook forward priority filter; policy accept;\n{body}    }}\n}}\n")

    def __enter__(self) -> "Firewall":
        self.remove()  # tables left over from an interrupted run
        _nft("-f", "-", stdin=self.client_ruleset())
        if self.kind == "udp-blackholed":
            _nft("-f", "-", stdin=self.path_ruleset(), netns=self.lab.ns_hub)
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "exec", self.lab.ns_hub, "nft", "delete", "table", "bridge", PATH_TABLE],
                       capture_output=True, timeout=10)

    def counters(self) -> dict[str, int]:
        """Packets per named counter; the hub's (udp-blackholed) prefixed `path_`."""
        def read(family: str, table: str, netns: str | None) -> dict[str, int]:
            data = json.loads(_nft("-j", "list", "counters", "table", family, table, netns=netns))
            return {o["counter"]["name"]: o["counter"]["packets"] for o in data["nftables"] if "counter" in o}

        out = read("inet", TABLE, None)
        if self.kind == "udp-blackholed":
            out.update({f"path_{k}": v for k, v in read("bridge", PATH_TABLE, self.lab.ns_hub).items()})
        return out

    def udp_dropped_to_server(self) -> int:
        """UDP packets to the server this case's rules dropped, wherever they did."""
        c = self.counters()
        return c.get("udp_dropped_to_server", 0) + c.get("path_udp_dropped_to_server", 0)

    def report(self) -> str:
        try:
            c = self.counters()
        except Exception as e:  # for failure messages: never hide the original failure
            return f"<cannot read nft counters: {e}>"
        return ", ".join(f"{k} {v}" for k, v in c.items()) + " packets"


# --------------------------------------------------------------------------- path blackholes

FALLBACK_TABLE = "moselle_fallback"  # bridge, hub namespace (PathBlackhole)


class PathBlackhole:
    """Silent drops on the path between the client and the server, changed while a call runs
    (the fallback tests: UDP dies mid-call, then TCP too, then TCP comes back). Table
    `bridge moselle_fallback` in the hub namespace; both directions are dropped (frames from
    the client's bridge port to the server and back), as a network that stops carrying a
    protocol does. `set(udp=..., tcp_ports=...)` replaces what is dropped in one nft
    transaction; the named counters (packets) keep counting across changes:
        udp_to_server, udp_from_server        every UDP packet between client and server
        tcp_to_server, tcp_from_server        TCP to/from the server's ports in tcp_ports
    Use as a context manager (the table is deleted after it); nothing is dropped until set()."""

    COUNTERS = ("udp_to_server", "udp_from_server", "tcp_to_server", "tcp_from_server")

    def __init__(self, the_lab: Lab) -> None:
        self.lab = the_lab
        self.udp = False
        self.tcp_ports: tuple[int, ...] = ()

    def _rules(self) -> list[str]:
        s = self.lab.server_ip
        rules = []
        if self.udp:
            rules += [f'iifname "v-client" ip daddr {s} meta l4proto udp counter name "udp_to_server" drop',
                      f'oifname "v-client" ip saddr {s} meta l4proto udp counter name "udp_from_server" drop']
        for p in self.tcp_ports:
            rules += [f'iifname "v-client" ip daddr {s} tcp dport {p} counter name "tcp_to_server" drop',
                      f'oifname "v-client" ip saddr {s} tcp sport {p} counter name "tcp_from_server" drop']
        return rules

    def set(self, udp: bool = False, tcp_ports: tuple[int, ...] = ()) -> None:
        self.udp, self.tcp_ports = udp, tuple(tcp_ports)
        body = "".join(f"add rule bridge {FALLBACK_TABLE} forward {r}\n" for r in self._rules())
        _nft("-f", "-", stdin=f"flush chain bridge {FALLBACK_TABLE} forward\n{body}", netns=self.lab.ns_hub)

    def __enter__(self) -> "PathBlackhole":
        self.remove()
        counters = "".join(f"    counter {c} {{ }}\n" for c in self.COUNTERS)
        _nft("-f", "-", netns=self.lab.ns_hub, stdin=(
            f"table bridge {FALLBACK_TABLE} {{\n{counters}    chain forward {{\n"
            f"        type filter hook forward priority filter; policy accept;\n    }}\n}}\n"))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.lab.ns_hub, "nft", "delete", "table", "bridge", FALLBACK_TABLE],
                       capture_output=True, timeout=10)

    def counters(self) -> dict[str, int]:
        data = json.loads(_nft("-j", "list", "counters", "table", "bridge", FALLBACK_TABLE, netns=self.lab.ns_hub))
        return {o["counter"]["name"]: o["counter"]["packets"] for o in data["nftables"] if "counter" in o}

    def report(self) -> str:
        try:
            c = self.counters()
        except Exception as e:  # for failure messages: never hide the original failure
            return f"<cannot read nft counters: {e}>"
        return ", ".join(f"{k} {v}" for k, v in c.items()) + " packets dropped on the path"
