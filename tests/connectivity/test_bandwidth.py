"""A LiveKit Python SDK subscriber on a weak link: the server estimates its downlink from the
SDK's transport-wide congestion control feedback (libwebrtc) and fits the simulcast layers
into it. The subscriber runs here, in the lab's client namespace, whose downlink `tc tbf`
limits on the hub's port towards it (v-client); the publisher (Python SDK too) runs in a
process of its own in the proxy namespace, on an open link.

    tests/netlab.sh .venv/bin/pytest tests/connectivity/test_bandwidth.py -q
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from netlab import lab, start_lab_server, stop_moselle

import lk_client_proc
from moselle_helpers import Client, run, unique_room, wait_until

W, H, FPS = 1280, 720, 20


@pytest.fixture(scope="module")
def the_lab():
    return lab()


@pytest.fixture(scope="module")
def server(the_lab, tmp_path_factory):
    srv = start_lab_server(tmp_path_factory.mktemp("moselle-bw"), the_lab, ("--downlink-bwe",))
    yield srv
    stop_moselle(srv)


def shape(the_lab, kbit: int | None) -> None:
    """Limit what the hub sends to the client namespace to `kbit` kbit/s (None: no limit);
    a 200 ms queue and a 2 KB bucket, as in tests/browser-lab/bandwidth.test.mjs."""
    tc = ["ip", "netns", "exec", the_lab.ns_hub, "tc", "qdisc"]
    if kbit is None:
        subprocess.run([*tc, "del", "dev", "v-client", "root"], capture_output=True)
        return
    subprocess.run([*tc, "replace", "dev", "v-client", "root", "tbf", "rate", f"{kbit}kbit",
                    "burst", "2kb", "latency", "200ms"], check=True, capture_output=True)


def test_python_subscriber_on_a_weak_link_gets_lower_layers_then_a_pause_with_audio_going_on(server, the_lab):
    room = unique_room("bandwidth")
    shape(the_lab, None)
    notes: list[str] = []

    publisher = lk_client_proc.start(server.url, server.token("alice", room), netns=the_lab.ns_proxy,
                                     video=f"{W}x{H}", stderr=subprocess.STDOUT)

    async def scenario():
        sub = Client("bob")
        try:
            await lk_client_proc.connected(publisher, "publisher process")
            await sub.connect(server.url, server.token("bob", room))

            def video():
                v = sub.probe.video_from("alice")
                return v[0] if v else None

            def audio():
                a = sub.probe.audio_from("alice")
                return a[0] if a else None

            def describe() -> str:
                return f"{video().describe() if video() else 'no video'}; {audio().describe() if audio() else 'no audio'}"

            t = time.monotonic()
            await wait_until(lambda: video() is not None and video().width == W, 45,
                             lambda: f"bob should receive alice's top layer on an open link: {describe()}")
            notes.append(f"open link: top layer {time.monotonic() - t:.1f} s after bob joined")
            down0 = server.metric("bandwidth_downgrades_total")

            async def over(seconds: float) -> dict:
                v0, a0 = video().frames, audio().frames
                await asyncio.sleep(seconds)
                return {"fps": round((video().frames - v0) / seconds, 1), "width": video().width,
                        "audio_frames_per_s": round((audio().frames - a0) / seconds, 1)}

            notes.append(f"open link: {await over(2)}")

            shape(the_lab, 600)
            t = time.monotonic()
            await wait_until(lambda: 0 < video().width < W, 30,
                             lambda: f"bob should get a lower layer at 600 kbit/s: {describe()}")
            step_down = time.monotonic() - t
            # Fluent again once the switch settled (the link first drains what
            # was queued for the higher layer): 2 s windows, up to 20 s.
            deadline = time.monotonic() + 20
            w600 = await over(2)
            while not (w600["width"] < W and w600["fps"] >= 5) and time.monotonic() < deadline:
                w600 = await over(2)
            notes.append(f"600 kbit/s: lower layer after {step_down:.1f} s, then {w600}")
            assert w600["width"] < W and w600["fps"] >= 5, f"bob keeps decoding a lower layer: {w600}; {describe()}"
            assert w600["audio_frames_per_s"] >= 40, f"bob's audio goes on: {w600}"
            assert server.metric("bandwidth_downgrades_total") > down0

            shape(the_lab, 150)
            t = time.monotonic()
            await wait_until(lambda: server.metric("bandwidth_paused_tracks") >= 1, 30,
                             lambda: f"the server should pause alice's video for bob at 150 kbit/s: {describe()}")
            paused = time.monotonic() - t
            await asyncio.sleep(3)  # what was queued on the link drains
            w150 = await over(4)
            notes.append(f"150 kbit/s: paused after {paused:.1f} s, then {w150}")
            # Nothing is forwarded; str0m's probes pad with resent cached video
            # packets, which can complete a few stale frames lost on the link
            # (the lowest layer flowing is 15-20 fps).
            assert w150["fps"] < 5, f"no video flows while paused: {w150}"
            assert w150["audio_frames_per_s"] >= 40, f"bob's audio goes on while his video is paused: {w150}"

            shape(the_lab, None)
            t = time.monotonic()
            await wait_until(lambda: server.metric("bandwidth_paused_tracks") == 0, 60,
                             lambda: f"alice's video should resume for bob: {describe()}")
            resumed = time.monotonic() - t
            await wait_until(lambda: video().width == W, 60,
                             lambda: f"bob should get the top layer again: {describe()}")
            notes.append(f"limit lifted: resumed after {resumed:.1f} s, top layer after {time.monotonic() - t:.1f} s, "
                         f"then {await over(2)}")
        finally:
            shape(the_lab, None)
            await sub.aclose()

    try:
        # Above the sum of the steps' own limits, so a stalled step names itself.
        run(scenario, timeout=330)
    finally:
        publisher.kill()
        publisher.wait()
        print("\n".join(notes))
