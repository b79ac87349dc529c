"""Data packet limits ([limits] data_packet_bytes, data_packets_per_sec) with
the LiveKit Python SDK: what is over a limit is dropped (never forwarded)
and counted, what is within goes through. (The other limits need no data
channel: tests/limits.rs.)"""

from __future__ import annotations

import asyncio
import time

from conftest import start_moselle, stop_moselle
from moselle_helpers import Client, run, unique_room

CONFIG = """
[limits]
data_packet_bytes = 2000
data_packets_per_sec = 20
"""


def test_data_packets_over_the_limits_are_dropped_and_counted(tmp_path):
    config = tmp_path / "limits.toml"
    config.write_text(CONFIG)
    server = start_moselle(tmp_path, ["--config", str(config)])
    try:
        async def scenario():
            room = unique_room("limits")
            got: list[bytes] = []
            async with Client("A") as a, Client("B") as b:
                await a.connect(server.url, server.token("A", room))
                await b.connect(server.url, server.token("B", room))
                b.room.on("data_received", lambda d: got.append(d.data))
                lp = a.room.local_participant

                await lp.publish_data(b"s" * 1000, reliable=True, topic="size")
                await lp.publish_data(b"L" * 3000, reliable=True, topic="size")
                await lp.publish_data(b"after", reliable=True, topic="size")
                deadline = time.monotonic() + 10
                while b"after" not in got and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert got == [b"s" * 1000, b"after"], f"B got {[len(g) for g in got]} bytes"
                assert server.metric('limit_refusals_total{limit="data_size"}') == 1

                # Let the bucket refill (a burst of 40), then 200 at once.
                await asyncio.sleep(2.5)
                got.clear()
                t0 = time.monotonic()
                for i in range(200):
                    await lp.publish_data(f"{i}".encode(), reliable=True, topic="rate")
                sent_for = time.monotonic() - t0
                await asyncio.sleep(2)
                allowed = 40 + 20 * (sent_for + 0.5)
                print(f"200 packets sent in {sent_for:.2f}s: B got {len(got)} (allowed about {allowed:.0f})")
                assert 40 <= len(got) <= allowed, f"B got {len(got)} of 200 packets sent in {sent_for:.2f}s"
                refused = server.metric('limit_refusals_total{limit="data_rate"}')
                assert refused == 200 - len(got), f"{refused} counted, {200 - len(got)} dropped"

        run(scenario, timeout=60)
        server.assert_alive()
    finally:
        stop_moselle(server)
