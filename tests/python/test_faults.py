"""Faults mid-call, with real LiveKit clients: a participant that vanishes
without a word, a full disk under the server's log, and SIGHUP and SIGTERM
while joins are under way. Each test states what a user sees. (Redis
restarting mid-call: tests/cluster.rs a_redis_outage_does_not_cut_running_calls
and tests/python/test_cluster.py. A client whose network is dropped by
nftables while its process runs on: tests/connectivity/test_vanish.py.)"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import lk_client_proc
from conftest import start_moselle, stop_moselle
from moselle_helpers import Client, run, unique_room, wait_until

HERE = Path(__file__).resolve().parent
EV = 15.0


async def hears(b: Client, identity: str, what: str) -> None:
    """B decodes a second of `identity`'s tone from now on."""
    await wait_until(
        lambda: any(st.peak_hz is not None for st in b.probe.audio_from(identity)),
        EV,
        lambda: f"{b.identity} should hear {identity} ({what}): {[s.describe() for s in b.probe.audio_from(identity)]}",
    )
    st = b.probe.audio_from(identity)[0]
    frames = st.frames
    await asyncio.sleep(1.0)
    assert st.frames - frames >= 40, f"{what}: {b.identity} got {st.frames - frames} audio frames from {identity} in 1 s"


def test_a_client_that_vanishes_is_removed_and_the_others_told(tmp_path):
    """The client process is frozen (SIGSTOP): not a packet more, no Leave,
    no socket closed, as when a laptop's lid shuts or its network drops.
    The server must remove it on its own and tell the others."""
    server = start_moselle(tmp_path)
    try:
        async def scenario():
            room = unique_room("vanish")
            async with Client("A") as a:
                await a.connect(server.url, server.token("A", room))
                proc = lk_client_proc.start(server.url, server.token("V", room))
                try:
                    await lk_client_proc.connected(proc, "V")
                    await hears(a, "V", "before it vanishes")
                    t0 = time.monotonic()
                    proc.send_signal(signal.SIGSTOP)
                    await a.events.wait_for(
                        "participant_disconnected", lambda p: p.identity == "V", 90, "V removed")
                    took = time.monotonic() - t0
                finally:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                assert server.metric("participants") == 1
                print(f"a vanished client was removed, and A told, {took:.1f}s after its last packet")
                # Signaling ping timeout (15 s) plus the resume window (15 s), and a little.
                assert took <= 40, f"removed only after {took:.1f}s"

        run(scenario, timeout=150)
        server.assert_alive()
    finally:
        stop_moselle(server)


def test_a_full_disk_under_the_log_harms_no_call(tmp_path):
    """The server logs (at debug, to fill it fast) to a 64 KiB file system:
    once it is full, calls still start and their media flows."""
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(full)], check=True)
    server = None
    try:
        server = start_moselle(full, env={"RUST_LOG": "debug"})

        async def scenario():
            room = unique_room("disk")
            for round in range(2):
                async with Client(f"A{round}") as a, Client(f"B{round}") as b:
                    await a.connect(server.url, server.token(f"A{round}", room))
                    await b.connect(server.url, server.token(f"B{round}", room))
                    await a.publish_audio(440.0)
                    await hears(b, f"A{round}", f"round {round}")
            st = os.statvfs(full)
            return st.f_bavail * st.f_frsize

        left = run(scenario, timeout=90)
        # Two calls log far more than 8 KiB at debug: what is left is less
        # than one of the writes that failed.
        assert left < 16 * 1024, f"the log's file system still has {left} bytes free: the test did not fill it"
        failed = server.metric("log_write_errors_total")
        assert failed > 0, "the log lines that could not be written are not counted"
        server.assert_alive()
        print(f"with the log's disk full, two calls started and carried audio; {failed:.0f} log writes failed")
    finally:
        if server is not None:
            stop_moselle(server)
        subprocess.run(["umount", str(full)], check=False)


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGTERM"])
def test_signals_during_joins(tmp_path, sig):
    """Six participants join at once while the server gets the signal.
    SIGHUP (no TLS to reload) changes nothing: all join, the call goes on.
    SIGTERM drains: joins to the running call succeed, a join opening a new
    room is refused with a clear error, the call goes on, and once it ends
    the server exits by itself, cleanly."""
    server = start_moselle(tmp_path)
    try:
        async def scenario():
            room = unique_room("sig")
            clients: list[Client] = []
            try:
                a, b = Client("A"), Client("B")
                clients += [a, b]
                await a.connect(server.url, server.token("A", room))
                await b.connect(server.url, server.token("B", room))
                await a.publish_audio(440.0)
                await hears(b, "A", "before the signal")

                async def join(ident: str, where: str):
                    c = Client(ident)
                    clients.append(c)
                    try:
                        await c.connect(server.url, server.token(ident, where))
                        return "joined"
                    except AssertionError as e:
                        return str(e)

                targets = [(f"C{i}", room) for i in range(4)] + [(f"N{i}", unique_room("new")) for i in range(2)]
                tasks = [asyncio.create_task(join(i, w)) for i, w in targets]
                await asyncio.sleep(0.05)
                server.proc.send_signal(getattr(signal, sig))
                results = dict(zip([i for i, _ in targets], await asyncio.gather(*tasks)))
                print(f"{sig} during joins: {results}")
                for i in range(4):
                    assert results[f"C{i}"] == "joined", f"{sig}: C{i} into the running call: {results[f'C{i}']}"
                for i in range(2):
                    if sig == "SIGHUP":
                        assert results[f"N{i}"] == "joined", f"N{i}: {results[f'N{i}']}"
                    elif results[f"N{i}"] != "joined":
                        # Joins that reached the server before the signal opened their room.
                        assert "503" in results[f"N{i}"] or "draining" in results[f"N{i}"].lower() \
                            or "no_eligible_node" in results[f"N{i}"], results[f"N{i}"]
                await hears(b, "A", f"after {sig}")
                assert server.proc.poll() is None, f"the server stopped on {sig} with calls running"
            finally:
                for c in clients:
                    await c.aclose()

        run(scenario, timeout=120)
        if sig == "SIGTERM":
            # Everyone left: the drained server exits by itself.
            rc = server.proc.wait(timeout=20)
            assert rc == 0, f"exit code {rc} after draining; log:\n{server.log_tail()}"
            assert "draining" in server.log_path.read_text(errors="replace")
        else:
            server.assert_alive()
    finally:
        stop_moselle(server)
