"""Pytest fixtures that run a Moselle server for the LiveKit SDK conformance tests.

Server CLI contract:
    $MOSELLE_BIN serve --dev --bind <HOST> --http-port <P> --udp-port <U>
--dev means API key `devkey`, secret `secret`. Signaling is at ws://<HOST>:<P>,
readiness at GET http://<HOST>:<P>/healthz (200 when ready). HOST is
$MOSELLE_TEST_IP (set by run.sh), else 127.0.0.1.

The whole pytest process is expected to run inside a network namespace that holds
only `lo` (see run.sh), so libwebrtc gathers only loopback candidates.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from moselle_helpers import API_KEY, API_SECRET, make_token

DEFAULT_BIN = str(Path(__file__).resolve().parents[2] / "target" / "debug" / "moselle")
# libwebrtc gathers no candidates on loopback, so run.sh gives the namespace
# one non-loopback address and both sides use it.
HOST = os.environ.get("MOSELLE_TEST_IP", "127.0.0.1")
HEALTH_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 80

_server_key = pytest.StashKey["MoselleServer"]()


@dataclass
class MoselleServer:
    proc: subprocess.Popen
    http_port: int
    udp_port: int
    log_path: Path
    tcp_port: int = 0
    api_key: str = API_KEY
    api_secret: str = API_SECRET
    cmd: list[str] = field(default_factory=list)
    host: str = HOST

    @property
    def url(self) -> str:
        """LiveKit URL form, as given to rtc.Room.connect."""
        return f"ws://{self.host}:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def token(self, identity: str, room: str, **grants) -> str:
        return make_token(identity, room, api_key=self.api_key, api_secret=self.api_secret, **grants)

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"{self.http_url}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(f"moselle_{name} "):
                return float(line.split()[1])
        raise AssertionError(f"metric moselle_{name} not exported")

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"<cannot read server log {self.log_path}: {e}>"
        return "\n".join(lines[-n:])

    def log_head(self, n: int = LOG_TAIL_LINES) -> str:
        """A failed start puts its error first, before any backtrace."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError as e:
            return f"<cannot read server log {self.log_path}: {e}>"
        return "\n".join(lines[:n])

    def assert_alive(self) -> None:
        rc = self.proc.poll()
        if rc is not None:
            pytest.fail(
                f"moselle server exited with code {rc}; log {self.log_path} tail:\n{self.log_tail()}",
                pytrace=False,
            )


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _pick_ports() -> tuple[int, int]:
    http_port = _free_port(socket.SOCK_STREAM)
    for _ in range(20):
        udp_port = _free_port(socket.SOCK_DGRAM)
        if udp_port != http_port:
            return http_port, udp_port
    raise RuntimeError("could not pick distinct free ports")


def _die_with_parent() -> None:
    # Runs in the child before exec: get SIGTERM if pytest dies (e.g. pytest-timeout's
    # os._exit), so no server is left behind in the namespace.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


