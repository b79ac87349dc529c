"""Media behaviour seen by real LiveKit clients: simulcast layer choice per
subscriber, active speakers, NACK/RTX under real packet loss, garbage on the
media port, and a second join with the same identity.

Runs inside the namespace run.sh makes (see conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import subprocess
import time
import urllib.request

import pytest
from livekit import rtc

from moselle_helpers import Client, run, unique_room, wait_until

from test_call import _is, _pub_sid, _wait_audio, _wait_video

EVENT_TIMEOUT_S = 10.0
HOST = os.environ.get("MOSELLE_TEST_IP", "127.0.0.1")


async def frames_after(st, seconds: float) -> int:
    start = st.frames
    await asyncio.sleep(seconds)
    return st.frames - start


async def frames_decoded(pub) -> int:
    """What the subscriber's decoder did (libwebrtc's own count): unlike the
    Python frame stream, it does not depend on how busy the test process is."""
    for s in await pub.track.get_stats():
        if s.WhichOneof("stats") == "inbound_rtp":
            return s.inbound_rtp.inbound.frames_decoded
    return 0


async def sender_diag(sender) -> str:
    """What the publisher's own encoder says of each layer: its size, its
    target bitrate and why libwebrtc limits it (cpu, bandwidth), with the
    estimate of its uplink; tells a publisher held back from slow forwarding."""
    if sender is None:
        return ""
    parts, avail = [], None
    for x in await sender.track.get_stats():
        kind = x.WhichOneof("stats")
        if kind == "outbound_rtp":
            o = x.outbound_rtp.outbound
            reason = rtc.stats.QualityLimitationReason.Name(o.quality_limitation_reason)
            parts.append(f"{o.rid or '-'}: {o.frame_width}x{o.frame_height} target {o.target_bitrate / 1000:.0f} kbit/s "
                         f"limited by {reason}")
        elif kind == "candidate_pair" and x.candidate_pair.candidate_pair.nominated:
            avail = x.candidate_pair.candidate_pair.available_outgoing_bitrate
    est = f"; uplink estimate {avail / 1000:.0f} kbit/s" if avail else ""
    return f" (publisher: {'; '.join(sorted(parts))}{est})"


async def wait_sender_size(sender, size: tuple[int, int], timeout: float = 20.0) -> None:
    """Wait until the publisher's own encoder sends a layer of `size`: how
    soon it does is libwebrtc's (its CPU and uplink estimate), not ours."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for x in await sender.track.get_stats():
            if x.WhichOneof("stats") == "outbound_rtp":
                o = x.outbound_rtp.outbound
                if (o.frame_width, o.frame_height) == size and x.outbound_rtp.sent.packets_sent > 0:
                    return
        await asyncio.sleep(0.2)
    raise AssertionError(f"the publisher never encoded a {size[0]}x{size[1]} layer within {timeout:.0f}s"
                         f"{await sender_diag(sender)}")


async def wait_size(st, size: tuple[int, int], who: str, timeout: float = 10.0, pub=None, peer=None,
                    sender=None) -> None:
    """Wait until the last decoded frame has `size`, then for a 2 s window
    in which at least 5 more are decoded. The first window after a switch
    can fall short for reasons outside the server (a loaded machine, an
    encoder still ramping a layer up), so windows repeat for `timeout`; a
    stall that lasts still fails. `peer`: another subscriber's publication
    of the same track, counted over the same window, so a failure tells a
    slow publisher from slow forwarding."""
    try:
        await wait_until(
            lambda: (st.width, st.height) == size,
            timeout,
            lambda: f"{who}: expected decoded frames of {size[0]}x{size[1]} within {timeout:.0f}s; got {st.describe()}",
        )
    except AssertionError as e:
        raise AssertionError(f"{e}{await sender_diag(sender)}") from None
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        p0 = await frames_decoded(peer) if peer is not None else 0
        if pub is not None:
            d0 = await frames_decoded(pub)
            await asyncio.sleep(2.0)
            n = await frames_decoded(pub) - d0
        else:
            n = await frames_after(st, 2.0)
        if (n >= 5 and (st.width, st.height) == size) or asyncio.get_running_loop().time() > deadline:
            break
    diag = ""
    if peer is not None:
        diag += f" (the other subscriber decoded {await frames_decoded(peer) - p0} in the same 2 s)"
    if pub is not None:
        for x in await pub.track.get_stats():
            if x.WhichOneof("stats") == "inbound_rtp":
                i = x.inbound_rtp.inbound
                diag += (f" (decoder: decoded {i.frames_decoded}, received {i.frames_received}, dropped {i.frames_dropped}, "
                        f"keyframes {i.key_frames_decoded}, freezes {i.freeze_count}, PLIs {i.pli_count}, "
                        f"NACKs {i.nack_count}, lost {x.inbound_rtp.received.packets_lost}, {i.frame_width}x{i.frame_height})")
    assert n >= 5 and (st.width, st.height) == size, (
        f"{who}: after switching to {size}, {n} frames decoded in the last 2 s of {timeout:.0f}, "
        f"last {st.width}x{st.height}{diag}"
    )


