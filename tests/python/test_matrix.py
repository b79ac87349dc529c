"""The MatrixRTC token service against a real Synapse: only members of the
Matrix room get a call token, the token works with the real LiveKit SDK,
and leaving the room ends access. Runs inside tests/netns.sh."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import start_moselle, stop_moselle
from moselle_helpers import Client, run, wait_until
from synapse_harness import Synapse
from test_call import _is, _pub_sid

EVENT_TIMEOUT_S = 10.0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synapse(tmp_path_factory):
    hs = Synapse().start(tmp_path_factory.mktemp("synapse"))
    yield hs
    hs.stop()


@pytest.fixture(scope="module")
def people(synapse):
    admin = synapse.register("svc", admin=True)  # the membership checker
    alice = synapse.register("alice")
    bob = synapse.register("bob")
    eve = synapse.register("eve")
    return {"admin": admin, "alice": alice, "bob": bob, "eve": eve}


def _config(tmp_path, synapse, admin, method="admin_api", recheck=1, timeout_ms=2000, slow_url="http://127.0.0.1:9") -> str:
    """A node with the token service on, homeserver 'localhost' found via the
    override map, membership checked with the given method."""
    # The embedded default, with the token service on and auto-create off.
    text = (REPO / "config" / "moselle.toml").read_text()
    matrix = f"""[matrix]
enabled = true
livekit_url = "ws://placeholder"
full_access_homeservers = ["localhost"]
denied_homeservers = ["denied.example"]
token_ttl_secs = 600
request_timeout_ms = {timeout_ms}
membership_recheck_secs = {recheck}
requests_per_minute_per_address = 600
requests_per_minute_per_user = 600
allow_metadata_updates = false

[matrix.homeserver_urls]
localhost = "{synapse.base_url}"
"slow.example" = "{slow_url}"

[matrix.membership]
method = "{method}"
homeserver_url = "{synapse.base_url}"
access_token = "{admin.access_token}"

"""
    text = text[: text.index("[matrix]")] + matrix + text[text.index("[cluster]"):]
    text = text.replace("auto_create = true", "auto_create = false")
    path = tmp_path / f"moselle-{method}.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def node(tmp_path_factory, synapse, people):
    d = tmp_path_factory.mktemp("moselle-matrix")
    srv = start_moselle(d, ["--config", _config(d, synapse, people["admin"])])
    yield srv
    stop_moselle(srv)


def post(srv, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{srv.http_url}{path}", data=data, method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


def get_token_body(user, room_id: str, openid: dict, claimed: str | None = None, device="DEV1", member="m1"):
    return {
        "room_id": room_id,
        "slot_id": "m.call#ROOM",
        "openid_token": openid,
        "member": {"id": member, "claimed_user_id": claimed or user.user_id, "claimed_device_id": device},
    }


def sfu_room_name(room_id: str, slot_id: str) -> str:
    """The definition: unpadded base64 of SHA-256 over the JSON [room_id, slot_id]."""
    import base64
    import hashlib
    data = json.dumps([room_id, slot_id], separators=(",", ":")).encode()
    return base64.b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


def jwt_claims(jwt: str) -> dict:
    import base64
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@pytest.fixture(scope="module")
def room(synapse, people):
    alice, bob = people["alice"], people["bob"]
    room_id = alice.create_room()
    bob.join(room_id)
    return room_id


def test_member_gets_a_token_that_real_clients_use(node, synapse, people, room):
    """Alice and Bob (members) get tokens; with them, the LiveKit SDK joins
    the same SFU room and Bob receives Alice's audio."""
    alice, bob = people["alice"], people["bob"]
    st, a = post(node, "/get_token", get_token_body(alice, room, alice.openid_token()))
    assert st == 200, a
    st, b = post(node, "/get_token", get_token_body(bob, room, bob.openid_token(), device="DEV2", member="m2"))
    assert st == 200, b
    assert set(a) == {"url", "jwt"}
    ca, cb = jwt_claims(a["jwt"]), jwt_claims(b["jwt"])
    assert ca["video"]["room"] == cb["video"]["room"], "both land in one SFU room"
    assert ca["video"]["canPublish"] is True and not ca["video"].get("roomCreate"), "no admin grant"
    assert not ca["video"].get("roomAdmin") and not ca["video"].get("canUpdateOwnMetadata")
    assert 0 < ca["exp"] - ca["nbf"] <= 3600, "short-lived"

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            ca_ = await stack.enter_async_context(Client("alice"))
            cb_ = await stack.enter_async_context(Client("bob"))
            await ca_.connect(node.url, a["jwt"])
            await cb_.connect(node.url, b["jwt"])
            apub = await ca_.publish_audio(440.0)
            await cb_.events.wait_for("track_subscribed", _pub_sid(apub.sid), EVENT_TIMEOUT_S, "alice's audio")
            st_ = cb_.probe.audio[apub.sid]
            await wait_until(lambda: st_.loud_seconds() >= 0.5, 10,
                             lambda: f"bob should hear alice: {st_.describe()}")

    run(scenario, timeout=60)
    log = node.log_path.read_text(errors="replace")
    assert a["jwt"] not in log and b["jwt"] not in log, "tokens must never be logged"