def _wait_healthy(server: MoselleServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_err = "no attempt"
    while time.monotonic() < deadline:
        rc = server.proc.poll()
        if rc is not None:
            raise RuntimeError(f"moselle exited with code {rc} before becoming healthy")
        try:
            with urllib.request.urlopen(f"{server.http_url}/healthz", timeout=1.0) as resp:
                if resp.status == 200:
                    return
                last_err = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            last_err = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last_err = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"GET /healthz not 200 within {timeout:.0f}s (last: {last_err})")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _spawn_moselle(bin_path, log_dir, extra_args, host, ports, netns, dev, env_extra):
    log_path = log_dir / "server.log"
    http_port, udp_port = ports or _pick_ports()
    if "--tcp-port" in extra_args:
        tcp_port = int(extra_args[extra_args.index("--tcp-port") + 1])
    else:
        # ICE over TCP listens too; a free port keeps servers side by side apart.
        tcp_port = http_port + 1 if netns else _free_port(socket.SOCK_STREAM)
        while tcp_port == http_port:
            tcp_port = _free_port(socket.SOCK_STREAM)
        extra_args += ["--tcp-port", str(tcp_port)]
    cmd = [
        bin_path, "serve", *(["--dev"] if dev else []), "--bind", host,
        "--http-port", str(http_port), "--udp-port", str(udp_port), *extra_args,
    ]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]  # ip execs moselle: proc.pid is the server's
    env = dict(os.environ)
    env.setdefault("RUST_BACKTRACE", "1")
    env.update(env_extra or {})
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        env=env, preexec_fn=_die_with_parent,
    )
    log_file.close()  # the child holds its own descriptor
    server = MoselleServer(
        proc=proc, http_port=http_port, udp_port=udp_port, log_path=log_path, cmd=cmd, host=host,
        tcp_port=tcp_port,
    )

    start_error = None
    try:
        _wait_healthy(server, HEALTH_TIMEOUT_S)
    except RuntimeError as e:
        start_error = str(e)
    if start_error is not None:
        _stop(proc)
    return server, start_error


def start_moselle(
    log_dir: Path,
    extra_args: list[str] = (),
    *,
    host: str = HOST,
    ports: tuple[int, int] | None = None,
    netns: str | None = None,
    dev: bool = True,
    env: dict[str, str] | None = None,
) -> MoselleServer:
    """Start `moselle serve --dev` on free ports (plus `extra_args`, e.g.
    `--config FILE`) and wait until it is healthy; fails the test if not.
    `dev=False` runs it as in production (its keys from the config or `env`).
    `host`, `ports` (http, udp) and `netns` (run it there with `ip netns exec`:
    tests/netlab.sh's server namespace, whose free ports this process cannot
    probe, hence fixed `ports`) are for the network lab."""
    bin_path = os.environ.get("MOSELLE_BIN", DEFAULT_BIN)
    if not (os.path.isfile(bin_path) and os.access(bin_path, os.X_OK)):
        pytest.fail(
            f"moselle binary not found or not executable: {bin_path!r} "
            f"(build it with `cargo build`, or set MOSELLE_BIN)",
            pytrace=False,
        )
    # Free ports are probed, then released, then bound by the child: another
    # process can take one in between. Only that case is retried, with new ports.
    for attempt in range(3):
        server, start_error = _spawn_moselle(
            bin_path, log_dir, list(extra_args), host, ports, netns, dev, env
        )
        if start_error is None:
            break
        if ports is None and attempt < 2 and "in use" in server.log_path.read_text(errors="replace").lower():
            sys.stderr.write("\n[moselle] a port was taken before it bound; retrying\n")
            continue
        pytest.fail(
            f"moselle did not start: {start_error}\ncommand: {' '.join(server.cmd)}\n"
            f"log {server.log_path} head:\n{server.log_head() or '<empty>'}",
            pytrace=False,
        )
    sys.stderr.write(f"\n[moselle] {' '.join(server.cmd)} (pid {server.proc.pid}), log: {server.log_path}\n")
    return server


def stop_moselle(server: MoselleServer) -> None:
    _stop(server.proc)


@pytest.fixture(scope="session")
def moselle_server(request, tmp_path_factory) -> MoselleServer:
    """Start `moselle serve --dev` on free ports; stop it at the end of the session."""
    server = start_moselle(tmp_path_factory.mktemp("moselle"))
    request.config.stash[_server_key] = server
    yield server
    _stop(server.proc)


@pytest.fixture
def server(moselle_server: MoselleServer) -> MoselleServer:
    """Per-test view of the session server; fails the test clearly if it has died."""
    moselle_server.assert_alive()
    yield moselle_server
    moselle_server.assert_alive()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        srv = item.config.stash.get(_server_key, None)
        if srv is not None:
            status = "running" if srv.proc.poll() is None else f"exited with {srv.proc.returncode}"
            rep.sections.append(
                (f"moselle server log tail ({status}; {srv.log_path})", srv.log_tail())
            )
