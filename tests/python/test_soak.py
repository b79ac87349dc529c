"""A churn soak with real LiveKit clients: in several rooms at once,
participants join, publish (audio, and one simulcast camera per room),
switch the layers they receive, toggle subscriptions, drop their signaling
socket and resume (the SDK's own resume, which restarts ICE), reconnect
from scratch, leave, or are killed without a word (kill -9 of a process of
their own). Afterwards the rooms, participants and tracks gauges return to
zero, and the server's RSS, open descriptors and threads return to their
level after a warm-up round, within the margins below.

SOAK_MINUTES sets the churn's length (default 2, the test command's run;
scripts/soak.sh MINUTES runs longer). Prints a summary line to quote."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from livekit import rtc

from conftest import start_moselle, stop_moselle
from moselle_helpers import Client, run, unique_room

ROOMS = 3
PER_ROOM = 3
# Margins: a warmed-up allocator keeps some freed memory; descriptors and
# threads have no reason to grow at all.
RSS_MARGIN = 0.25
RSS_SLACK_KIB = 16 * 1024
FD_SLACK = 2
HERE = Path(__file__).resolve().parent

CONFIG = """
[room]
departure_timeout_secs = 2
empty_timeout_secs = 2
resume_window_secs = 10
"""


def usage(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    field = {k: v.split() for k, v in (line.split(":", 1) for line in status if ":" in line)}
    return {
        "rss_kib": int(field["VmRSS"][0]),
        "threads": int(field["Threads"][0]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def gauges(server) -> tuple[float, float, float]:
    return (server.metric("rooms"), server.metric("participants"), server.metric("tracks"))


async def settle(server, timeout: float) -> float:
    """Wait until no room, participant or track is left; seconds taken."""
    t0 = time.monotonic()
    while gauges(server) != (0, 0, 0):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"gauges (rooms, participants, tracks) still {gauges(server)} after {timeout:.0f}s")
        await asyncio.sleep(0.5)
    return time.monotonic() - t0


class Tally:
    def __init__(self) -> None:
        self.n = {k: 0 for k in ("joins", "layer_switches", "resubscribes", "resumes", "full_reconnects",
                                 "leaves", "kills", "client_failures", "sdk_resume_failures")}
        self.failures: list[str] = []

    def add(self, k: str) -> None:
        self.n[k] += 1

    def __str__(self) -> str:
        return ", ".join(f"{v} {k}" for k, v in self.n.items())


async def simulate(c: Client, kind, tally: Tally) -> None:
    try:
        await c.room.simulate_scenario(kind)
    except RuntimeError:
        tally.add("sdk_resume_failures")


async def participant(server, room: str, ident: str, video: bool, deadline: float, rng: random.Random,
                      tally: Tally) -> None:
    while time.monotonic() < deadline:
        c = Client(ident)
        try:
            await c.connect(server.url, server.token(ident, room))
            tally.add("joins")
            print(f"{time.strftime('%H:%M:%S')} {ident} joined {room} as {c.room.local_participant.sid}", flush=True)
            await c.publish_audio(rng.choice([330.0, 440.0, 550.0]))
            if video:
                await c.publish_video(640, 360, 12, simulcast=True)
            end = min(deadline, time.monotonic() + rng.uniform(6, 20))
            while time.monotonic() < end:
                await asyncio.sleep(rng.uniform(1, 3))
                action = rng.choice(["layers", "layers", "subscription", "resume", "none"])
                remote = [p for rp in c.room.remote_participants.values() for p in rp.track_publications.values()]
                if action == "layers":
                    for p in remote:
                        if p.kind == rtc.TrackKind.KIND_VIDEO:
                            p.set_video_quality(rng.choice([rtc.VideoQuality.VIDEO_QUALITY_LOW, rtc.VideoQuality.VIDEO_QUALITY_MEDIUM,
                                                            rtc.VideoQuality.VIDEO_QUALITY_HIGH]))
                            tally.add("layer_switches")
                elif action == "subscription" and remote:
                    p = rng.choice(remote)
                    p.set_subscribed(False)
                    await asyncio.sleep(0.5)
                    p.set_subscribed(True)
                    tally.add("resubscribes")
                elif action == "resume":
                    await simulate(c, rtc.SimulateScenarioKind.SIMULATE_SIGNAL_RECONNECT, tally)
                    tally.add("resumes")
            if rng.random() < 0.2 and time.monotonic() < deadline:
                await simulate(c, rtc.SimulateScenarioKind.SIMULATE_FULL_RECONNECT, tally)
                tally.add("full_reconnects")
                await asyncio.sleep(rng.uniform(2, 4))
            await c.disconnect()
            tally.add("leaves")
        except AssertionError as e:
            # A client that failed on its side (a resume the SDK gave up, a
            # publish or disconnect that never finished; see `sdk_errors`)
            # is dropped like a killed one: the server must clean up after
            # it all the same. Counted, and bounded in the test.
            tally.add("client_failures")
            if len(tally.failures) < 5:
                tally.failures.append(f"{time.strftime('%H:%M:%S')} {e}")
        finally:
            await c.aclose()
        await asyncio.sleep(rng.uniform(0.2, 2))


async def killer(server, rooms: list[str], deadline: float, rng: random.Random, tally: Tally) -> None:
    """Participants in processes of their own, killed mid-call (kill -9)."""
    n = 0
    while time.monotonic() < deadline - 10:
        n += 1
        room = rng.choice(rooms)
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "lk_client_proc.py"), server.url, server.token(f"victim-{n}", room)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
            assert line.strip() == "connected", f"victim-{n} did not connect: {line!r}"
            await asyncio.sleep(rng.uniform(3, 8))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        tally.add("kills")
        await asyncio.sleep(rng.uniform(2, 6))


async def churn(server, seconds: float, rng: random.Random, tally: Tally) -> None:
    rooms = [unique_room(f"soak{i}") for i in range(ROOMS)]
    deadline = time.monotonic() + seconds
    tasks = [
        participant(server, room, f"p{r}-{i}", i == 0, deadline, random.Random(rng.random()), tally)
        for r, room in enumerate(rooms)
        for i in range(PER_ROOM)
    ]
    tasks.append(killer(server, rooms, deadline, random.Random(rng.random()), tally))
    await asyncio.gather(*tasks)


class SdkErrors(logging.Handler):
    """The SDK's own reports of a resume it could not complete."""

    def __init__(self, tally_of) -> None:
        super().__init__(logging.ERROR)
        self.tally_of = tally_of
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "failed to reconnect" in msg:
            self.tally_of().add("sdk_resume_failures")
        if "wrong state" in msg or "failed to reconnect" in msg:
            if len(self.first) < 5:
                self.first.append(f"{time.strftime('%H:%M:%S')} {msg}")


