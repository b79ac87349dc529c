"""Run a real Synapse (Matrix homeserver) on loopback for tests of the MatrixRTC token service.

    hs = Synapse()
    hs.start(tmp_dir)                   # writes homeserver.yaml, generates keys, waits until ready
    alice = hs.register("alice", admin=True)
    room_id = hs.create_room(alice)     # preset public_chat: anyone on the server can join by id
    bob = hs.register("bob")
    hs.join(bob, room_id)
    tok = hs.openid_token(bob)          # {access_token, token_type, matrix_server_name, expires_in}
    hs.stop(); hs.restart()             # same directory, port and database

The listener binds $MOSELLE_TEST_IP (set by tests/netns.sh) or 127.0.0.1, on a free port, and serves
the client, federation and openid resources over plain HTTP. `server_name` is `localhost`, which is
what OpenID tokens carry as `matrix_server_name` but is not resolvable to this server: consumers need
a server-name -> base-URL map ({hs.server_name: hs.base_url}). New rooms are room version 12, whose
room IDs have no `:server` part.

Synapse is started as `<this python> -m synapse.app.homeserver -c homeserver.yaml`, so it must be
installed in the same venv (tests/python/requirements.txt). Failures raise SynapseError with the tail
of the homeserver log and of the process output; HTTP errors raise MatrixError.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

HOST = os.environ.get("MOSELLE_TEST_IP", "127.0.0.1")
SERVER_NAME = "localhost"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 60

# Effectively no rate limiting: tests create rooms, join and request tokens in bursts.
_GENEROUS = {"per_second": 10000, "burst_count": 100000}


class SynapseError(RuntimeError):
    """Synapse could not be started or stopped (message includes log tails)."""


class MatrixError(RuntimeError):
    """A Matrix API request answered with a non-2xx status."""

    def __init__(self, method: str, url: str, status: int, body: Any):
        self.method = method
        self.url = url
        self.status = status
        self.body = body
        self.errcode = body.get("errcode") if isinstance(body, dict) else None
        super().__init__(f"{method} {url} -> HTTP {status}: {body}")


@dataclass
class User:
    """A registered account. Convenience methods forward to the Synapse instance."""

    synapse: "Synapse" = field(repr=False)
    user_id: str
    access_token: str
    device_id: Optional[str]
    localpart: str
    password: str = field(repr=False)
    admin: bool = False

    def create_room(self, invite: tuple[str, ...] | list[str] = (), **kw) -> str:
        return self.synapse.create_room(self, invite=invite, **kw)

    def join(self, room_id: str) -> None:
        self.synapse.join(self, room_id)

    def leave(self, room_id: str) -> None:
        self.synapse.leave(self, room_id)

    def kick(self, room_id: str, user_id: str, reason: str = "") -> None:
        self.synapse.kick(self, room_id, user_id, reason)

    def ban(self, room_id: str, user_id: str, reason: str = "") -> None:
        self.synapse.ban(self, room_id, user_id, reason)

    def unban(self, room_id: str, user_id: str) -> None:
        self.synapse.unban(self, room_id, user_id)

    def openid_token(self) -> dict:
        return self.synapse.openid_token(self)

    def joined_members(self, room_id: str) -> set[str]:
        return self.synapse.joined_members(self, room_id)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # In the child before exec: SIGTERM if pytest dies, so no homeserver is left running.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _tail(path: Optional[Path], n: int = LOG_TAIL_LINES) -> str:
    if path is None:
        return "<none>"
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(lines[-n:]) or "<empty>"


def _q(s: str) -> str:
    return urllib.parse.quote(s, safe="")


class Synapse:
    """One Synapse homeserver process. Not thread-safe; one instance per test module is typical."""

    def __init__(self, host: str = HOST, python: str = sys.executable,
                 extra_config: Optional[dict[str, Any]] = None):
        self.host = host
        # Merged last into homeserver.yaml (top-level keys replace), e.g. MatrixRTC settings.
        self.extra_config = dict(extra_config or {})
        self.python = python
        self.server_name = SERVER_NAME
        self.port: Optional[int] = None
        self.dir: Optional[Path] = None
        self.config_path: Optional[Path] = None
        self.log_path: Optional[Path] = None  # Synapse's own log (WARNING and above)
        self.stdout_path: Optional[Path] = None  # process stdout/stderr (crashes before logging)
        self.proc: Optional[subprocess.Popen] = None
        self.registration_shared_secret = secrets.token_hex(16)
        self.start_seconds: Optional[float] = None  # duration of the last start() / restart()

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise SynapseError("Synapse not started")
        return f"http://{self.host}:{self.port}"

    @property
    def server_map(self) -> dict[str, str]:
        """{server_name: base_url}, for consumers that must not resolve `localhost`."""
        return {self.server_name: self.base_url}

    def start(self, tmpdir: str | os.PathLike) -> "Synapse":
        """Write the config into `tmpdir`, generate the signing key, start and wait until ready."""
        if self.running:
            raise SynapseError("Synapse already running")
        self.dir = Path(tmpdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port(self.host)
        self.log_path = self.dir / "homeserver.log"
        self.stdout_path = self.dir / "synapse.stdout.log"
        self.config_path = self.dir / "homeserver.yaml"
        self._write_config()
        t0 = time.monotonic()
        self._generate_keys()
        self._spawn()
        self.start_seconds = time.monotonic() - t0
        return self

    def restart(self) -> "Synapse":
        """Stop (if running) and start again on the same directory, port and database."""
        if self.config_path is None:
            raise SynapseError("restart() before start()")
        self.stop()
        t0 = time.monotonic()
        self._spawn()
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return (
            f"--- {self.log_path} ---\n{_tail(self.log_path, n)}\n"
            f"--- {self.stdout_path} ---\n{_tail(self.stdout_path, n)}"
        )

    def __enter__(self) -> "Synapse":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_config(self) -> None:
        assert self.dir is not None and self.config_path is not None
        d = self.dir
        log_config = d / "log.config"
        # JSON is valid YAML, so no YAML library is needed here.
        log_config.write_text(json.dumps({
            "version": 1,
            "formatters": {"precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s"}},
            "handlers": {"file": {
                "class": "logging.FileHandler", "formatter": "precise",
                "filename": str(self.log_path), "encoding": "utf8"}},
            "root": {"level": "WARNING", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }, indent=2))
        cfg = {
            "server_name": self.server_name,
            "public_baseurl": self.base_url + "/",
            "pid_file": str(d / "homeserver.pid"),
            "listeners": [{
                "port": self.port,
                "bind_addresses": [self.host],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client", "federation", "openid"], "compress": False}],
            }],
            "database": {"name": "sqlite3", "args": {"database": str(d / "homeserver.db")}},
            "log_config": str(log_config),
            "media_store_path": str(d / "media_store"),
            "signing_key_path": str(d / "localhost.signing.key"),
            "registration_shared_secret": self.registration_shared_secret,
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            "enable_registration": False,
            "report_stats": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "enable_metrics": False,
            "url_preview_enabled": False,
            "presence": {"enabled": False},
            "rc_message": _GENEROUS,
            "rc_registration": _GENEROUS,
            "rc_login": {"address": _GENEROUS, "account": _GENEROUS, "failed_attempts": _GENEROUS},
            "rc_joins": {"local": _GENEROUS, "remote": _GENEROUS},
            "rc_joins_per_room": _GENEROUS,
            "rc_invites": {"per_room": _GENEROUS, "per_user": _GENEROUS, "per_issuer": _GENEROUS},
            "rc_room_creation": _GENEROUS,
            "rc_delayed_event_mgmt": _GENEROUS,
            "rc_admin_redaction": _GENEROUS,
            "rc_profile": _GENEROUS,
        }
        cfg.update(self.extra_config)
        self.config_path.write_text(json.dumps(cfg, indent=2))

    def _generate_keys(self) -> None:
        cmd = [self.python, "-m", "synapse.app.homeserver", "-c", str(self.config_path),
               "--generate-keys"]
        r = subprocess.run(cmd, cwd=self.dir, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=60)
        if r.returncode != 0:
            raise SynapseError(
                f"{' '.join(cmd)} exited with {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")

    def _spawn(self) -> None:
        assert self.stdout_path is not None
        cmd = [self.python, "-m", "synapse.app.homeserver", "-c", str(self.config_path)]
        with open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        last = "no attempt"
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self.proc = None
                raise SynapseError(f"Synapse exited with code {rc} during start-up "
                                   f"({' '.join(cmd)})\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/_matrix/client/versions",
                                            timeout=1.0) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:
                last = repr(e)
            time.sleep(0.1)
        self.stop()
        raise SynapseError(f"Synapse not ready within {START_TIMEOUT_S:.0f}s at {self.base_url} "
                           f"(last: {last})\n{self.log_tail()}")

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, token: Optional[str] = None,
                body: Any = None, query: Optional[dict] = None) -> Any:
        """JSON request to `base_url + path`; returns the decoded body, raises MatrixError on non-2xx."""
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                decoded: Any = json.loads(raw)
            except ValueError:
                decoded = raw.decode(errors="replace")
            raise MatrixError(method, url, e.code, decoded) from None
        return json.loads(raw) if raw else {}

    # ------------------------------------------------------------------ accounts

    def register(self, username: str, admin: bool = False,
                 password: Optional[str] = None) -> User:
        """Create an account with the shared-secret admin API; returns it logged in."""
        password = password or secrets.token_urlsafe(12)
        path = "/_synapse/admin/v1/register"
        nonce = self.request("GET", path)["nonce"]
        mac = hmac.new(self.registration_shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), username.encode(), password.encode(),
                                 b"admin" if admin else b"notadmin"]))
        r = self.request("POST", path, body={
            "nonce": nonce, "username": username, "password": password,
            "admin": admin, "mac": mac.hexdigest()})
        return User(synapse=self, user_id=r["user_id"], access_token=r["access_token"],
                    device_id=r.get("device_id"), localpart=username, password=password,
                    admin=admin)

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    # ------------------------------------------------------------------ rooms

    def create_room(self, creator: User, invite: tuple[str, ...] | list[str] = (),
                    preset: str = "public_chat", name: Optional[str] = None,
                    room_version: Optional[str] = None, **extra) -> str:
        """Create a room; default preset public_chat so anyone on this server can join by id.
        `invite` holds user IDs (str) or Users. Extra keys go into the createRoom body."""
        body: dict[str, Any] = {"preset": preset, **extra}
        ids = [u.user_id if isinstance(u, User) else u for u in invite]
        if ids:
            body["invite"] = ids
        if name is not None:
            body["name"] = name
        if room_version is not None:
            body["room_version"] = room_version
        return self.request("POST", "/_matrix/client/v3/createRoom", creator.access_token,
                            body)["room_id"]

    def join(self, user: User, room_id: str) -> None:
        self.request("POST", f"/_matrix/client/v3/join/{_q(room_id)}", user.access_token, {})

    def leave(self, user: User, room_id: str) -> None:
        self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/leave",
                     user.access_token, {})

    def invite(self, user: User, room_id: str, user_id: str) -> None:
        self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/invite",
                     user.access_token, {"user_id": user_id})

    def kick(self, admin_user: User, room_id: str, user_id: str, reason: str = "") -> None:
        body = {"user_id": user_id, **({"reason": reason} if reason else {})}
        self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/kick",
                     admin_user.access_token, body)

    def ban(self, admin_user: User, room_id: str, user_id: str, reason: str = "") -> None:
        body = {"user_id": user_id, **({"reason": reason} if reason else {})}
        self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/ban",
                     admin_user.access_token, body)

    def unban(self, admin_user: User, room_id: str, user_id: str) -> None:
        self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/unban",
                     admin_user.access_token, {"user_id": user_id})

    def joined_members(self, user: User, room_id: str) -> set[str]:
        """User IDs currently joined (the asking user must be in the room)."""
        r = self.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/joined_members",
                         user.access_token)
        return set(r["joined"])

    def send_state(self, user: User, room_id: str, event_type: str, state_key: str,
                   content: dict) -> str:
        """PUT a state event (e.g. org.matrix.msc3401.call.member); returns its event_id."""
        return self.request(
            "PUT", f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}",
            user.access_token, content)["event_id"]

    def get_state(self, user: User, room_id: str, event_type: str, state_key: str = "") -> dict:
        return self.request(
            "GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}",
            user.access_token)

    # ------------------------------------------------------------------ OpenID

    def openid_token(self, user: User) -> dict:
        """{access_token, token_type: "Bearer", matrix_server_name: "localhost", expires_in}."""
        return self.request(
            "POST", f"/_matrix/client/v3/user/{_q(user.user_id)}/openid/request_token",
            user.access_token, {})

    def openid_userinfo(self, openid_access_token: str) -> dict:
        """The federation check a token service does: -> {"sub": user_id}; 401 -> MatrixError."""
        return self.request("GET", "/_matrix/federation/v1/openid/userinfo",
                            query={"access_token": openid_access_token})
