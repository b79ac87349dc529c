"""Call conformance: what users of the real LiveKit Python SDK observe through Moselle.

Each test runs one asyncio scenario (plain asyncio.run, overall timeout) in which every
participant is an rtc.Room in this process. Media is synthetic (see moselle_helpers):
receivers must decode it, and audio/video are checked to come from the right publisher
(sine frequency, picture chroma).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from livekit import rtc

from moselle_helpers import (
    SAMPLE_RATE,
    Client,
    run,
    unique_room,
    wait_until,
)

MEDIA_TIMEOUT_S = 10.0  # decoded media must arrive within this long after subscription
EVENT_TIMEOUT_S = 10.0
MIN_VIDEO_FRAMES = 10
MIN_LOUD_AUDIO_S = 0.5
FREQ_TOLERANCE_HZ = 15.0
CHROMA_TOLERANCE = 25.0


def _is(identity: str):
    return lambda p, *rest: p.identity == identity


def _pub_sid(sid: str):
    """Predicate for (track, publication, participant) / (publication, participant) events."""

    def pred(*args) -> bool:
        return any(isinstance(a, rtc.TrackPublication) and a.sid == sid for a in args)

    return pred


def _participant_pub(sid: str):
    """Predicate for (participant, publication) events (track_muted / track_unmuted)."""
    return lambda participant, publication: publication.sid == sid


async def _wait_video(rx: Client, sid: str, publisher: str) -> None:
    st = rx.probe.video[sid]
    await wait_until(
        lambda: st.frames >= MIN_VIDEO_FRAMES,
        max(0.0, st.subscribed_at + MEDIA_TIMEOUT_S - time.monotonic()),
        lambda: f"{rx.identity} expected >= {MIN_VIDEO_FRAMES} decoded frames of {publisher}'s video "
        f"within {MEDIA_TIMEOUT_S:.0f}s of subscribing; got {st.describe()}",
    )


async def _wait_audio(rx: Client, sid: str, publisher: str, need_freq: bool) -> None:
    st = rx.probe.audio[sid]
    await wait_until(
        lambda: st.loud_seconds() >= MIN_LOUD_AUDIO_S and (st.peak_hz is not None or not need_freq),
        max(0.0, st.subscribed_at + MEDIA_TIMEOUT_S - time.monotonic()),
        lambda: f"{rx.identity} expected >= {MIN_LOUD_AUDIO_S}s of non-silent audio (RMS > 1000) from "
        f"{publisher} within {MEDIA_TIMEOUT_S:.0f}s of subscribing; got {st.describe()}",
    )


def _check_aspect(width: int, height: int, pub_w: int, pub_h: int, who: str) -> None:
    assert width > 0 and height > 0, f"{who}: decoded frame has no size ({width}x{height})"
    want = pub_w / pub_h
    got = width / height
    assert abs(got - want) / want < 0.05, (
        f"{who}: decoded video is {width}x{height} (aspect {got:.3f}); published {pub_w}x{pub_h} (aspect {want:.3f})"
    )


# --------------------------------------------------------------------------- a


# Both signaling flavours real clients speak: one peer connection (/rtc/v1,
# the SDK default) and publisher + subscriber connections (/rtc).
@pytest.fixture(params=[True, False], ids=["single_pc", "dual_pc"])
def pc_mode(request):
    return {"single_peer_connection": request.param}


def test_two_party_audio_and_simulcast_video(server, pc_mode, record_property):
    """B receives A's Opus audio (non-silent 440 Hz) and decoded simulcast VP8 camera video."""
    room = unique_room("two-party")
    W, H, FPS, FREQ = 1280, 720, 20, 440.0

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            b = await stack.enter_async_context(Client("B"))
            a = await stack.enter_async_context(Client("A"))

            await b.connect(server.url, server.token("B", room), **pc_mode)
            await a.connect(server.url, server.token("A", room), **pc_mode)
            await b.events.wait_for("participant_connected", _is("A"), EVENT_TIMEOUT_S, "for A")
            assert "B" in a.room.remote_participants, (
                f"A joined after B but its SDK lists remote participants {list(a.room.remote_participants)}"
            )

            apub = await a.publish_audio(FREQ)
            vpub = await a.publish_video(W, H, FPS, simulcast=True)

            await b.events.wait_for("track_subscribed", _pub_sid(apub.sid), EVENT_TIMEOUT_S, f"for A's audio {apub.sid}")
            await b.events.wait_for("track_subscribed", _pub_sid(vpub.sid), EVENT_TIMEOUT_S, f"for A's video {vpub.sid}")

            await asyncio.gather(
                _wait_video(b, vpub.sid, "A"),
                _wait_audio(b, apub.sid, "A", need_freq=True),
            )

            v = b.probe.video[vpub.sid]
            au = b.probe.audio[apub.sid]
            record_property("received_video_size", f"{v.width}x{v.height}")
            record_property("received_video_sizes", str(sorted(v.sizes)))
            record_property("received_audio_peak_hz", au.peak_hz)
            print(f"B received: {v.describe()}; {au.describe()}")

            _check_aspect(v.width, v.height, W, H, "B")
            assert au.sample_rate == SAMPLE_RATE, f"B: audio stream sample rate {au.sample_rate}"
            assert abs(au.peak_hz - FREQ) <= FREQ_TOLERANCE_HZ, (
                f"B: A's audio should be a {FREQ:.0f} Hz sine, dominant frequency is {au.peak_hz:.0f} Hz"
            )
            if v.chroma is not None:
                u, vv = v.chroma
                eu, ev = a.video_chroma
                assert abs(u - eu) < CHROMA_TOLERANCE and abs(vv - ev) < CHROMA_TOLERANCE, (
                    f"B: A's video colour (U,V)=({u:.0f},{vv:.0f}), published ({eu},{ev})"
                )

            # What B's SDK shows about A's publications.
            ra = b.room.remote_participants.get("A")
            assert ra is not None, f"B does not list A among remote participants: {list(b.room.remote_participants)}"
            rv = ra.track_publications.get(vpub.sid)
            rau = ra.track_publications.get(apub.sid)
            assert rv is not None and rau is not None, (
                f"B's view of A's publications {list(ra.track_publications)} lacks {vpub.sid} / {apub.sid}"
            )
            assert rv.kind == rtc.TrackKind.KIND_VIDEO, f"video publication kind {rtc.TrackKind.Name(rv.kind)}"
            assert rv.source == rtc.TrackSource.SOURCE_CAMERA, f"video source {rtc.TrackSource.Name(rv.source)}"
            assert rau.kind == rtc.TrackKind.KIND_AUDIO, f"audio publication kind {rtc.TrackKind.Name(rau.kind)}"
            assert rau.source == rtc.TrackSource.SOURCE_MICROPHONE, f"audio source {rtc.TrackSource.Name(rau.source)}"
            assert rv.simulcasted, "B should see A's camera publication as simulcast (TrackInfo.simulcast)"
            assert not rau.muted and not rv.muted, "freshly published tracks must not be muted"

    run(scenario, timeout=60)