@pytest.fixture(params=[True, False], ids=["single_pc", "dual_pc"])
def pc_mode(request):
    return {"single_peer_connection": request.param}


def test_simulcast_layer_per_subscriber(server, pc_mode):
    """B asks for low, medium, high in turn; C keeps high all along. (960x540
    keeps three encoders and two decoders within these 2 cores.)"""
    room = unique_room("simulcast")
    W, H = 960, 540

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            c = await stack.enter_async_context(Client("C"))
            await a.connect(server.url, server.token("A", room), **pc_mode)
            vpub = await a.publish_video(W, H, 20, simulcast=True)
            await b.connect(server.url, server.token("B", room), **pc_mode)
            await c.connect(server.url, server.token("C", room), **pc_mode)
            for x in (b, c):
                await x.events.wait_for("track_subscribed", _pub_sid(vpub.sid), EVENT_TIMEOUT_S, "A's video")
            await asyncio.gather(_wait_video(b, vpub.sid, "A"), _wait_video(c, vpub.sid, "A"))
            bst, cst = b.probe.video[vpub.sid], c.probe.video[vpub.sid]
            bpub = b.room.remote_participants["A"].track_publications[vpub.sid]
            cpub = c.room.remote_participants["A"].track_publications[vpub.sid]
            await wait_sender_size(vpub, (W, H))
            await wait_size(bst, (W, H), "B (default: top layer)", pub=bpub, peer=cpub, sender=vpub)

            sizes = {}
            for q, name in ((rtc.VideoQuality.VIDEO_QUALITY_LOW, "LOW"), (rtc.VideoQuality.VIDEO_QUALITY_MEDIUM, "MEDIUM")):
                bpub.set_video_quality(q)
                prev = (bst.width, bst.height)
                await wait_until(
                    lambda: (bst.width, bst.height) != prev and 0 < bst.width < W,
                    10.0,
                    lambda: f"B after {name}: expected a smaller layer than {prev}; got {bst.describe()}",
                )
                sizes[name] = (bst.width, bst.height)
                await wait_size(bst, sizes[name], f"B after {name}", pub=bpub, peer=cpub)
                assert (cst.width, cst.height) == (W, H), f"C must keep the top layer: {cst.describe()}"
            assert sizes["LOW"][0] < sizes["MEDIUM"][0] < W, f"layers must grow LOW < MEDIUM < HIGH: {sizes}"
            for w, h in sizes.values():
                assert abs(w / h - W / H) < 0.05, f"layer {w}x{h} lost the aspect ratio"
            bpub.set_video_quality(rtc.VideoQuality.VIDEO_QUALITY_HIGH)
            await wait_size(bst, (W, H), "B after HIGH", pub=bpub, peer=cpub)
            assert (cst.width, cst.height) == (W, H), f"C must keep the top layer: {cst.describe()}"
            assert bst.error is None and cst.error is None, (bst.describe(), cst.describe())

    run(scenario, timeout=90)


