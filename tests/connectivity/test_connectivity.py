"""Connectivity: real LiveKit Python SDK clients whose network blocks UDP still get a call
through Moselle (ICE over TCP), and UDP keeps priority where it is allowed.

Runs in tests/netlab.sh's lab: pytest and its clients in the client namespace (198.18.0.2),
the server in the server namespace (198.18.0.1); UDP is blocked by nftables on the client's
output or silently on the bridge between them (netlab.py).

    tests/netlab.sh .venv/bin/pytest tests/connectivity -q
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from livekit import rtc

from netlab import Firewall, lab, start_lab_server, stop_moselle

from moselle_helpers import Client, run, unique_room, wait_until

CONNECT_TIMEOUT_S = 15.0
# The SDK's connect() gives up by itself after about 60 s (three ICE attempts). It must not
# be abandoned before that: its late result would make the FFI SIGTERM this process.
SDK_CONNECT_GIVE_UP_S = 75.0
EVENT_TIMEOUT_S = 15.0
MEDIA_TIMEOUT_S = 15.0
MIN_VIDEO_FRAMES = 10
MIN_LOUD_AUDIO_S = 0.5
W, H, FPS = 640, 360, 20


@pytest.fixture(scope="module")
def the_lab():
    return lab()


@pytest.fixture(scope="module")
def server(the_lab, tmp_path_factory):
    srv = start_lab_server(tmp_path_factory.mktemp("moselle-lab"), the_lab)
    yield srv
    stop_moselle(srv)


@pytest.fixture(params=[True, False], ids=["single_pc", "dual_pc"])
def pc_mode(request):
    return {"single_peer_connection": request.param}


# --------------------------------------------------------------------------- ICE stats


def selected_pairs(stats: list[rtc.stats.RtcStats]) -> list[dict]:
    """The selected candidate pair of each transport in one peer connection's stats: the
    transport's selectedCandidatePairId, else a succeeded + nominated pair."""
    pairs, local, remote, transports = {}, {}, {}, []
    for s in stats:
        kind = s.WhichOneof("stats")
        if kind == "candidate_pair":
            pairs[s.candidate_pair.rtc.id] = s.candidate_pair.candidate_pair
        elif kind == "local_candidate":
            local[s.local_candidate.rtc.id] = s.local_candidate.candidate
        elif kind == "remote_candidate":
            remote[s.remote_candidate.rtc.id] = s.remote_candidate.candidate
        elif kind == "transport":
            transports.append(s.transport.transport)
    ids = [t.selected_candidate_pair_id for t in transports if t.selected_candidate_pair_id]
    if not ids:
        ids = [i for i, p in pairs.items() if p.nominated and p.state == rtc.stats.PAIR_SUCCEEDED]

    def cand(c) -> str:
        if c is None:
            return "?"
        return f"{c.protocol} {rtc.stats.IceCandidateType.Name(c.candidate_type).lower()} {c.address}:{c.port}"

    out = []
    for i in ids:
        p = pairs.get(i)
        if p is None:
            continue
        lc, rc = local.get(p.local_candidate_id), remote.get(p.remote_candidate_id)
        out.append({
            "local_protocol": lc.protocol if lc else "?",
            "remote_protocol": rc.protocol if rc else "?",
            "desc": f"{cand(lc)} -> {cand(rc)} ({rtc.stats.IceCandidatePairState.Name(p.state)}, "
                    f"nominated={p.nominated}, sent {p.bytes_sent} B, received {p.bytes_received} B)",
        })
    return out


async def pair_report(c: Client) -> dict[str, list[dict]]:
    st = await c.room.get_rtc_stats()
    return {"publisher": selected_pairs(st.publisher_stats), "subscriber": selected_pairs(st.subscriber_stats)}


# --------------------------------------------------------------------------- the call


async def _wait_media(rx: Client, tx: Client) -> None:
    v = rx.probe.video[tx.video_pub.sid]
    a = rx.probe.audio[tx.audio_pub.sid]
    await wait_until(
        lambda: v.frames >= MIN_VIDEO_FRAMES and a.loud_seconds() >= MIN_LOUD_AUDIO_S,
        MEDIA_TIMEOUT_S,
        lambda: f"{rx.identity} expected >= {MIN_VIDEO_FRAMES} decoded frames and >= {MIN_LOUD_AUDIO_S}s of "
        f"non-silent audio from {tx.identity}; got {v.describe()}; {a.describe()}",
    )


async def _connect(c: Client, server, room: str, pc_mode: dict) -> None:
    """Room.connect that fails the test after CONNECT_TIMEOUT_S, but only once the SDK
    has finished (given up) too."""
    opts = rtc.RoomOptions(auto_subscribe=True, **pc_mode)
    task = asyncio.ensure_future(c.room.connect(server.url, server.token(c.identity, room), opts))
    done, _ = await asyncio.wait({task}, timeout=CONNECT_TIMEOUT_S)
    if task in done:
        if task.exception() is not None:
            raise AssertionError(f"{c.identity}: Room.connect failed: {task.exception()!r}")
        return
    t0 = time.monotonic()
    await asyncio.wait({task}, timeout=SDK_CONNECT_GIVE_UP_S)
    late = (f"the SDK then gave up after {time.monotonic() - t0 + CONNECT_TIMEOUT_S:.0f}s with {task.exception()!r}"
            if task.done() and task.exception() is not None else
            f"the SDK connected {time.monotonic() - t0 + CONNECT_TIMEOUT_S:.0f}s after the call" if task.done() else
            f"the SDK was still trying after {SDK_CONNECT_GIVE_UP_S + CONNECT_TIMEOUT_S:.0f}s")
    raise AssertionError(f"{c.identity}: Room.connect did not finish within {CONNECT_TIMEOUT_S:.0f}s ({late})")


