"""Jurisdiction-pinned media with real parts: Redis, Synapse, three Moselle
nodes (two LU, one DE; policy LU), the LiveKit Python SDK. The token
service, asked on the DE node, sends both callers to the LU node that holds
the room; their media flows through that node's port; stopping Redis does
not cut the call. Runs inside tests/netns.sh."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import HOST, start_moselle, stop_moselle
from moselle_helpers import Client, run, wait_until
from synapse_harness import Synapse
from test_call import _pub_sid, _wait_video
from test_matrix import get_token_body, post

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_server(tmp_path_factory):
    port = _free_port()
    proc = subprocess.Popen(
        # Protected mode would refuse clients on the namespace address; nothing
        # outside this namespace can reach it.
        ["redis-server", "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
         "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("redis-server did not start (Debian package redis-server)")
            time.sleep(0.05)
    yield proc, f"redis://{HOST}:{port}"
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def synapse(tmp_path_factory):
    hs = Synapse(extra_config={"max_event_delay_duration": "24h"})
    hs.start(tmp_path_factory.mktemp("synapse"))
    yield hs
    hs.stop()


def _node_config(d: Path, node_id: str, jurisdiction: str, redis_url: str, matrix: str = "") -> str:
    text = (REPO / "config" / "moselle.toml").read_text()
    text = (text.replace('node_id = "moselle-1"', f'node_id = "{node_id}"')
                .replace('jurisdiction = "LU"', f'jurisdiction = "{jurisdiction}"')
                .replace('redis_url = ""', f'redis_url = "{redis_url}"')
                .replace("heartbeat_secs = 2", "heartbeat_secs = 1")
                .replace("node_ttl_secs = 6", "node_ttl_secs = 3")
                .replace("auto_create = true", "auto_create = false"))
    if matrix:
        text = text[: text.index("[matrix]")] + matrix + text[text.index("[cluster]"):]
    path = d / f"{node_id}.toml"
    path.write_text(text)
    return str(path)


def _matrix_section(synapse, admin) -> str:
    return f"""[matrix]
enabled = true
livekit_url = "ws://unused"
full_access_homeservers = ["localhost"]
denied_homeservers = []
token_ttl_secs = 600
request_timeout_ms = 3000
membership_recheck_secs = 5
requests_per_minute_per_address = 600
requests_per_minute_per_user = 600
allow_metadata_updates = false

[matrix.homeserver_urls]
localhost = "{synapse.base_url}"

[matrix.membership]
method = "admin_api"
homeserver_url = "{synapse.base_url}"
access_token = "{admin.access_token}"