def test_unsubscribe_and_resubscribe(server, pc_mode):
    """B drops A's video (UpdateSubscription) and takes it again: the m-line
    is released and reused, and frames flow again."""
    room = unique_room("resub")

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            await a.connect(server.url, server.token("A", room), **pc_mode)
            await b.connect(server.url, server.token("B", room), **pc_mode)
            vpub = await a.publish_video(640, 360, 15, simulcast=False)
            apub = await a.publish_audio(440.0)
            await b.events.wait_for("track_subscribed", _pub_sid(vpub.sid), EVENT_TIMEOUT_S, "A's video")
            await _wait_video(b, vpub.sid, "A")
            rpub = b.room.remote_participants["A"].track_publications[vpub.sid]
            for round_ in range(2):
                mark = b.events.mark()
                rpub.set_subscribed(False)
                await b.events.wait_for("track_unsubscribed", _pub_sid(vpub.sid), EVENT_TIMEOUT_S,
                                        f"A's video unsubscribed (round {round_})", since=mark)
                await asyncio.sleep(1.0)
                mark = b.events.mark()
                rpub.set_subscribed(True)
                await b.events.wait_for("track_subscribed", _pub_sid(vpub.sid), EVENT_TIMEOUT_S,
                                        f"A's video subscribed again (round {round_})", since=mark)
                await wait_until(
                    lambda: b.probe.video[vpub.sid].frames >= 10,
                    EVENT_TIMEOUT_S,
                    lambda: f"B: no video after re-subscribing (round {round_}): {b.probe.video[vpub.sid].describe()}",
                )
            # Audio was never touched and still plays.
            await _wait_audio(b, apub.sid, "A", need_freq=False)

    run(scenario, timeout=90)


def test_new_publishers_on_reused_lines(server):
    """A (one peer connection) stays while publishers come and go one after the other: each
    new camera is sent on the m-line the last one left, so on the same SSRC towards A, and A
    must decode it. The new publisher's sequence numbers and timestamps start anywhere; if
    they are not made to continue the line's, A's libwebrtc drops every frame whose timestamp
    is behind the last it decoded (half of all cases: this froze the call in the UDP-to-TCP
    fallback). Dual PC never reuses a line, so single PC only."""
    room = unique_room("reuse")
    rounds = 4

    async def inbound_video_lines(c: Client) -> set[tuple[str, int]]:
        st = await c.room.get_rtc_stats()
        return {(s.inbound_rtp.inbound.mid, s.inbound_rtp.stream.ssrc)
                for s in [*st.publisher_stats, *st.subscriber_stats]
                if s.WhichOneof("stats") == "inbound_rtp" and s.inbound_rtp.stream.kind == "video"}

    async def scenario():
        async with Client("A") as a:
            await a.connect(server.url, server.token("A", room), single_peer_connection=True)
            seen: list[set[tuple[str, int]]] = []
            for i in range(rounds):
                who = f"P{i}"
                async with Client(who) as p:
                    await p.connect(server.url, server.token(who, room), single_peer_connection=True)
                    vpub = await p.publish_video(320, 180, 20, simulcast=False, chroma=(40 + 50 * i, 200))
                    await a.events.wait_for("track_subscribed", _pub_sid(vpub.sid), EVENT_TIMEOUT_S, f"{who}'s video")
                    await _wait_video(a, vpub.sid, who)
                    seen.append(await inbound_video_lines(a))
                    mark = a.events.mark()
                    await p.disconnect()
                    await a.events.wait_for("participant_disconnected", lambda q, *_: q.identity == who,
                                            EVENT_TIMEOUT_S, f"{who} gone", since=mark)
            # The point of the test: lines were reused (fewer lines than publishers, one SSRC each).
            lines = set().union(*seen)
            assert len({mid for mid, _ in lines}) < rounds, f"no m-line was reused: {seen}"

    run(scenario, timeout=150)


def test_single_and_dual_pc_clients_in_one_room(server):
    """A on /rtc/v1 (one connection), B on /rtc (two): each gets the other's media."""
    room = unique_room("mixed")

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            await a.connect(server.url, server.token("A", room), single_peer_connection=True)
            await b.connect(server.url, server.token("B", room), single_peer_connection=False)
            av = await a.publish_video(640, 360, 15, simulcast=True)
            aa = await a.publish_audio(440.0)
            bv = await b.publish_video(640, 360, 15, simulcast=True, chroma=(200, 60))
            ba = await b.publish_audio(660.0)
            for rx, pubs, tx in ((b, (av, aa), "A"), (a, (bv, ba), "B")):
                for p in pubs:
                    await rx.events.wait_for("track_subscribed", _pub_sid(p.sid), EVENT_TIMEOUT_S, f"{tx}'s {p.sid}")
            await asyncio.gather(
                _wait_video(b, av.sid, "A"), _wait_audio(b, aa.sid, "A", need_freq=True),
                _wait_video(a, bv.sid, "B"), _wait_audio(a, ba.sid, "B", need_freq=True),
            )
            assert abs(b.probe.audio[aa.sid].peak_hz - 440) < 15 and abs(a.probe.audio[ba.sid].peak_hz - 660) < 15

    run(scenario, timeout=60)