def test_non_member_gets_403(node, people, room):
    eve = people["eve"]
    st, body = post(node, "/get_token", get_token_body(eve, room, eve.openid_token()))
    assert st == 403, body
    assert body["errcode"] == "M_FORBIDDEN"


def test_forged_or_wrong_openid_token_gets_401(node, people, room):
    bob = people["bob"]
    good = bob.openid_token()
    forged = dict(good, access_token="forged-" + good["access_token"][::-1])
    st, body = post(node, "/get_token", get_token_body(bob, room, forged))
    assert st == 401 and body["errcode"] == "M_UNAUTHORIZED", body


def test_claimed_user_must_match_the_homeservers_answer(node, people, room):
    bob, alice = people["bob"], people["alice"]
    st, body = post(node, "/get_token", get_token_body(bob, room, bob.openid_token(), claimed=alice.user_id))
    assert st == 401 and body["errcode"] == "M_UNAUTHORIZED", body


def test_malformed_requests_get_matrix_errors(node, people, room):
    bob = people["bob"]
    st, body = post(node, "/get_token", b"{not json")
    assert st == 400 and body["errcode"] == "M_NOT_JSON", body
    st, body = post(node, "/get_token", {"room_id": room})
    assert st == 400 and body["errcode"] == "M_BAD_JSON", body
    b = get_token_body(bob, room, bob.openid_token())
    b["unexpected"] = 1
    st, body = post(node, "/get_token", b)
    assert st == 400 and body["errcode"] == "M_NOT_JSON", body
    st, body = post(node, "/get_token", b"x" * (64 * 1024))
    assert st == 413, body


def test_denied_homeserver_gets_nothing(node, people, room):
    bob = people["bob"]
    t = dict(bob.openid_token(), matrix_server_name="denied.example")
    st, body = post(node, "/get_token", get_token_body(bob, room, t))
    assert st == 403 and body["errcode"] == "M_FORBIDDEN", body


def test_legacy_sfu_get(node, people, room):
    bob, eve = people["bob"], people["eve"]
    st, body = post(node, "/sfu/get", {"room": room, "openid_token": bob.openid_token(), "device_id": "DEV9"})
    assert st == 200, body
    claims = jwt_claims(body["jwt"])
    assert claims["sub"] == f"{bob.user_id}:DEV9"
    # Element Call reads the payload with the browser's atob, which refuses
    # base64url's '-' and '_': a device id that would produce them is escaped.
    odd = "DÉV~?>"
    st, body = post(node, "/sfu/get", {"room": room, "openid_token": bob.openid_token(), "device_id": odd})
    assert st == 200, body
    payload = body["jwt"].split(".")[1]
    assert "-" not in payload and "_" not in payload, payload
    import base64
    assert json.loads(base64.b64decode(payload + "=" * (-len(payload) % 4)))["sub"] == f"{bob.user_id}:{odd}"
    st, body = post(node, "/sfu/get", {"room": room, "openid_token": eve.openid_token(), "device_id": "X"})
    assert st == 403, body