# --------------------------------------------------------------------------- b


def test_two_party_mute_unpublish_leave(server, pc_mode):
    """A publishes before B joins; B sees A's mute/unmute, unpublish and departure."""
    room = unique_room("lifecycle")

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))

            await a.connect(server.url, server.token("A", room), **pc_mode)
            apub = await a.publish_audio(440.0)
            vpub = await a.publish_video(640, 360, 15, simulcast=True)

            # B joins late: A and both tracks come with the join.
            await b.connect(server.url, server.token("B", room), **pc_mode)
            await b.events.wait_for("track_subscribed", _pub_sid(apub.sid), EVENT_TIMEOUT_S, f"for A's audio {apub.sid}")
            await b.events.wait_for("track_subscribed", _pub_sid(vpub.sid), EVENT_TIMEOUT_S, f"for A's video {vpub.sid}")
            await asyncio.gather(
                _wait_audio(b, apub.sid, "A", need_freq=False),
                _wait_video(b, vpub.sid, "A"),
            )

            # Mute / unmute the microphone.
            a.audio_track.mute()
            ev = await b.events.wait_for("track_muted", _participant_pub(apub.sid), EVENT_TIMEOUT_S, f"for A's audio {apub.sid}")
            participant, publication = ev.args
            assert participant.identity == "A", f"track_muted names {participant.identity}, expected A"
            assert publication.muted, "B's publication for A's audio should report muted=True after track_muted"

            a.audio_track.unmute()
            await b.events.wait_for("track_unmuted", _participant_pub(apub.sid), EVENT_TIMEOUT_S, f"for A's audio {apub.sid}")
            assert not b.room.remote_participants["A"].track_publications[apub.sid].muted, (
                "B's publication for A's audio should report muted=False after track_unmuted"
            )

            # Unpublish the camera.
            try:
                await asyncio.wait_for(a.room.local_participant.unpublish_track(vpub.sid), EVENT_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise AssertionError(f"A: unpublish_track({vpub.sid}) did not finish within {EVENT_TIMEOUT_S:.0f}s") from None
            await b.events.wait_for("track_unpublished", _pub_sid(vpub.sid), EVENT_TIMEOUT_S, f"for A's video {vpub.sid}")
            ra = b.room.remote_participants.get("A")
            assert ra is not None and vpub.sid not in ra.track_publications, (
                f"B still lists A's unpublished video {vpub.sid}"
            )
            assert apub.sid in ra.track_publications, "A's audio must survive unpublishing the video"

            # A leaves.
            a.stop_feeders()
            await a.disconnect()
            ev = await b.events.wait_for("participant_disconnected", _is("A"), EVENT_TIMEOUT_S, "for A")
            assert "A" not in b.room.remote_participants, (
                f"B still lists A after participant_disconnected: {list(b.room.remote_participants)}"
            )
            assert b.room.connection_state == rtc.ConnectionState.CONN_CONNECTED, (
                "B must stay connected when A leaves"
            )

    run(scenario, timeout=60)


# --------------------------------------------------------------------------- c


PARTY = [
    # identity, sine Hz, chroma (U, V)
    ("P0", 330.0, (60, 60)),
    ("P1", 470.0, (60, 196)),
    ("P2", 610.0, (196, 60)),
    ("P3", 790.0, (196, 196)),
]


def test_four_party_full_mesh(server, pc_mode, record_property):
    """4 participants each publish audio + video; each receives all 3 others (12 + 12 tracks)."""
    room = unique_room("four-party")
    W, H, FPS = 320, 180, 15

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            clients: list[Client] = []
            for ident, freq, chroma in PARTY:
                c = await stack.enter_async_context(Client(ident))
                await c.connect(server.url, server.token(ident, room), **pc_mode)
                await c.publish_audio(freq)
                await c.publish_video(W, H, FPS, simulcast=False, chroma=chroma)
                clients.append(c)

            # Subscriptions: every receiver subscribes to every other publisher's two tracks.
            waits = []
            for rx in clients:
                for tx in clients:
                    if tx is rx:
                        continue
                    waits.append(rx.events.wait_for(
                        "track_subscribed", _pub_sid(tx.audio_pub.sid), 15, f"for {tx.identity}'s audio"))
                    waits.append(rx.events.wait_for(
                        "track_subscribed", _pub_sid(tx.video_pub.sid), 15, f"for {tx.identity}'s video"))
            await asyncio.gather(*waits)

            # Media: decoded frames and non-silent audio on all 24 remote tracks.
            def matrix() -> list[tuple[str, str, str, bool, str]]:
                rows = []
                for rx in clients:
                    for tx in clients:
                        if tx is rx:
                            continue
                        v = rx.probe.video.get(tx.video_pub.sid)
                        a = rx.probe.audio.get(tx.audio_pub.sid)
                        v_ok = v is not None and v.frames >= MIN_VIDEO_FRAMES and v.chroma is not None
                        a_ok = a is not None and a.loud_seconds() >= MIN_LOUD_AUDIO_S and a.peak_hz is not None
                        rows.append((rx.identity, tx.identity, "video", v_ok, v.describe() if v else "not subscribed"))
                        rows.append((rx.identity, tx.identity, "audio", a_ok, a.describe() if a else "not subscribed"))
                return rows

            def report() -> str:
                bad = [r for r in matrix() if not r[3]]
                return f"{len(bad)} of 24 remote tracks lack media:\n  " + "\n  ".join(
                    f"{rx} <- {tx} {kind}: {d}" for rx, tx, kind, _, d in bad
                )

            await wait_until(lambda: all(r[3] for r in matrix()), 20, report)

            # Each stream carries the right publisher's media.
            wrong = []
            for rx in clients:
                assert len(rx.probe.video) == 3 and len(rx.probe.audio) == 3, (
                    f"{rx.identity} subscribed to {len(rx.probe.video)} video / {len(rx.probe.audio)} audio tracks, expected 3 + 3"
                )
                for tx in clients:
                    if tx is rx:
                        continue
                    a = rx.probe.audio[tx.audio_pub.sid]
                    v = rx.probe.video[tx.video_pub.sid]
                    if abs(a.peak_hz - tx.audio_freq) > FREQ_TOLERANCE_HZ:
                        wrong.append(f"{rx.identity} <- {tx.identity} audio: {a.peak_hz:.0f} Hz, sent {tx.audio_freq:.0f} Hz")
                    u, vv = v.chroma
                    eu, ev = tx.video_chroma
                    if abs(u - eu) >= CHROMA_TOLERANCE or abs(vv - ev) >= CHROMA_TOLERANCE:
                        wrong.append(f"{rx.identity} <- {tx.identity} video: colour ({u:.0f},{vv:.0f}), sent ({eu},{ev})")
                    try:
                        _check_aspect(v.width, v.height, W, H, f"{rx.identity} <- {tx.identity}")
                    except AssertionError as e:
                        wrong.append(str(e))
            assert not wrong, "media reached the wrong subscriber or was mangled:\n  " + "\n  ".join(wrong)

            # Cost, for the record (never asserted: these machines are noisy).
            cpu0, fwd0 = server.cpu_seconds(), server.metric("rtp_packets_forwarded_total")
            await asyncio.sleep(5)
            cpu1, fwd1 = server.cpu_seconds(), server.metric("rtp_packets_forwarded_total")
            assert fwd1 > fwd0, "packets must keep flowing while the call lasts"
            us = (cpu1 - cpu0) * 1e6 / (fwd1 - fwd0)
            line = (f"4-party room ({pc_mode}): {fwd1 - fwd0:.0f} packets forwarded in 5 s, "
                    f"server CPU {cpu1 - cpu0:.2f} s = {us:.1f} us/packet, peak RSS {server.peak_rss_kib()} KiB")
            print(line)
            record_property("cost", line)

    run(scenario, timeout=60)
