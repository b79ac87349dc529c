"""Delayed-leave delegation (MSC4140 delayed events, as lk-jwt-service does
it) against a real Synapse with delayed events on: while a participant is on
the SFU its delayed leave event never fires; once it is gone (a process
killed with SIGKILL, a client that leaves) the service fires it, and the
others see the call member leave. Runs inside tests/netns.sh."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
from pathlib import Path

import pytest

from conftest import start_moselle, stop_moselle
from moselle_helpers import Client, run
from synapse_harness import MatrixError, Synapse, _q
from test_matrix import _config, get_token_body, jwt_claims, post

HERE = Path(__file__).resolve().parent
MEMBER = "org.matrix.msc3401.call.member"
DELAY_MS = 5000


@pytest.fixture(scope="module")
def synapse(tmp_path_factory):
    hs = Synapse(extra_config={"max_event_delay_duration": "24h"})
    hs.start(tmp_path_factory.mktemp("synapse-delayed"))
    yield hs
    hs.stop()


@pytest.fixture(scope="module")
def people(synapse):
    return {"admin": synapse.register("svc", admin=True), "alice": synapse.register("alice"),
            "bob": synapse.register("bob")}


@pytest.fixture(scope="module")
def node(tmp_path_factory, synapse, people):
    d = tmp_path_factory.mktemp("moselle-delegation")
    # A short resume window: a killed client (its signaling gone, no Leave)
    # is dropped, and its leave fired, after 5 s instead of 20.
    text = Path(_config(d, synapse, people["admin"])).read_text()
    assert "resume_window_secs = 20" in text
    text = text.replace("resume_window_secs = 20", "resume_window_secs = 5")
    path = d / "moselle.toml"
    path.write_text(text)
    srv = start_moselle(d, ["--config", str(path)])
    yield srv
    stop_moselle(srv)


def join_call(hs: Synapse, user, room_id: str, device: str) -> str:
    """Publish a call membership and schedule its delayed leave (the empty
    state event), as Element Call does; returns the delay id."""
    key = f"_{user.user_id}_{device}_m.call"
    hs.send_state(user, room_id, MEMBER, key,
                  {"application": "m.call", "call_id": "", "device_id": device,
                   "scope": "m.room", "focus_active": {"type": "livekit"}})
    path = f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(MEMBER)}/{_q(key)}"
    r = hs.request("PUT", path, user.access_token, {},
                   query={"org.matrix.msc4140.delay": str(DELAY_MS)})
    return r["delay_id"]


def membership(hs: Synapse, reader, room_id: str, device: str, owner=None) -> dict:
    """The call membership of `owner` (default: the reader) on `device`."""
    owner = owner or reader
    return hs.get_state(reader, room_id, MEMBER, f"_{owner.user_id}_{device}_m.call")


def sfu_get(node, user, room_id: str, device: str, delay_id: str | None = None):
    body = {"room": room_id, "openid_token": user.openid_token(), "device_id": device}
    if delay_id:
        body.update(delay_id=delay_id, delay_timeout=DELAY_MS,
                    delay_cs_api_url="http://198.51.100.1/not-used")
    return post(node, "/sfu/get", body)


def wait_left(hs, reader, room_id, device, timeout: float, owner=None) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if membership(hs, reader, room_id, device, owner) == {}:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"the delayed leave did not fire within {timeout:.0f} s: "
                         f"{membership(hs, reader, room_id, device, owner)}")


def metric(node, name: str) -> int:
    import urllib.request
    with urllib.request.urlopen(f"{node.http_url}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"moselle_{name} ") or line.startswith(f"{name} "):
                return int(float(line.split()[-1]))
    raise AssertionError(f"metric {name} not found")


def test_probe_and_issued_token_carry_no_admin_grant(node, synapse, people):
    """Element Call's probe (POST, no body) must not get 404; issued tokens
    carry no roomCreate, yet the full-access user's call starts (auto-create
    is off on this node: the service opened the room)."""
    st, body = post(node, "/delegate_delayed_leave", b"")
    assert st == 400 and body["errcode"] == "M_NOT_JSON", (st, body)
    alice = people["alice"]
    room_id = alice.create_room()
    st, tok = sfu_get(node, alice, room_id, "DEVA")
    assert st == 200, tok
    v = jwt_claims(tok["jwt"])["video"]
    assert v.get("roomJoin") and v.get("canPublish") and v.get("canSubscribe")
    assert not any(v.get(k) for k in ("roomCreate", "roomAdmin", "roomList", "roomRecord")), v

    async def scenario():
        async with Client("alice") as c:
            await c.connect(node.url, tok["jwt"])
            await c.publish_audio(440.0)

    run(scenario, timeout=30)


def test_guest_may_not_delegate(node, synapse, people):
    """Only full-access users delegate (lk-jwt-service answers 400 M_BAD_JSON,
    after which Element Call asks again without the delay fields)."""
    bob = people["bob"]
    room_id = bob.create_room()
    st, body = post(node, "/sfu/get", {"room": room_id, "openid_token": bob.openid_token(),
                                       "device_id": "D", "delay_id": "x"})
    assert st == 400 and body["errcode"] == "M_BAD_JSON", "delay_id without delay_timeout"
    st, body = post(node, "/delegate_delayed_leave", {
        "room_id": room_id, "slot_id": "m.call#ROOM", "openid_token": bob.openid_token(),
        "member": {"id": "m", "claimed_user_id": bob.user_id, "claimed_device_id": "D"},
        "delay_id": "x", "delay_timeout": 0})
    assert st == 400 and body["errcode"] == "M_BAD_JSON", body


def test_leave_is_held_while_connected_and_fired_when_the_client_is_killed(node, synapse, people):
    """Alice's delayed leave (5 s) is delegated; her client runs in its own
    process: 15 s later her membership still stands (the service restarted
    the event while she was on the SFU). Then her process is killed with
    SIGKILL: the SFU drops her after its resume window (5 s here) and the
    service fires the leave; Bob sees her call membership end."""
    alice, bob = people["alice"], people["bob"]
    room_id = alice.create_room()
    bob.join(room_id)
    delay_id = join_call(synapse, alice, room_id, "DEVK")
    st, tok = sfu_get(node, alice, room_id, "DEVK", delay_id)
    assert st == 200, tok
    proc = subprocess.Popen([sys.executable, str(HERE / "lk_client_proc.py"), node.url, tok["jwt"]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=str(HERE))
    try:
        line = proc.stdout.readline()
        assert line.strip() == "connected", f"client process: {line!r}"
        time.sleep(3 * DELAY_MS / 1000)
        assert membership(synapse, bob, room_id, "DEVK", alice) != {}, "the leave fired while connected"
        assert metric(node, "matrix_delegation_restarts_total") >= 2
        sent_before = metric(node, "matrix_delegated_leaves_sent_total")
        ended_before = metric(node, "matrix_delegations_ended_by_client_total")
        t_kill = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
        took = wait_left(synapse, bob, room_id, "DEVK", timeout=30, owner=alice)
        print(f"delegated leave after SIGKILL of the client: {time.monotonic() - t_kill:.1f} s "
              f"(resume window 5 s, delay {DELAY_MS / 1000:.0f} s)")
        assert took < 5 + 3, took
        # Fired by the service (200), not by the homeserver's own timer
        # (then the service's send would have found it gone: ended_by_client).
        # Bob can see the leave before the service has read the homeserver's
        # answer and counted it, so give the counter a moment.
        deadline = time.monotonic() + 5
        while (metric(node, "matrix_delegated_leaves_sent_total") == sent_before
               and metric(node, "matrix_delegations_ended_by_client_total") == ended_before
               and time.monotonic() < deadline):
            time.sleep(0.1)
        assert metric(node, "matrix_delegated_leaves_sent_total") == sent_before + 1
        assert metric(node, "matrix_delegations_ended_by_client_total") == ended_before
    finally:
        if proc.poll() is None:
            proc.kill()
    log = node.log_path.read_text(errors="replace")
    assert delay_id not in log, "delay ids are secrets and never logged"


def test_leave_fires_at_once_when_the_client_leaves_without_sending_it(node, synapse, people):
    """A client that disconnects (its Leave reaches the SFU) but never sends
    its own leave event: the service sends it within a couple of seconds, far
    sooner than a long client-side delay would."""
    alice = people["alice"]
    room_id = alice.create_room()
    delay_id = join_call(synapse, alice, room_id, "DEVL")
    # The delayed event has a short delay here; keep it alive past it first.
    st, tok = sfu_get(node, alice, room_id, "DEVL", delay_id)
    assert st == 200, tok

    async def scenario():
        c = Client("alice")
        await c.connect(node.url, tok["jwt"])
        await c.publish_audio(440.0)
        import asyncio
        await asyncio.sleep(2 * DELAY_MS / 1000)
        m = {k: metric(node, k) for k in ("matrix_delegations_accepted_total", "matrix_delegation_restarts_total",
                                          "matrix_delegations_ended_by_client_total", "matrix_delegation_failures_total")}
        assert membership(synapse, alice, room_id, "DEVL") != {}, m
        await c.disconnect()
        await c.aclose()

    sent_before = metric(node, "matrix_delegated_leaves_sent_total")
    run(scenario, timeout=60)
    took = wait_left(synapse, alice, room_id, "DEVL", timeout=10)
    print(f"delegated leave after a clean disconnect: {took:.1f} s")
    assert took < 3.5, took
    # The leave can be seen before the service has read the homeserver's
    # answer and counted it.
    deadline = time.monotonic() + 5
    while metric(node, "matrix_delegated_leaves_sent_total") == sent_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(node, "matrix_delegated_leaves_sent_total") == sent_before + 1


def test_cors_lets_element_call_ask_from_its_own_origin(node):
    """Element Call calls the service from the browser, from another origin:
    preflights are answered and answers carry Access-Control-Allow-Origin."""
    import urllib.request
    for path in ("/sfu/get", "/get_token", "/delegate_delayed_leave"):
        req = urllib.request.Request(f"{node.http_url}{path}", method="OPTIONS", headers={
            "Origin": "http://localhost:8080",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200, (path, r.status)
            assert r.headers["access-control-allow-origin"] == "*", (path, dict(r.headers))
            allowed = r.headers["access-control-allow-methods"] or ""
            assert "POST" in allowed or allowed == "*", (path, allowed)
            hdrs = (r.headers["access-control-allow-headers"] or "").lower()
            assert "content-type" in hdrs or hdrs == "*", (path, hdrs)
    req = urllib.request.Request(f"{node.http_url}/delegate_delayed_leave", data=b"", method="POST",
                                 headers={"Origin": "http://localhost:8080"})
    try:
        urllib.request.urlopen(req, timeout=5)
        raise AssertionError("an empty probe must not succeed")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and e.headers["access-control-allow-origin"] == "*"