MINUTES = float(os.environ.get("SOAK_MINUTES", "2"))


# Longer than pytest.ini's last-resort guard: a warm-up round, the churn,
# the settling, with room to spare.
@pytest.mark.timeout(int(MINUTES * 60 + 300))
def test_churn_soak(tmp_path):
    minutes = MINUTES
    seed = int(os.environ.get("SOAK_SEED", str(random.randrange(1 << 30))))
    print(f"SOAK_SEED={seed} SOAK_MINUTES={minutes}")
    config = tmp_path / "soak.toml"
    config.write_text(CONFIG)
    server = start_moselle(tmp_path, ["--config", str(config)])
    try:
        pid = server.proc.pid
        idle = usage(pid)

        current = {"tally": Tally()}
        sdk = SdkErrors(lambda: current["tally"])
        logging.getLogger("livekit").addHandler(sdk)

        async def scenario():
            rng = random.Random(seed)
            await churn(server, 30, rng, current["tally"])
            await settle(server, 60)
            start = usage(pid)
            tally = current["tally"] = Tally()
            t0 = time.monotonic()
            await churn(server, minutes * 60, rng, tally)
            churned = time.monotonic() - t0
            took = await settle(server, 60)
            end = usage(pid)
            return start, end, tally, churned, took

        start, end, tally, churned, took = run(scenario, timeout=minutes * 60 + 300)
        server.assert_alive()
        print(f"soak: {churned:.0f}s of churn in {ROOMS} rooms: {tally}; gauges at zero {took:.1f}s after; "
              f"idle at start {idle}, after warm-up {start}, at end {end}")
        for line in sdk.first:
            print(f"SDK: {line}")
        assert tally.n["joins"] > 0 and tally.n["resumes"] > 0 and tally.n["kills"] > 0, str(tally)
        for line in tally.failures:
            print(f"client failure: {line}")
        # The SDK now and then fails on its side (it gives up a resume after
        # applying an answer in the wrong state; see the lines printed):
        # tolerated as the churn it is, never as the rule.
        assert tally.n["sdk_resume_failures"] * 5 <= tally.n["resumes"], f"resumes failing: {tally}"
        assert tally.n["client_failures"] * 5 <= tally.n["joins"], f"clients failing: {tally}"
        assert end["fds"] <= start["fds"] + FD_SLACK, f"descriptors leaked: {start} -> {end}"
        assert end["threads"] <= start["threads"], f"threads leaked: {start} -> {end}"
        limit = max(start["rss_kib"] * (1 + RSS_MARGIN), start["rss_kib"] + RSS_SLACK_KIB)
        assert end["rss_kib"] <= limit, f"RSS grew past {limit:.0f} KiB: {start} -> {end}"
    finally:
        stop_moselle(server)
