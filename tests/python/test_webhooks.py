"""Webhooks as LiveKit sends them, checked by the real `livekit-api`
WebhookReceiver (signature and body hash): a call's room, participant and
track events arrive in order and carry no IP address; a receiver that fails
is retried with backoff, a dead one is given up and counted, and the call
goes on unharmed."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time

from livekit import api

from conftest import HOST, start_moselle, stop_moselle
from moselle_helpers import API_KEY, API_SECRET, Client, run, unique_room, wait_until


class Receiver:
    """A webhook endpoint on a free port; `fail_first` requests get a 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.events: list = []
        self.errors: list[str] = []
        self.bodies: list[str] = []
        self.requests = 0
        self.fail_first = fail_first
        verifier = api.WebhookReceiver(api.TokenVerifier(API_KEY, API_SECRET))
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                outer.requests += 1
                if outer.requests <= outer.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                try:
                    assert self.headers.get("Content-Type") == "application/webhook+json", self.headers
                    outer.events.append(verifier.receive(body, self.headers.get("Authorization", "")))
                    outer.bodies.append(body)
                    self.send_response(200)
                except Exception as e:  # a bad signature or body: recorded, refused
                    outer.errors.append(repr(e))
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def names(self, room: str) -> list[str]:
        return [e.event for e in self.events if e.room.name == room]

    def close(self) -> None:
        self.server.shutdown()


def _config(tmp_path, urls: list[str]) -> str:
    path = tmp_path / "hooks.toml"
    path.write_text(
        "[room]\nempty_timeout_secs = 1\ndeparture_timeout_secs = 1\n\n"
        f"[webhook]\nurls = {json.dumps(urls)}\ntimeout_ms = 1000\nattempts = 3\n"
    )
    return str(path)


def _call(srv, room: str) -> None:
    """A joins and publishes audio, B joins and hears it, both leave."""

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            await a.connect(srv.url, srv.token("A", room))
            await b.connect(srv.url, srv.token("B", room))
            pub = await a.publish_audio(440.0)
            await wait_until(
                lambda: pub.sid in b.probe.audio and b.probe.audio[pub.sid].frames > 50,
                15,
                lambda: f"B hears no audio from A: {b.probe.audio}",
            )
            await a.room.local_participant.unpublish_track(pub.sid)
            await b.room.disconnect()
            await a.room.disconnect()

    run(scenario, 60)


def test_a_call_gives_livekits_webhooks_in_order_signed_and_without_addresses(tmp_path):
    rx = Receiver()
    srv = start_moselle(tmp_path, ["--config", _config(tmp_path, [rx.url])])
    try:
        room = unique_room("hooks")
        _call(srv, room)
        want_last = "room_finished"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and want_last not in rx.names(room):
            time.sleep(0.2)
        names = rx.names(room)
        assert not rx.errors, f"webhooks the real receiver refused: {rx.errors}"
        assert names[0] == "room_started" and names[-1] == "room_finished", names
        assert sorted(names) == sorted(
            ["room_started", "participant_joined", "participant_joined", "track_published",
             "track_unpublished", "participant_left", "participant_left", "room_finished"]
        ), names
        assert names.index("track_published") < names.index("track_unpublished"), names
        by = {e.event: e for e in rx.events if e.room.name == room}
        assert by["track_published"].participant.identity == "A"
        assert by["track_published"].track.type == 0, "an audio track"  # livekit.TrackType.AUDIO
        joined = [e.participant.identity for e in rx.events if e.event == "participant_joined"]
        assert sorted(joined) == ["A", "B"], joined
        assert all(e.id and e.created_at > 0 for e in rx.events), "id and created_at set"
        for body in rx.bodies:
            assert HOST not in body, f"an IP address in a webhook: {body}"
        assert srv.metric("webhooks_sent_total") >= len(names)
        assert srv.metric("webhooks_failed_total") == 0
    finally:
        stop_moselle(srv)
        rx.close()


def test_failing_receivers_are_retried_or_given_up_and_the_call_goes_on(tmp_path):
    flaky = Receiver(fail_first=2)  # the first event needs its third attempt
    dead = f"http://{HOST}:9/nothing-listens-here"
    srv = start_moselle(tmp_path, ["--config", _config(tmp_path, [flaky.url, dead])])
    try:
        room = unique_room("hooks-fail")
        _call(srv, room)  # media flows while one URL is dead
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "room_finished" not in flaky.names(room):
            time.sleep(0.2)
        assert flaky.names(room)[0] == "room_started", flaky.names(room)
        assert "room_finished" in flaky.names(room), flaky.names(room)
        assert srv.metric("webhooks_retries_total") >= 2
        # The dead URL: every event given up after 3 attempts (0.5 s + 1 s apart).
        wait = time.monotonic() + 30
        while time.monotonic() < wait and srv.metric("webhooks_failed_total") < 8:
            time.sleep(0.5)
        assert srv.metric("webhooks_failed_total") >= 8, srv.metric("webhooks_failed_total")
    finally:
        stop_moselle(srv)
        flaky.close()
