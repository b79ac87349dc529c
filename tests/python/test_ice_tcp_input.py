"""Hostile input on the ICE-TCP port, during a real call: garbage, oversized
frames, STUN for nobody, a slow sender and 1000 idle connections. None of it
may panic the server or disturb the call, and all of it is counted.

The call itself runs over UDP (this namespace allows it), so the limit on
TCP connections per source address, which the attackers hit, is not what
keeps it going.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import resource
import socket
import struct
import time
import urllib.request

from conftest import HOST
from moselle_helpers import Client, run, unique_room, wait_until
from test_call import EVENT_TIMEOUT_S, _pub_sid, _wait_video

# The server's defaults (config/moselle.toml [rtc]).
PER_ADDRESS = 256
FIRST_STUN_TIMEOUT_S = 5.0
IDLE = 1000


def _metrics(server) -> dict[str, float]:
    names = ["tcp_refused_total", "tcp_rejected_total", "tcp_timeouts_total", "tcp_bad_frames_total",
             "tcp_accepted_total", "tcp_connections"]
    return {n: server.metric(n) for n in names}


def _connect(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(True)
    s.settimeout(5)
    s.connect((HOST, port))
    return s


def _closed_by_server(s: socket.socket, within: float) -> bool:
    """True if the server closed `s` (EOF or reset) within `within` seconds."""
    s.settimeout(within)
    try:
        while True:
            if not s.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def _stun_frame(username: bytes) -> bytes:
    attr = struct.pack("!HH", 0x0006, len(username)) + username + b"\0" * (-len(username) % 4)
    msg = struct.pack("!HHI", 0x0001, len(attr), 0x2112A442) + random.Random(3).randbytes(12) + attr
    return struct.pack("!H", len(msg)) + msg


def test_hostile_tcp_clients_harm_nobody(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    room = unique_room("tcp-hostile")
    port = server.tcp_port
    assert port, "the server must listen for ICE over TCP"

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            await a.connect(server.url, server.token("A", room))
            await b.connect(server.url, server.token("B", room))
            vpub = await a.publish_video(640, 360, 20, simulcast=False)
            await b.events.wait_for("track_subscribed", _pub_sid(vpub.sid), EVENT_TIMEOUT_S, "A's video")
            await _wait_video(b, vpub.sid, "A")
            st = b.probe.video[vpub.sid]
            before = _metrics(server)
            frames_start, t_start = st.frames, time.monotonic()
            loop = asyncio.get_running_loop()

            def attack() -> dict[str, object]:
                rng = random.Random(11)
                out: dict[str, object] = {}
                # Garbage: random bytes whose first two are a valid length.
                garbage = []
                for _ in range(20):
                    s = _connect(port)
                    body = rng.randbytes(rng.randrange(20, 1500))
                    s.sendall(struct.pack("!H", len(body)) + body)
                    garbage.append(s)
                # Oversized: a length over the limit.
                oversized = []
                for _ in range(20):
                    s = _connect(port)
                    s.sendall(b"\xff\xff" + rng.randbytes(3000))
                    oversized.append(s)
                # STUN binding requests naming a ufrag nobody has.
                nobody = []
                for i in range(20):
                    s = _connect(port)
                    s.sendall(_stun_frame(f"nobody{i}:x".encode()))
                    nobody.append(s)
                out["garbage_closed"] = sum(_closed_by_server(s, 3) for s in garbage)
                out["oversized_closed"] = sum(_closed_by_server(s, 3) for s in oversized)
                out["nobody_closed"] = sum(_closed_by_server(s, 3) for s in nobody)
                for s in garbage + oversized + nobody:
                    s.close()

                # A slow sender: a valid-looking frame, one byte at a time.
                slow = _connect(port)
                frame = _stun_frame(b"slowpoke:x")
                t0 = time.monotonic()
                sent = 0
                closed_at = None
                while time.monotonic() - t0 < FIRST_STUN_TIMEOUT_S + 3:
                    try:
                        slow.send(frame[sent % len(frame):sent % len(frame) + 1])
                        sent += 1
                    except OSError:
                        closed_at = time.monotonic() - t0
                        break
                    if _closed_by_server(slow, 0.4):
                        closed_at = time.monotonic() - t0
                        break
                slow.close()
                out["slow_closed_after_s"] = closed_at

                # 1000 idle connections from one address.
                idle, failed = [], 0
                for _ in range(IDLE):
                    try:
                        idle.append(_connect(port))
                    except OSError:
                        failed += 1
                out["idle_opened"] = len(idle)
                out["idle_connect_failed"] = failed
                time.sleep(FIRST_STUN_TIMEOUT_S + 2)
                out["idle_closed"] = sum(_closed_by_server(s, 0.05) for s in idle)
                for s in idle:
                    s.close()
                return out

            result = await loop.run_in_executor(None, attack)
            elapsed = time.monotonic() - t_start
            during = st.frames - frames_start
            await asyncio.sleep(1.0)
            after = _metrics(server)
            d = {k: after[k] - before[k] for k in after}
            print(f"attack over {elapsed:.1f}s: {result}; metric deltas {d}; "
                  f"B decoded {during} frames meanwhile ({during / elapsed:.1f} fps)")

            assert result["garbage_closed"] == 20, result
            assert result["oversized_closed"] == 20, result
            assert result["nobody_closed"] == 20, result
            assert result["slow_closed_after_s"] is not None, "the slow sender was never cut off"
            assert result["slow_closed_after_s"] <= FIRST_STUN_TIMEOUT_S + 1.5, result
            assert d["tcp_bad_frames_total"] >= 20, d
            assert d["tcp_rejected_total"] >= 40, d
            # Beyond the per-address limit, connections are refused at once;
            # the admitted ones are closed for silence.
            assert d["tcp_refused_total"] >= IDLE - PER_ADDRESS, d
            assert d["tcp_timeouts_total"] >= PER_ADDRESS, d
            assert result["idle_closed"] == result["idle_opened"], result
            await wait_until(lambda: server.metric("tcp_connections") == 0, 5,
                             lambda: f"open ICE-TCP connections left: {server.metric('tcp_connections')}")
            # The call went on throughout (20 fps sent).
            assert during >= 10 * elapsed, f"B's video slowed during the attack: {during} frames in {elapsed:.1f}s"
            assert urllib.request.urlopen(f"{server.http_url}/healthz", timeout=5).status == 200

    run(scenario, timeout=120)
