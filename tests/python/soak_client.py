"""One room's participants of the churn soak (tests/python/test_soak.py) in
a process of their own: each joins, publishes, churns and leaves, again and
again, until the deadline; then the process prints their tally as one
`TALLY {json}` line. The first identity publishes video too.

A process of its own because the SDK now and then kills the process it runs
in (a panic in its Rust core aborts, or its FFI layer SIGTERMs it): that ends
this room's clients only, the soak counts it as a client crash (the server
must clean up after them as after kill -9) and starts them again.

    python soak_client.py URL ROOM SECONDS SEED IDENTITY=TOKEN...
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time

from livekit import rtc

from moselle_helpers import Client

TALLY_KEYS = ("joins", "layer_switches", "resubscribes", "resumes", "full_reconnects", "leaves", "kills",
              "client_failures", "client_crashes", "sdk_resume_failures")


class Tally:
    def __init__(self) -> None:
        self.n = {k: 0 for k in TALLY_KEYS}
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


async def participant(url: str, token: str, room: str, ident: str, video: bool, deadline: float,
                      rng: random.Random, tally: Tally) -> None:
    while time.monotonic() < deadline:
        c = Client(ident)
        try:
            await c.connect(url, token)
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


async def main(url: str, room: str, seconds: float, seed: int, people: list[tuple[str, str]]) -> None:
    tally = Tally()
    sdk = SdkErrors(lambda: tally)
    logging.getLogger("livekit").addHandler(sdk)
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(
        participant(url, token, room, ident, i == 0, deadline, random.Random(rng.random()), tally)
        for i, (ident, token) in enumerate(people)
    ))
    tally.failures += [f"SDK: {line}" for line in sdk.first]
    print("TALLY " + json.dumps({"n": tally.n, "failures": tally.failures}), flush=True)


if __name__ == "__main__":
    u, room, seconds, seed = sys.argv[1:5]
    people = [tuple(a.split("=", 1)) for a in sys.argv[5:]]
    asyncio.run(main(u, room, float(seconds), int(seed), people))
