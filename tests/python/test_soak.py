"""A churn soak with real LiveKit clients: in several rooms at once,
participants join, publish (audio, and one simulcast camera per room),
switch the layers they receive, toggle subscriptions, drop their signaling
socket and resume (the SDK's own resume, which restarts ICE), reconnect
from scratch, leave, or are killed without a word (kill -9 of a process of
their own). Each room's participants run in a process of their own
(soak_client.py): the SDK now and then kills its own process (a panic in
its Rust core), which ends those clients as a kill -9 would, is counted as
a client crash (at most one in five joins, with the other client
failures), and they start again. Afterwards the rooms, participants and tracks gauges return to
zero, and the server's RSS, open descriptors and threads return to their
level after a warm-up round, within the margins below.

SOAK_MINUTES sets the churn's length (default 2, the test command's run;
scripts/soak.sh MINUTES runs longer). Prints a summary line to quote."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import lk_client_proc
from conftest import start_moselle, stop_moselle
from moselle_helpers import run, unique_room
from soak_client import Tally

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


async def killer(server, rooms: list[str], deadline: float, rng: random.Random, tally: Tally) -> None:
    """Participants in processes of their own, killed mid-call (kill -9)."""
    n = 0
    while time.monotonic() < deadline - 10:
        n += 1
        room = rng.choice(rooms)
        proc = lk_client_proc.start(server.url, server.token(f"victim-{n}", room))
        try:
            await lk_client_proc.connected(proc, f"victim-{n}")
            await asyncio.sleep(rng.uniform(3, 8))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        tally.add("kills")
        await asyncio.sleep(rng.uniform(2, 6))


async def room_clients(server, room: str, r: int, deadline: float, rng: random.Random, tally: Tally) -> None:
    """One room's participants, run by soak_client.py in a process of their own until the deadline;
    a process the SDK killed (no TALLY line) counts as a client crash, and starts again."""
    people = [f"p{r}-{i}={server.token(f'p{r}-{i}', room)}" for i in range(PER_ROOM)]
    while time.monotonic() < deadline - 2:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "soak_client.py"), server.url, room, f"{deadline - time.monotonic():.1f}",
            str(rng.randrange(1 << 30)), *people,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        done, err_tail = False, []

        async def errors():
            async for line in proc.stderr:
                err_tail.append(line.decode(errors="replace").rstrip())
                del err_tail[:-3]

        reader = asyncio.ensure_future(errors())
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith("TALLY "):
                got = json.loads(line[6:])
                for k, v in got["n"].items():
                    tally.n[k] += v
                tally.failures += got["failures"][: max(0, 5 - len(tally.failures))]
                done = True
            else:
                print(line, flush=True)
        rc = await proc.wait()
        await reader
        if not done:
            tally.add("client_crashes")
            if len(tally.failures) < 5:
                tally.failures.append(f"{time.strftime('%H:%M:%S')} room {r}: the clients' process died "
                                      f"(exit {rc}): {' | '.join(err_tail)}")
            print(f"{time.strftime('%H:%M:%S')} room {r}: the clients' process died (exit {rc}); "
                  f"starting them again", flush=True)


async def churn(server, seconds: float, rng: random.Random, tally: Tally) -> None:
    rooms = [unique_room(f"soak{i}") for i in range(ROOMS)]
    deadline = time.monotonic() + seconds
    tasks = [room_clients(server, room, r, deadline, random.Random(rng.random()), tally)
             for r, room in enumerate(rooms)]
    tasks.append(killer(server, rooms, deadline, random.Random(rng.random()), tally))
    await asyncio.gather(*tasks)


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

        async def scenario():
            rng = random.Random(seed)
            await churn(server, 30, rng, Tally())
            await settle(server, 60)
            start = usage(pid)
            tally = Tally()
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
        assert tally.n["joins"] > 0 and tally.n["resumes"] > 0 and tally.n["kills"] > 0, str(tally)
        for line in tally.failures:
            print(f"client failure: {line}")
        # The SDK now and then fails on its side (it gives up a resume after
        # applying an answer in the wrong state; see the lines printed):
        # tolerated as the churn it is, never as the rule. Measured: 6 of 25
        # and 7 of 33 resumes in 1-minute runs on 2 cores, while the server
        # resumed every session that asked (its log); so at most one in three.
        assert tally.n["sdk_resume_failures"] * 3 <= tally.n["resumes"], f"resumes failing: {tally}"
        assert (tally.n["client_failures"] + tally.n["client_crashes"]) * 5 <= tally.n["joins"], \
            f"clients failing: {tally}"
        assert end["fds"] <= start["fds"] + FD_SLACK, f"descriptors leaked: {start} -> {end}"
        assert end["threads"] <= start["threads"], f"threads leaked: {start} -> {end}"
        limit = max(start["rss_kib"] * (1 + RSS_MARGIN), start["rss_kib"] + RSS_SLACK_KIB)
        assert end["rss_kib"] <= limit, f"RSS grew past {limit:.0f} KiB: {start} -> {end}"
    finally:
        stop_moselle(server)