def test_member_who_leaves_is_removed_from_the_call(node, synapse, people):
    alice, bob = people["alice"], people["bob"]
    room_id = alice.create_room()
    bob.join(room_id)
    st, a = post(node, "/get_token", get_token_body(alice, room_id, alice.openid_token()))
    assert st == 200, a
    st, b = post(node, "/get_token", get_token_body(bob, room_id, bob.openid_token(), device="D2", member="m2"))
    assert st == 200, b

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            ca = await stack.enter_async_context(Client("alice"))
            cb = await stack.enter_async_context(Client("bob"))
            await ca.connect(node.url, a["jwt"])
            await cb.connect(node.url, b["jwt"])
            bob_identity = jwt_claims(b["jwt"])["sub"]
            await ca.events.wait_for("participant_connected", _is(bob_identity), EVENT_TIMEOUT_S, "bob")
            t0 = time.monotonic()
            bob.leave(room_id)
            ev = await cb.events.wait_for("disconnected", lambda *a: True, 10, "bob removed after leaving the room")
            await ca.events.wait_for("participant_disconnected", _is(bob_identity), 10, "alice sees bob removed")
            print(f"bob removed {time.monotonic() - t0:.1f} s after leaving the Matrix room (recheck every 1 s)")

    run(scenario, timeout=60)


def test_guest_homeserver_users_only_listen_and_only_join_running_calls(tmp_path, synapse, people, room):
    """A node where 'localhost' is not full-access: its users may not start
    a call, and in a running one they may not publish."""
    text = open(_config(tmp_path, synapse, people["admin"])).read()
    assert 'full_access_homeservers = ["localhost"]' in text
    path = tmp_path / "guest.toml"
    path.write_text(text.replace('full_access_homeservers = ["localhost"]', "full_access_homeservers = []"))
    srv = start_moselle(tmp_path, ["--config", str(path)])
    try:
        bob = people["bob"]
        st, body = post(srv, "/get_token", get_token_body(bob, room, bob.openid_token()))
        assert st == 403 and "not been started" in body["error"], body

        # Someone with a full grant starts the call (here: a dev token).
        from livekit import api
        sfu_room = sfu_room_name(room, "m.call#ROOM")
        starter = (api.AccessToken("devkey", "secret").with_identity("starter")
                   .with_grants(api.VideoGrants(room_join=True, room=sfu_room, room_create=True)).to_jwt())

        async def scenario():
            async with contextlib.AsyncExitStack() as stack:
                host = await stack.enter_async_context(Client("starter"))
                await host.connect(srv.url, starter)
                st2, b2 = post(srv, "/get_token", get_token_body(bob, room, bob.openid_token()))
                assert st2 == 200, b2
                v = jwt_claims(b2["jwt"])["video"]
                assert v["canPublish"] is False and v["canSubscribe"] is True and not v.get("roomCreate")
                guest = await stack.enter_async_context(Client("bob"))
                await guest.connect(srv.url, b2["jwt"])
                perm = guest.room.local_participant.permissions
                assert not perm.can_publish, "the SFU tells the guest it may not publish"
                with pytest.raises(AssertionError):
                    await guest.publish_audio(440.0, timeout=5)

        run(scenario, timeout=60)
    finally:
        stop_moselle(srv)


def test_homeserver_down_gives_503_and_no_token(tmp_path, synapse, people, room):
    bob = people["bob"]
    srv = start_moselle(tmp_path, ["--config", _config(tmp_path, synapse, people["admin"], timeout_ms=1500)])
    try:
        token = bob.openid_token()
        synapse.stop()
        t0 = time.monotonic()
        st, body = post(srv, "/get_token", get_token_body(bob, room, token))
        took = time.monotonic() - t0
        assert st == 503 and "jwt" not in body, body
        assert took < 10, f"the refusal must come within a bounded time, took {took:.1f} s"
    finally:
        stop_moselle(srv)
        synapse.restart()