@pytest.mark.parametrize("codec", ["H264", "VP8"])
def test_video_codecs(server, codec):
    """H.264 and VP8 publications both reach the subscriber decoded, with
    the mime type in TrackInfo; layer switching works on both."""
    room = unique_room(f"codec-{codec.lower()}")

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            await a.connect(server.url, server.token("A", room))
            await b.connect(server.url, server.token("B", room))
            vpub = await a.publish_video(960, 540, 15, simulcast=True, codec=getattr(rtc.VideoCodec, codec))
            await b.events.wait_for("track_subscribed", _pub_sid(vpub.sid), EVENT_TIMEOUT_S, "A's video")
            await _wait_video(b, vpub.sid, "A")
            rpub = b.room.remote_participants["A"].track_publications[vpub.sid]
            assert rpub.mime_type.lower() == f"video/{codec.lower()}", f"TrackInfo mime type {rpub.mime_type!r}"
            st = b.probe.video[vpub.sid]
            rpub.set_video_quality(rtc.VideoQuality.VIDEO_QUALITY_LOW)
            # The SDK picks the low layer's size (320x180 for a 960x540 source).
            await wait_until(
                lambda: 0 < st.width < 960 and abs(st.width / st.height - 16 / 9) < 0.05,
                10.0,
                lambda: f"B after LOW ({codec}): expected a smaller 16:9 layer; got {st.describe()}",
            )
            low = (st.width, st.height)
            await wait_size(st, low, f"B after LOW ({codec})", pub=rpub)
            rpub.set_video_quality(rtc.VideoQuality.VIDEO_QUALITY_HIGH)
            await wait_size(st, (960, 540), f"B after HIGH ({codec})", pub=rpub)

    run(scenario, timeout=60)


async def encoded_by_width(client: Client) -> dict[int, int]:
    """frames_encoded per simulcast encoding, keyed by its frame width."""
    out = {}
    for s in await client.video_track.get_stats():
        if s.WhichOneof("stats") == "outbound_rtp":
            o = s.outbound_rtp.outbound
            out[o.frame_width] = max(out.get(o.frame_width, 0), o.frames_encoded)
    return out


def test_dynacast_pauses_unwanted_layers(server):
    """With dynacast on, the publisher stops encoding layers nobody wants
    (after the 5 s grace) and starts them again when someone does."""
    room = unique_room("dynacast")
    W, H = 960, 540

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            await a.connect(server.url, server.token("A", room), dynacast=True)
            vpub = await a.publish_video(W, H, 15, simulcast=True)
            await b.connect(server.url, server.token("B", room))
            await b.events.wait_for("track_subscribed", _pub_sid(vpub.sid), EVENT_TIMEOUT_S, "A's video")
            await _wait_video(b, vpub.sid, "A")
            b.room.remote_participants["A"].track_publications[vpub.sid].set_video_quality(
                rtc.VideoQuality.VIDEO_QUALITY_LOW)

            async def growth(seconds: float) -> dict[int, int]:
                e0 = await encoded_by_width(a)
                await asyncio.sleep(seconds)
                e1 = await encoded_by_width(a)
                return {w: e1.get(w, 0) - e0.get(w, 0) for w in e1}

            # After the grace period only the lowest layer is still encoded.
            await asyncio.sleep(7)
            g = await growth(2)
            top, low = max(g), min(g)
            print(f"dynacast, B wants LOW: frames encoded per layer in 2 s: {g}")
            assert g[low] >= 10, f"the wanted low layer must keep going: {g}"
            assert g[top] == 0, f"nobody wants the top layer, the publisher must pause it: {g}"

            # B asks for the top layer again: it comes back (the publisher's
            # bandwidth estimate may need a few seconds to carry it again).
            b.room.remote_participants["A"].track_publications[vpub.sid].set_video_quality(
                rtc.VideoQuality.VIDEO_QUALITY_HIGH)
            st = b.probe.video[vpub.sid]
            await wait_until(lambda: (st.width, st.height) == (W, H), 10,
                             lambda: f"B after HIGH with dynacast: {st.describe()}")
            start = st.frames
            await wait_until(lambda: st.frames - start >= 10 and (st.width, st.height) == (W, H), 15,
                             lambda: f"B should keep decoding the top layer: {st.describe()}")
            g = await growth(2)
            print(f"dynacast, B wants HIGH: {g}")
            assert g[max(g)] > 0, f"the top layer must be encoded again: {g}"

    run(scenario, timeout=60)