async def _join_and_publish(c: Client, server, room: str, chroma, freq, pc_mode) -> tuple[float, float]:
    """Connect and publish audio + video; returns when connect() was called and how long it took."""
    t0 = time.monotonic()
    await _connect(c, server, room, pc_mode)
    took = time.monotonic() - t0
    await c.publish_audio(freq)
    await c.publish_video(W, H, FPS, simulcast=False, chroma=chroma)
    return t0, took


def two_party_call(server, fw: Firewall, pc_mode: dict, expect_protocol: str) -> None:
    """A and B each publish audio + video and decode the other's; every peer connection's
    selected candidate pair must be `expect_protocol` on both ends."""
    case = fw.kind
    room = unique_room(case)
    result: dict = {}

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            a = await stack.enter_async_context(Client("A"))
            b = await stack.enter_async_context(Client("B"))
            (t0a, conn_a), (t0b, conn_b) = await asyncio.gather(
                _join_and_publish(a, server, room, (60, 196), 440.0, pc_mode),
                _join_and_publish(b, server, room, (196, 60), 660.0, pc_mode),
            )
            for rx, tx in ((a, b), (b, a)):
                for pub in (tx.audio_pub, tx.video_pub):
                    await rx.events.wait_for(
                        "track_subscribed", lambda t, p, *_: p.sid == pub.sid, EVENT_TIMEOUT_S,
                        f"for {tx.identity}'s {pub.sid}")
            await asyncio.gather(_wait_media(a, b), _wait_media(b, a))
            result["first_frame"] = {
                "A": a.probe.video[b.video_pub.sid].first_frame_at - t0a,
                "B": b.probe.video[a.video_pub.sid].first_frame_at - t0b,
            }
            result["connect"] = {"A": conn_a, "B": conn_b}
            result["pairs"] = {"A": await pair_report(a), "B": await pair_report(b)}

    t_start = time.monotonic()
    tcp_in0 = server.metric("tcp_frames_in_total")
    try:
        run(scenario, timeout=60 + SDK_CONNECT_GIVE_UP_S)
    except AssertionError as e:
        raise AssertionError(f"{case} ({pc_mode}): {e}\n{_context(server, fw)}") from None
    wall = time.monotonic() - t_start
    tcp_in = server.metric("tcp_frames_in_total") - tcp_in0

    lines = [f"{case} {pc_mode}: scenario {wall:.1f}s; firewall: {fw.report()}; "
             f"server: {tcp_in:.0f} ICE-TCP frames in"]
    wrong = []
    for who in ("A", "B"):
        lines.append(f"  {who}: connect() {result['connect'][who]:.2f}s, connect() -> first decoded remote "
                     f"frame {result['first_frame'][who]:.2f}s")
        used = 0
        for pc, pairs in result["pairs"][who].items():
            for p in pairs:
                used += 1
                lines.append(f"  {who} {pc}: {p['desc']}")
                if p["local_protocol"] != expect_protocol or p["remote_protocol"] != expect_protocol:
                    wrong.append(f"{who} {pc}: {p['desc']}")
        if used == 0:
            wrong.append(f"{who}: no selected candidate pair in its stats")
    report = "\n".join(lines)
    print(report)
    assert not wrong, (f"selected candidate pairs should be {expect_protocol} on both ends:\n  "
                       + "\n  ".join(wrong) + f"\n{report}")
    if expect_protocol == "tcp":
        assert tcp_in > 0, f"the server should have received the call over ICE-TCP:\n{report}"


def _context(server, fw: Firewall) -> str:
    return (f"firewall counters: {fw.report()}\nserver: {' '.join(server.cmd)}\n"
            f"server log tail ({server.log_path}):\n{server.log_tail(40)}")


# --------------------------------------------------------------------------- cases


@pytest.mark.parametrize("kind", ["udp-blocked", "udp-blackholed"])
def test_without_udp_the_call_goes_over_ice_tcp(the_lab, server, pc_mode, kind):
    """Only TCP reaches the server (UDP refused by the client's own firewall, or silently
    dropped on the path): both participants still connect, exchange audio + video, and
    every selected pair is tcp."""
    server.assert_alive()
    with Firewall(the_lab, kind) as fw:
        two_party_call(server, fw, pc_mode, "tcp")
        assert fw.udp_dropped_to_server() > 0, (
            f"the clients should have tried UDP to the server and been blocked: {fw.report()}")
    server.assert_alive()


def test_udp_allowed_keeps_udp(the_lab, server, pc_mode):
    """Control: with UDP to the server allowed, the same call picks udp pairs (UDP keeps
    priority over ICE-TCP)."""
    server.assert_alive()
    with Firewall(the_lab, "udp-allowed") as fw:
        two_party_call(server, fw, pc_mode, "udp")
    server.assert_alive()