def test_membership_via_client_api_service_account(tmp_path, synapse, people, room):
    """The other checker: a service account in the room (here Bob) asks the
    client-server API who is joined."""
    alice, bob, eve = people["alice"], people["bob"], people["eve"]
    text = open(_config(tmp_path, synapse, bob, method="client_api")).read()
    srv = start_moselle(tmp_path, ["--config", str(tmp_path / "moselle-client_api.toml")])
    try:
        assert 'method = "client_api"' in text
        st, body = post(srv, "/get_token", get_token_body(alice, room, alice.openid_token()))
        assert st == 200, body
        st, body = post(srv, "/get_token", get_token_body(eve, room, eve.openid_token()))
        assert st == 403, body
    finally:
        stop_moselle(srv)


def test_rate_limit_per_address(tmp_path, synapse, people, room):
    text = open(_config(tmp_path, synapse, people["admin"])).read()
    path = tmp_path / "limited.toml"
    path.write_text(text.replace("requests_per_minute_per_address = 600", "requests_per_minute_per_address = 3"))
    srv = start_moselle(tmp_path, ["--config", str(path)])
    try:
        bob = people["bob"]
        codes = [post(srv, "/get_token", get_token_body(bob, room, bob.openid_token()))[0] for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429], codes
        st, body = post(srv, "/get_token", get_token_body(bob, room, bob.openid_token()))
        assert body.get("errcode") == "M_LIMIT_EXCEEDED", body
    finally:
        stop_moselle(srv)


def test_slow_homeserver_gives_503_within_the_timeout(tmp_path, synapse, people, room):
    """A homeserver that accepts the connection and never answers."""
    import socket
    silent = socket.socket()
    silent.bind((synapse.host if hasattr(synapse, "host") else "127.0.0.1", 0))
    silent.listen(16)
    host, port = silent.getsockname()
    srv = start_moselle(tmp_path, ["--config", _config(tmp_path, synapse, people["admin"], timeout_ms=1500,
                                                       slow_url=f"http://{host}:{port}")])
    try:
        bob = people["bob"]
        t = dict(bob.openid_token(), matrix_server_name="slow.example")
        t0 = time.monotonic()
        st, body = post(srv, "/get_token", get_token_body(bob, room, t))
        took = time.monotonic() - t0
        assert st == 503 and "jwt" not in body, body
        assert 1.0 < took < 5.0, f"refused after the 1.5 s timeout, not before or much later: {took:.1f} s"
    finally:
        stop_moselle(srv)
        silent.close()


def test_kicked_member_is_removed_from_the_call(node, synapse, people):
    alice, eve = people["alice"], people["eve"]
    room_id = alice.create_room()
    eve.join(room_id)
    st, a = post(node, "/get_token", get_token_body(alice, room_id, alice.openid_token()))
    st2, e = post(node, "/get_token", get_token_body(eve, room_id, eve.openid_token(), device="E1", member="e1"))
    assert st == 200 and st2 == 200, (a, e)

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            ca = await stack.enter_async_context(Client("alice"))
            ce = await stack.enter_async_context(Client("eve"))
            await ca.connect(node.url, a["jwt"])
            await ce.connect(node.url, e["jwt"])
            eve_identity = jwt_claims(e["jwt"])["sub"]
            await ca.events.wait_for("participant_connected", _is(eve_identity), EVENT_TIMEOUT_S, "eve")
            alice.kick(room_id, eve.user_id, "test")
            await ca.events.wait_for("participant_disconnected", _is(eve_identity), 10, "eve removed after the kick")
            # And she cannot come back.
            st3, body = post(node, "/get_token", get_token_body(eve, room_id, eve.openid_token(), device="E1", member="e1"))
            assert st3 == 403, body

    run(scenario, timeout=60)