"""


def test_token_service_sends_callers_to_the_lu_node_and_media_flows_there(tmp_path, redis_server, synapse):
    redis_proc, redis_url = redis_server
    admin = synapse.register("svc", admin=True)
    alice, bob = synapse.register("alice"), synapse.register("bob")
    room_id = alice.create_room()
    bob.join(room_id)
    matrix = _matrix_section(synapse, admin)
    nodes = {}
    try:
        for node_id, j in (("lu-1", "LU"), ("lu-2", "LU")):
            d = tmp_path / node_id
            d.mkdir()
            nodes[node_id] = start_moselle(d, ["--config", _node_config(d, node_id, j, redis_url)])
        d = tmp_path / "de-1"
        d.mkdir()
        de = nodes["de-1"] = start_moselle(d, ["--config", _node_config(d, "de-1", "DE", redis_url, matrix)])
        time.sleep(1.5)  # first heartbeats

        st, a = post(de, "/get_token", get_token_body(alice, room_id, alice.openid_token()))
        assert st == 200, a
        st, b = post(de, "/get_token", get_token_body(bob, room_id, bob.openid_token(), device="D2", member="m2"))
        assert st == 200, b
        assert a["url"] == b["url"], "both callers are sent to the node holding the room"
        placed = next((n for n in ("lu-1", "lu-2") if nodes[n].url == a["url"]), None)
        assert placed, f"the token service must send callers to an LU node, not {a['url']} (DE is {de.url})"
        node = nodes[placed]

        async def scenario():
            async with contextlib.AsyncExitStack() as stack:
                ca = await stack.enter_async_context(Client("alice"))
                cb = await stack.enter_async_context(Client("bob"))
                await ca.connect(a["url"], a["jwt"])
                await cb.connect(b["url"], b["jwt"])
                vpub = await ca.publish_video(640, 360, 15, simulcast=False)
                await cb.events.wait_for("track_subscribed", _pub_sid(vpub.sid), 10, "alice's video")
                await _wait_video(cb, vpub.sid, "alice")

                # The media path: every remote candidate bob was given, and
                # the pair in use, are the placed node's ports (UDP, and its
                # ICE-TCP port).
                stats = await cb.room.get_rtc_stats()
                ports = {s.remote_candidate.candidate.port
                         for s in stats.publisher_stats + stats.subscriber_stats
                         if s.WhichOneof("stats") == "remote_candidate"}
                assert node.udp_port in ports and ports <= {node.udp_port, node.tcp_port}, (
                    f"bob's remote candidates {ports}; placed node {placed} has UDP port {node.udp_port} "
                    f"and TCP port {node.tcp_port}, DE node {de.udp_port}/{de.tcp_port}")

                # Redis goes away mid-call: the call goes on.
                redis_proc.kill()
                redis_proc.wait()
                st_ = cb.probe.video[vpub.sid]
                before = st_.frames
                await asyncio.sleep(3)
                assert st_.frames - before >= 20, f"video stalled without Redis: {st_.describe()}"

        run(scenario, timeout=60)
    finally:
        for n in nodes.values():
            stop_moselle(n)


def test_delayed_leave_delegated_on_one_node_is_kept_by_the_node_holding_the_call(tmp_path, redis_server, synapse):
    """Alice asks the DE node for a token and delegates her delayed leave
    there; the call is placed on the LU node, which takes the delegation
    over through Redis: her membership outlives its 5 s delay while she is
    connected, and ends within seconds once she leaves the SFU."""
    from test_delegation import join_call, membership, metric, wait_left, DELAY_MS
    _, redis_url = redis_server
    admin = synapse.register("svc2", admin=True)
    alice = synapse.register("alice2")
    room_id = alice.create_room()
    matrix = _matrix_section(synapse, admin)
    nodes = {}
    try:
        for node_id, j in (("lu-1", "LU"), ("de-1", "DE")):
            d = tmp_path / node_id
            d.mkdir()
            # Every node runs the token service: delegations are carried out
            # by the node that holds the call.
            nodes[node_id] = start_moselle(d, ["--config", _node_config(d, node_id, j, redis_url, matrix)])
        time.sleep(1.5)  # first heartbeats
        lu, de = nodes["lu-1"], nodes["de-1"]
        delay_id = join_call(synapse, alice, room_id, "DEVC")
        st, tok = post(de, "/sfu/get", {"room": room_id, "openid_token": alice.openid_token(),
                                         "device_id": "DEVC", "delay_id": delay_id,
                                         "delay_timeout": DELAY_MS})
        assert st == 200, tok
        assert tok["url"] == lu.url, "the call is placed on the LU node"

        async def scenario():
            c = Client("alice")
            await c.connect(tok["url"], tok["jwt"])
            await c.publish_audio(440.0)
            await asyncio.sleep(3 * DELAY_MS / 1000)
            assert membership(synapse, alice, room_id, "DEVC") != {}, "the leave fired during the call"
            await c.disconnect()
            await c.aclose()

        run(scenario, timeout=60)
        took = wait_left(synapse, alice, room_id, "DEVC", timeout=10)
        print(f"delegated leave through Redis, after a disconnect: {took:.1f} s")
        assert metric(lu, "matrix_delegations_accepted_total") == 1
        # Synapse stores the leave before it answers the node, so the test can
        # see the member gone a moment before the node counts its send.
        deadline = time.monotonic() + 5
        while metric(lu, "matrix_delegated_leaves_sent_total") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        counts = {k: metric(lu, k) for k in ("matrix_delegated_leaves_sent_total",
                                              "matrix_delegations_ended_by_client_total",
                                              "matrix_delegation_failures_total",
                                              "matrix_delegation_restarts_total")}
        assert counts["matrix_delegated_leaves_sent_total"] == 1, \
            f"the LU node did not send the leave (the homeserver fired it by itself?): {counts}"
        assert metric(de, "matrix_delegations_accepted_total") == 0
    finally:
        for n in nodes.values():
            stop_moselle(n)


def test_a_call_whose_node_dies_goes_on_on_the_surviving_lu_node(tmp_path, redis_server, synapse):
    """Two LU nodes. The node holding a running call is killed (SIGKILL).
    Its participants come back with the tokens they hold, on the other LU
    node (as clients do when the call's URL moves there, e.g. a floating
    address): once the dead node's registration expires the call is placed
    again, in LU, and media flows. Time from the kill to the call's return
    is printed."""
    _, redis_url = redis_server
    admin = synapse.register("svc3", admin=True)
    alice, bob = synapse.register("alice3"), synapse.register("bob3")
    room_id = alice.create_room()
    bob.join(room_id)
    matrix = _matrix_section(synapse, admin)
    nodes = {}
    try:
        for node_id in ("lu-1", "lu-2"):
            d = tmp_path / node_id
            d.mkdir()
            nodes[node_id] = start_moselle(d, ["--config", _node_config(d, node_id, "LU", redis_url, matrix)])
        time.sleep(1.5)  # first heartbeats
        st, a = post(nodes["lu-1"], "/get_token", get_token_body(alice, room_id, alice.openid_token()))
        assert st == 200, a
        st, b = post(nodes["lu-1"], "/get_token",
                      get_token_body(bob, room_id, bob.openid_token(), device="D2", member="m2"))
        assert st == 200, b
        held = next(n for n in nodes if nodes[n].url == a["url"])
        other = next(n for n in nodes if n != held)

        async def connect_until(identity, url, token, deadline_s):
            t0 = time.monotonic()
            last = None
            while time.monotonic() - t0 < deadline_s:
                c = Client(identity)
                try:
                    await c.connect(url, token)
                    return c, time.monotonic() - t0
                except AssertionError as e:  # 409 while the dead node still counts as alive
                    last = e
                    await c.aclose()
                    await asyncio.sleep(0.5)
            raise AssertionError(f"{identity} could not rejoin on {url}: {last}")

        async def scenario():
            ca = Client("alice")
            await ca.connect(a["url"], a["jwt"])
            await ca.publish_audio(440.0)
            nodes[held].proc.kill()  # SIGKILL: no drain, no goodbye
            nodes[held].proc.wait()
            t_kill = time.monotonic()
            url = nodes[other].url
            ca2, took_a = await connect_until("alice", url, a["jwt"], 20)
            cb, _ = await connect_until("bob", url, b["jwt"], 20)
            apub = await ca2.publish_audio(440.0)
            await cb.events.wait_for("track_subscribed", _pub_sid(apub.sid), 10, "alice's audio")
            st_ = cb.probe.audio[apub.sid]
            await wait_until(lambda: st_.loud_seconds() >= 0.5, 10, lambda: f"bob should hear alice: {st_.describe()}")
            print(f"call back on {other} {time.monotonic() - t_kill:.1f} s after {held} was killed "
                  f"(alice rejoined after {took_a:.1f} s; node_ttl 3 s)")
            for c in (ca2, cb):
                await c.aclose()
            with contextlib.suppress(Exception):
                await ca.aclose()

        run(scenario, timeout=90)
        # Re-placed in LU, on the survivor.
        st, again = post(nodes[other], "/get_token", get_token_body(alice, room_id, alice.openid_token()))
        assert st == 200 and again["url"] == nodes[other].url, again
    finally:
        for n in nodes.values():
            stop_moselle(n)


def test_room_service_reaches_the_room_from_any_node_and_places_only_in_policy(tmp_path, redis_server):
    """LiveKit's RoomService (livekit-api) on a Redis cluster: CreateRoom
    asked of the DE node places the room on an LU node (and is refused while
    no LU node runs); every other call, asked of any node, acts on the room
    where it is."""
    from livekit import api
    from livekit.api.twirp_client import ServerError
    from test_room_service import lkapi, record

    _, redis_url = redis_server
    nodes = {}
    room = f"api-{time.time_ns()}"

    def start(node_id: str, j: str):
        d = tmp_path / node_id
        d.mkdir()
        nodes[node_id] = start_moselle(d, ["--config", _node_config(d, node_id, j, redis_url)])
        return nodes[node_id]

    async def scenario():
        de = start("de-1", "DE")
        await asyncio.sleep(1.5)  # first heartbeat
        lk_de = lkapi(de)
        try:
            with pytest.raises(ServerError) as e:
                await lk_de.room.create_room(api.CreateRoomRequest(name=room))
            assert (e.value.code, e.value.status) == ("failed_precondition", 412), e.value
            assert "LU" in e.value.message, e.value.message
            start("lu-1", "LU")
            start("lu-2", "LU")
            await asyncio.sleep(1.5)
            created = await lk_de.room.create_room(api.CreateRoomRequest(name=room, metadata="m1"))
            assert created.name == room and created.metadata == "m1"
            placed = [r for r in admin_rooms(de) if r["room"] == room]
            assert len(placed) == 1 and placed[0]["jurisdiction"] == "LU", placed
            home = nodes[placed[0]["node"]]
            for n in nodes.values():
                async with lkapi(n) as lk:
                    listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[room]))
                    assert [(r.name, r.sid) for r in listed.rooms] == [(room, created.sid)], n.url

            async with Client("A") as a:
                record(a, "room_metadata_changed")
                await a.connect(home.url, home.token("A", room))
                other = next(n for k, n in nodes.items() if k != placed[0]["node"] and k != "de-1")
                async with lkapi(other) as lk:
                    await lk.room.update_room_metadata(api.UpdateRoomMetadataRequest(room=room, metadata="m2"))
                await a.events.wait_for("room_metadata_changed", lambda old, new: new == "m2", 10,
                                        "metadata set through the other LU node")
                ps = await lk_de.room.list_participants(api.ListParticipantsRequest(room=room))
                assert [p.identity for p in ps.participants] == ["A"]
                await lk_de.room.remove_participant(api.RoomParticipantIdentity(room=room, identity="A"))
                await a.events.wait_for("disconnected", timeout=10, what="A removed through the DE node")
            await lk_de.room.delete_room(api.DeleteRoomRequest(room=room))
            assert (await lk_de.room.list_rooms(api.ListRoomsRequest(names=[room]))).rooms == []
            assert de.metric("api_forwarded_total") >= 4
        finally:
            await lk_de.aclose()

    try:
        run(scenario, timeout=90)
    finally:
        for n in nodes.values():
            stop_moselle(n)


def admin_rooms(node) -> list[dict]:
    import json
    import urllib.request
    from livekit import api

    tok = api.AccessToken(node.api_key, node.api_secret).with_grants(api.VideoGrants(room_list=True)).to_jwt()
    req = urllib.request.Request(f"{node.http_url}/admin/rooms", headers={"Authorization": f"Bearer {tok}"})
    return json.loads(urllib.request.urlopen(req, timeout=5).read())["rooms"]
