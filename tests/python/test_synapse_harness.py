"""Self-test of the Synapse harness (tests/python/synapse.py) against a real homeserver.

Fails (never skips) when Synapse is missing or does not start.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

import pytest

from synapse_harness import MatrixError, Synapse, SynapseError


@pytest.fixture(scope="module")
def hs(tmp_path_factory):
    h = Synapse()
    try:
        h.start(tmp_path_factory.mktemp("synapse"))
    except (SynapseError, OSError) as e:
        pytest.fail(f"Synapse did not start: {e}", pytrace=False)
    sys.stderr.write(f"\n[synapse] {h.base_url} ready in {h.start_seconds:.1f}s, log {h.log_path}\n")
    yield h
    h.stop()


@pytest.fixture(scope="module")
def users(hs):
    return {
        "alice": hs.register("alice", admin=True),
        "bob": hs.register("bob"),
        "carol": hs.register("carol"),
    }


def test_register(hs, users):
    alice, bob = users["alice"], users["bob"]
    assert alice.user_id == "@alice:localhost" and alice.admin
    assert bob.user_id == hs.user_id("bob")
    assert alice.access_token and bob.access_token and alice.access_token != bob.access_token
    assert bob.device_id
    assert hs.server_name == "localhost"
    assert hs.server_map == {"localhost": hs.base_url}


def test_room_membership_and_openid(hs, users):
    alice, bob = users["alice"], users["bob"]
    room_id = alice.create_room()
    assert room_id.startswith("!")
    bob.join(room_id)
    assert {alice.user_id, bob.user_id} <= alice.joined_members(room_id)

    tok = bob.openid_token()
    assert tok["matrix_server_name"] == "localhost"
    assert tok["token_type"] == "Bearer"
    assert tok["expires_in"] > 0
    # What a token service does with it (the raw URL, not the helper, to pin the wire format).
    url = f"{hs.base_url}/_matrix/federation/v1/openid/userinfo?access_token={tok['access_token']}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert json.loads(resp.read()) == {"sub": "@bob:localhost"}
    with pytest.raises(MatrixError) as ei:
        hs.openid_userinfo("not-a-token")
    assert ei.value.status == 401

    bob.leave(room_id)
    members = alice.joined_members(room_id)
    assert bob.user_id not in members and alice.user_id in members


def test_invite_kick_ban(hs, users):
    alice, carol = users["alice"], users["carol"]
    room_id = alice.create_room(invite=[carol.user_id], preset="private_chat")
    carol.join(room_id)  # invited, so a private room is fine
    assert carol.user_id in alice.joined_members(room_id)

    alice.kick(room_id, carol.user_id, reason="test")
    assert carol.user_id not in alice.joined_members(room_id)
    with pytest.raises(MatrixError) as ei:
        carol.join(room_id)  # private room and the invite was consumed
    assert ei.value.status == 403

    pub = alice.create_room()
    carol.join(pub)
    alice.ban(pub, carol.user_id)
    assert carol.user_id not in alice.joined_members(pub)
    with pytest.raises(MatrixError) as ei:
        carol.join(pub)
    assert ei.value.status == 403
    alice.unban(pub, carol.user_id)
    carol.join(pub)
    assert carol.user_id in alice.joined_members(pub)


def test_state_events(hs, users):
    alice = users["alice"]
    room_id = alice.create_room()
    content = {"application": "m.call", "call_id": "", "device_id": alice.device_id}
    key = f"_{alice.user_id}_{alice.device_id}"
    assert hs.send_state(alice, room_id, "org.matrix.msc3401.call.member", key, content)
    assert hs.get_state(alice, room_id, "org.matrix.msc3401.call.member", key) == content


def test_stop_and_restart(hs, users):
    bob = users["bob"]
    url = hs.base_url
    hs.stop()
    assert not hs.running
    with pytest.raises(urllib.error.URLError) as ei:
        urllib.request.urlopen(f"{url}/_matrix/client/versions", timeout=2)
    assert isinstance(ei.value.reason, ConnectionRefusedError)

    t0 = time.monotonic()
    hs.restart()
    assert hs.base_url == url
    sys.stderr.write(f"\n[synapse] restart took {time.monotonic() - t0:.1f}s\n")
    # Same database: existing accounts, tokens and rooms survive.
    tok = bob.openid_token()
    assert hs.openid_userinfo(tok["access_token"]) == {"sub": bob.user_id}
    room_id = users["alice"].create_room()
    bob.join(room_id)
    assert bob.user_id in bob.joined_members(room_id)