def test_active_speakers(server):
    """A plays a loud tone, B sends silence: B's SDK reports A speaking, not B."""
    room = unique_room("speakers")

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            await a.connect(server.url, server.token("A", room))
            await b.connect(server.url, server.token("B", room))
            await a.publish_audio(440.0)
            await b.publish_audio(440.0, amplitude=0)

            def a_speaking(speakers) -> bool:
                ids = [p.identity for p in speakers]
                return "A" in ids and "B" not in ids

            ev = await b.events.wait_for("active_speakers_changed", a_speaking, EVENT_TIMEOUT_S, "A speaking")
            assert ev is not None
            a.stop_feeders()

            # A goes quiet: A drops out of the list.
            await b.events.wait_for(
                "active_speakers_changed",
                lambda speakers: all(p.identity != "A" for p in speakers),
                EVENT_TIMEOUT_S,
                "A no longer speaking",
            )

    run(scenario, timeout=60)


def test_late_joiner_learns_who_is_speaking(server):
    """Speaker updates are deltas. C joins while A keeps talking at a steady
    level and publishes nothing itself: nothing changes after C's join, yet
    C's SDK must still report A speaking (the server tells a newcomer who
    speaks now)."""
    room = unique_room("late-speaker")

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            await a.connect(server.url, server.token("A", room))
            await b.connect(server.url, server.token("B", room))
            await a.publish_audio(440.0)
            await b.events.wait_for(
                "active_speakers_changed",
                lambda speakers: [p.identity for p in speakers] == ["A"],
                EVENT_TIMEOUT_S,
                "A speaking, seen by B",
            )
            # Let the level settle so no further delta is due.
            await asyncio.sleep(2.0)
            c = await stack.enter_async_context(Client("C"))
            await c.connect(server.url, server.token("C", room))
            await c.events.wait_for(
                "active_speakers_changed",
                lambda speakers: [p.identity for p in speakers] == ["A"],
                EVENT_TIMEOUT_S,
                "A speaking, seen by C who joined late",
            )

    run(scenario, timeout=60)


def _nft(*args: str) -> None:
    subprocess.run(["nft", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def packet_loss(udp_port: int, percent: int):
    """Drop `percent`% of datagrams to and from the server's media port, in
    the kernel's input path (the sender sees nothing): real loss, not a mock."""
    table = f"moselle_loss_{os.getpid()}"
    _nft("add", "table", "inet", table)
    try:
        _nft("add", "chain", "inet", table, "in", "{ type filter hook input priority 0; }")
        for side in ("sport", "dport"):
            _nft("add", "rule", "inet", table, "in", "udp", side, str(udp_port),
                 "numgen", "random", "mod", "100", "<", str(percent), "drop")
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)


async def inbound_video(client: Client, sid: str):
    track = client.room.remote_participants["A"].track_publications[sid].track
    for s in await track.get_stats():
        if s.WhichOneof("stats") == "inbound_rtp":
            return s.inbound_rtp.inbound
    raise AssertionError(f"{client.identity}: no inbound-rtp stats for {sid}")


async def outbound_video(client: Client):
    total = 0
    for s in await client.video_track.get_stats():
        if s.WhichOneof("stats") == "outbound_rtp":
            total += s.outbound_rtp.outbound.nack_count
    return total


def test_nack_rtx_under_loss(server):
    """5% loss each way on the media port: the subscriber NACKs, the server
    answers from its retransmission buffer, and video keeps decoding."""
    room = unique_room("loss")
    FPS, SECONDS = 20, 8

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            await a.connect(server.url, server.token("A", room))
            await b.connect(server.url, server.token("B", room))
            vpub = await a.publish_video(640, 360, FPS, simulcast=False)
            await b.events.wait_for("track_subscribed", _pub_sid(vpub.sid), EVENT_TIMEOUT_S, "A's video")
            await _wait_video(b, vpub.sid, "A")
            st = b.probe.video[vpub.sid]
            before = await inbound_video(b, vpub.sid)
            up_before = await outbound_video(a)
            with packet_loss(server.udp_port, 5):
                decoded = await frames_after(st, SECONDS)
            after = await inbound_video(b, vpub.sid)
            up_after = await outbound_video(a)
            nacks = after.nack_count - before.nack_count
            rtx = after.retransmitted_packets_received - before.retransmitted_packets_received
            print(f"under 5% loss: {decoded} frames in {SECONDS}s, B sent {nacks} NACKs, got {rtx} retransmissions, "
                  f"A answered {up_after - up_before} NACKs from the server")
            assert nacks > 0, "B's libwebrtc should have sent NACKs under 5% loss"
            assert rtx > 0, f"B sent {nacks} NACKs but received no retransmission from the server"
            assert up_after - up_before > 0, "the server should NACK A's lost packets upstream"
            assert decoded >= 0.7 * FPS * SECONDS, (
                f"video should keep decoding under 5% loss with NACK/RTX: {decoded} frames in {SECONDS}s at {FPS} fps"
            )

    run(scenario, timeout=60)


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 1500))
    if kind == 1:  # STUN binding request with a random USERNAME
        user = f"{rng.getrandbits(32):08x}:{rng.getrandbits(32):08x}".encode()
        attr = struct.pack("!HH", 0x0006, len(user)) + user + b"\0" * (-len(user) % 4)
        return struct.pack("!HHI", 0x0001, len(attr), 0x2112A442) + rng.randbytes(12) + attr
    if kind == 2:  # truncated STUN header
        return struct.pack("!HHI", 0x0001, 400, 0x2112A442)[: rng.randrange(1, 8)]
    # RTP-looking: version 2, random PT/SSRC, junk payload
    return bytes([0x80, rng.randrange(96, 128)]) + rng.randbytes(rng.randrange(10, 1200))


