"""The server API (LiveKit's RoomService over Twirp) driven by the real
`livekit-api` client, with real LiveKit Python SDK participants seeing the
effects: every method, LiveKit's grant rules, Twirp errors and bad input.
(The Node SDK's JSON path: tests/api/room_service.test.mjs; a Redis
cluster: test_room_service_cluster.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request

import pytest
from livekit import api, rtc
from livekit.api.twirp_client import ServerError

from moselle_helpers import Client, make_token, run, unique_room, wait_until
from test_call import _pub_sid

EV = 10.0


def lkapi(server, token: str | None = None) -> api.LiveKitAPI:
    if token is not None:
        return api.LiveKitAPI(server.http_url, token=token, failover=False)
    return api.LiveKitAPI(server.http_url, server.api_key, server.api_secret, failover=False)


def record(c: Client, *names: str) -> None:
    """Record events the shared EventLog does not."""
    for n in names:
        c.room.on(n, c.events._recorder(n))


async def refused(coro, code: str, status: int) -> ServerError:
    with pytest.raises(ServerError) as e:
        await coro
    assert (e.value.code, e.value.status) == (code, status), f"{e.value!r}"
    return e.value


def test_every_method_acts_on_a_live_call(server):
    room = unique_room("rs")

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            lk = lkapi(server)
            stack.push_async_callback(lk.aclose)
            created = await lk.room.create_room(api.CreateRoomRequest(
                name=room, empty_timeout=60, max_participants=2, metadata="m1"))
            assert created.name == room and created.sid.startswith("RM_"), created
            assert (created.metadata, created.max_participants, created.empty_timeout) == ("m1", 2, 60)
            listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
            assert [r.name for r in listed.rooms] == [room] and listed.rooms[0].sid == created.sid
            assert listed.rooms[0].num_participants == 0
            again = await lk.room.create_room(api.CreateRoomRequest(name=room))
            assert again.sid == created.sid, "CreateRoom of an open room returns it"

            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            for c in (a, b):
                record(c, "room_metadata_changed", "participant_metadata_changed", "participant_name_changed",
                       "participant_attributes_changed", "data_received", "participant_permissions_changed",
                       "local_track_unpublished")
            await a.connect(server.url, server.token("A", room))
            await b.connect(server.url, server.token("B", room))
            apub = await a.publish_audio(440.0)
            await b.events.wait_for("track_subscribed", _pub_sid(apub.sid), EV, "A's audio")

            # The room's limit of 2 holds against a third participant.
            c = await stack.enter_async_context(Client("C"))
            with pytest.raises(AssertionError):
                await c.connect(server.url, server.token("C", room), timeout=8)

            ps = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
            assert sorted(p.identity for p in ps.participants) == ["A", "B"]
            pa = await lk.room.get_participant(api.RoomParticipantIdentity(room=room, identity="A"))
            assert [t.sid for t in pa.tracks] == [apub.sid] and pa.sid.startswith("PA_")
            await refused(lk.room.get_participant(api.RoomParticipantIdentity(room=room, identity="nobody")),
                          "not_found", 404)
            rooms = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
            assert (rooms.rooms[0].num_participants, rooms.rooms[0].num_publishers) == (2, 1)

            r = await lk.room.update_room_metadata(api.UpdateRoomMetadataRequest(room=room, metadata="m2"))
            assert r.metadata == "m2"
            await b.events.wait_for("room_metadata_changed", lambda old, new: new == "m2", EV, "room metadata m2")
            assert b.room.metadata == "m2"

            info = await lk.room.update_participant(api.UpdateParticipantRequest(
                room=room, identity="A", metadata="am", name="Alice", attributes={"k": "v"}))
            assert (info.metadata, info.name, dict(info.attributes)) == ("am", "Alice", {"k": "v"})
            await b.events.wait_for("participant_metadata_changed",
                                    lambda p, old, new: p.identity == "A" and new == "am", EV, "A's metadata")
            await b.events.wait_for("participant_attributes_changed",
                                    lambda ch, p: p.identity == "A" and ch.get("k") == "v", EV, "A's attributes")
            await a.events.wait_for("participant_name_changed", lambda p, old, new: new == "Alice", EV,
                                    "A sees its own new name")

            await lk.room.send_data(api.SendDataRequest(
                room=room, data=b"hello", kind=api.DataPacket.RELIABLE, topic="news", destination_identities=["B"]))
            got = await b.events.wait_for("data_received", lambda d: d.data == b"hello", EV, "the API's data")
            assert got.args[0].topic == "news" and got.args[0].participant is None, "sent by the server"
            await lk.room.send_data(api.SendDataRequest(room=room, data=b"to all", kind=api.DataPacket.RELIABLE))
            await a.events.wait_for("data_received", lambda d: d.data == b"to all", EV, "data to everyone")
            assert a.events.find("data_received", lambda d: d.data == b"hello") is None, "B's data reached A"

            # Unsubscribed by the API, B stops hearing A; subscribed again, it hears A again.
            st = b.probe.audio[apub.sid]
            await wait_until(lambda: st.loud_seconds() > 0.5, EV, lambda: f"B does not hear A: {st.describe()}")
            await lk.room.update_subscriptions(api.UpdateSubscriptionsRequest(
                room=room, identity="B", track_sids=[apub.sid], subscribe=False))
            await asyncio.sleep(1.5)
            n = st.loud_samples
            await asyncio.sleep(2.0)
            assert st.loud_samples == n, f"B still hears A after the API unsubscribed it: {st.describe()}"
            await lk.room.update_subscriptions(api.UpdateSubscriptionsRequest(
                room=room, identity="B", track_sids=[apub.sid], subscribe=True))

            def hears_again() -> bool:
                cur = b.probe.audio[apub.sid]
                return cur.loud_samples > n if cur is st else cur.loud_seconds() > 0.3

            await wait_until(hears_again, EV, lambda: f"B does not hear A again: {b.probe.audio[apub.sid].describe()}")

            muted = await lk.room.mute_published_track(api.MuteRoomTrackRequest(
                room=room, identity="A", track_sid=apub.sid, muted=True))
            assert muted.track.sid == apub.sid and muted.track.muted
            await b.events.wait_for("track_muted", _pub_sid(apub.sid), EV, "A's audio muted by the API")
            await wait_until(lambda: apub.muted, EV, lambda: "A's own client did not mute its track")
            await refused(lk.room.mute_published_track(api.MuteRoomTrackRequest(
                room=room, identity="A", track_sid=apub.sid, muted=False)), "failed_precondition", 412)
            await refused(lk.room.mute_published_track(api.MuteRoomTrackRequest(
                room=room, identity="A", track_sid="TR_none", muted=True)), "not_found", 404)

            mark = b.events.mark()
            await lk.room.update_participant(api.UpdateParticipantRequest(
                room=room, identity="A",
                permission=api.ParticipantPermission(can_publish=False, can_subscribe=True, can_publish_data=True)))
            await b.events.wait_for("track_unpublished", _pub_sid(apub.sid), EV, "A may no longer publish",
                                    since=mark)
            await a.events.wait_for("participant_permissions_changed", timeout=EV, what="A told of its permissions")
            assert not a.room.local_participant.permissions.can_publish

            await lk.room.remove_participant(api.RoomParticipantIdentity(room=room, identity="B"))
            ev = await b.events.wait_for("disconnected", timeout=EV, what="B removed by the API")
            assert ev.args[0] == rtc.DisconnectReason.PARTICIPANT_REMOVED, ev.args
            ps = await lk.room.list_participants(api.ListParticipantsRequest(room=room))
            assert [p.identity for p in ps.participants] == ["A"]
            await refused(lk.room.remove_participant(api.RoomParticipantIdentity(room=room, identity="B")),
                          "not_found", 404)

            await lk.room.delete_room(api.DeleteRoomRequest(room=room))
            ev = await a.events.wait_for("disconnected", timeout=EV, what="A: the room was deleted")
            assert ev.args[0] == rtc.DisconnectReason.ROOM_DELETED, ev.args
            assert (await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))).rooms == []
            await refused(lk.room.delete_room(api.DeleteRoomRequest(room=room)), "not_found", 404)
            await refused(lk.room.list_participants(api.ListParticipantsRequest(room=room)), "not_found", 404)

    run(scenario, timeout=120)


def test_grants_are_those_livekit_requires(server):
    """Every method refused without its grant (roomCreate: create/delete,
    roomList: list, roomAdmin for that very room: the rest), and every
    call refused without a valid token."""
    room, other = unique_room("grants"), unique_room("other")

    def tok(**grants) -> str:
        t = api.AccessToken(server.api_key, server.api_secret).with_identity("ops")
        return t.with_grants(api.VideoGrants(**grants)).to_jwt()

    calls = {
        "CreateRoom": lambda lk: lk.room.create_room(api.CreateRoomRequest(name=room)),
        "ListRooms": lambda lk: lk.room.list_rooms(api.ListRoomsRequest()),
        "DeleteRoom": lambda lk: lk.room.delete_room(api.DeleteRoomRequest(room=room)),
        "ListParticipants": lambda lk: lk.room.list_participants(api.ListParticipantsRequest(room=room)),
        "GetParticipant": lambda lk: lk.room.get_participant(api.RoomParticipantIdentity(room=room, identity="x")),
        "RemoveParticipant": lambda lk: lk.room.remove_participant(
            api.RoomParticipantIdentity(room=room, identity="x")),
        "MutePublishedTrack": lambda lk: lk.room.mute_published_track(
            api.MuteRoomTrackRequest(room=room, identity="x", track_sid="TR_x", muted=True)),
        "UpdateParticipant": lambda lk: lk.room.update_participant(
            api.UpdateParticipantRequest(room=room, identity="x", metadata="m")),
        "UpdateSubscriptions": lambda lk: lk.room.update_subscriptions(
            api.UpdateSubscriptionsRequest(room=room, identity="x", track_sids=["TR_x"], subscribe=True)),
        "SendData": lambda lk: lk.room.send_data(api.SendDataRequest(room=room, data=b"x")),
        "UpdateRoomMetadata": lambda lk: lk.room.update_room_metadata(
            api.UpdateRoomMetadataRequest(room=room, metadata="m")),
    }
    admin_methods = set(calls) - {"CreateRoom", "ListRooms", "DeleteRoom"}
    needs = {"CreateRoom": "room_create", "DeleteRoom": "room_create", "ListRooms": "room_list"}
    grant_sets = {
        "join only": dict(room_join=True, room=room),
        "roomCreate": dict(room_create=True),
        "roomList": dict(room_list=True),
        "roomAdmin for another room": dict(room_admin=True, room=other),
        "roomAdmin for the room": dict(room_admin=True, room=room),
    }

    async def scenario():
        before = server.metric("api_auth_failures_total")
        for label, grants in grant_sets.items():
            lk = lkapi(server, tok(**grants))
            try:
                for method, call in calls.items():
                    if method in admin_methods:
                        allowed = grants.get("room_admin") and grants.get("room") == room
                    else:
                        allowed = bool(grants.get(needs[method]))
                    if allowed:
                        # Past the grant check: the room (or participant) may not exist.
                        try:
                            await call(lk)
                        except ServerError as e:
                            assert e.code == "not_found", f"{method} with {label}: {e!r}"
                    else:
                        await refused(call(lk), "permission_denied", 403)
            finally:
                await lk.aclose()
        for bad in ("not.a.jwt", make_token("x", room, api_secret="a-different-secret-of-enough-length")):
            lk = lkapi(server, bad)
            try:
                await refused(calls["ListRooms"](lk), "unauthenticated", 401)
            finally:
                await lk.aclose()
        st, _, out = _post(server, "ListRooms", b"", "application/protobuf", token="")
        assert (st, json.loads(out)["code"]) == (401, "unauthenticated"), out
        assert server.metric("api_auth_failures_total") >= before + 3

    run(scenario, timeout=60)


def _post(server, method: str, body: bytes, ctype: str, token: str | None = None):
    req = urllib.request.Request(f"{server.http_url}/twirp/livekit.RoomService/{method}", data=body, method="POST")
    req.add_header("Content-Type", ctype)
    if token is None:
        token = (api.AccessToken(server.api_key, server.api_secret).with_identity("ops")
                 .with_grants(api.VideoGrants(room_create=True, room_list=True)).to_jwt())
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def test_json_bodies_twirp_errors_and_bad_input(server):
    """Protobuf JSON in and out (as the Node SDK speaks it); malformed bodies,
    unknown methods and content types get Twirp errors, are counted, and
    leave the node serving."""
    room = unique_room("json")
    malformed_before = server.metric("api_malformed_total")
    st, ct, body = _post(server, "CreateRoom", json.dumps({"name": room, "emptyTimeout": 30}).encode(),
                         "application/json")
    assert (st, ct) == (200, "application/json"), body
    r = json.loads(body)
    assert r["name"] == room and r["emptyTimeout"] == 30 and r["sid"].startswith("RM_"), r

    cases = [
        ("CreateRoom", b"{not json", "application/json", 400, "malformed"),
        ("CreateRoom", b"\xff\xff\xff\x0f", "application/protobuf", 400, "malformed"),
        ("CreateRoom", b"{}", "text/plain", 404, "bad_route"),
        ("NoSuchMethod", b"{}", "application/json", 404, "bad_route"),
        ("CreateRoom", json.dumps({"name": room, "metadata": "x" * 70_000}).encode(), "application/json",
         400, "invalid_argument"),
        ("CreateRoom", b"{}", "application/json", 400, "invalid_argument"),
    ]
    for method, body, ctype, status, code in cases:
        st, ct, out = _post(server, method, body, ctype)
        assert (st, ct) == (status, "application/json"), (method, ctype, st, out)
        assert json.loads(out)["code"] == code, out
        assert json.loads(out)["msg"], "a Twirp error says what is wrong"
    assert server.metric("api_malformed_total") >= malformed_before + 4
    assert urllib.request.urlopen(f"{server.http_url}/healthz", timeout=5).status == 200