def test_garbage_on_media_port_harms_nobody(server):
    """5000 malformed datagrams during a call: dropped and counted; the call goes on."""
    room = unique_room("garbage")

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            await a.connect(server.url, server.token("A", room))
            await b.connect(server.url, server.token("B", room))
            vpub = await a.publish_video(640, 360, 20, simulcast=False)
            apub = await a.publish_audio(440.0)
            await b.events.wait_for("track_subscribed", _pub_sid(vpub.sid), EVENT_TIMEOUT_S, "A's video")
            await _wait_video(b, vpub.sid, "A")
            st = b.probe.video[vpub.sid]
            dropped_before = server.metric("udp_unroutable_total") + server.metric("udp_rejected_total")

            rng = random.Random(7)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sent = 0
            frames_start = st.frames
            for _ in range(50):
                for _ in range(100):
                    sock.sendto(_garbage(rng), (HOST, server.udp_port))
                    sent += 1
                await asyncio.sleep(0.02)
            sock.close()
            n = await frames_after(st, 2.0)
            during = st.frames - frames_start
            dropped = server.metric("udp_unroutable_total") + server.metric("udp_rejected_total") - dropped_before
            print(f"sent {sent} garbage datagrams; server counted {dropped:.0f} dropped; B decoded {during} frames")
            assert dropped >= 0.9 * sent, f"server counted {dropped:.0f} of {sent} garbage datagrams as dropped"
            assert n >= 20, f"B's video stalled after the garbage: {n} frames in 2 s ({st.describe()})"
            await _wait_audio(b, apub.sid, "A", need_freq=False)
            health = urllib.request.urlopen(f"{server.http_url}/healthz", timeout=5).status
            assert health == 200

    run(scenario, timeout=60)


def test_same_identity_replaces_first_session(server):
    """A second join as A disconnects the first (DUPLICATE_IDENTITY); B keeps one A."""
    room = unique_room("dup")

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a1 = await stack.enter_async_context(Client("A"))
            a2 = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            await b.connect(server.url, server.token("B", room))
            await a1.connect(server.url, server.token("A", room))
            await b.events.wait_for("participant_connected", _is("A"), EVENT_TIMEOUT_S, "first A")
            first_sid = b.room.remote_participants["A"].sid
            await a2.connect(server.url, server.token("A", room))
            ev = await a1.events.wait_for("disconnected", lambda *a: True, EVENT_TIMEOUT_S, "first A replaced")
            reason = ev.args[0] if ev.args else None
            assert reason == rtc.DisconnectReason.DUPLICATE_IDENTITY, f"first A disconnected with {reason!r}"
            await wait_until(
                lambda: "A" in b.room.remote_participants and b.room.remote_participants["A"].sid != first_sid,
                EVENT_TIMEOUT_S,
                lambda: f"B should see the new A session; sees {list(b.room.remote_participants)}",
            )
            apub = await a2.publish_audio(440.0)
            await b.events.wait_for("track_subscribed", _pub_sid(apub.sid), EVENT_TIMEOUT_S, "new A's audio")
            await _wait_audio(b, apub.sid, "A", need_freq=False)

    run(scenario, timeout=60)
