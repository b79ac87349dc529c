"""A participant whose network vanishes mid-call, dropped by nftables: its process keeps
running and sending, but not a packet reaches the server or comes back (no Leave, no FIN,
no RST), as when a phone leaves Wi-Fi coverage. The server must remove it on its own and
tell the others. (A frozen process, SIGSTOP: tests/python/test_faults.py.)

Layout in tests/netlab.sh's lab: the server in the server namespace; A (who watches) in the
client namespace, where pytest runs; V (who vanishes) a process of its own in the proxy
namespace, so the hub's bridge can drop all of V's traffic and nothing of A's:

    tests/netlab.sh .venv/bin/pytest tests/connectivity/test_vanish.py -q -s
"""

from __future__ import annotations

import json
import subprocess
import time

from livekit import rtc

from netlab import _nft, lab, start_lab_server, stop_moselle

import lk_client_proc

from moselle_helpers import Client, run, unique_room, wait_until

TABLE = "moselle_vanish"  # bridge, hub namespace
# Signaling ping timeout (15 s) plus the resume window (15 s), and a margin.
REMOVED_WITHIN_S = 40.0


def _cut(hub: str) -> None:
    """Drop every frame from and to the proxy namespace's bridge port, both ways, counted."""
    _nft("-f", "-", netns=hub, stdin=(
        f"table bridge {TABLE} {{\n"
        "    counter from_victim { }\n    counter to_victim { }\n"
        "    chain forward {\n"
        "        type filter hook forward priority filter; policy accept;\n"
        '        iifname "v-proxy" counter name "from_victim" drop\n'
        '        oifname "v-proxy" counter name "to_victim" drop\n'
        "    }\n}\n"))


def _counts(hub: str) -> dict[str, int]:
    data = json.loads(_nft("-j", "list", "counters", "table", "bridge", TABLE, netns=hub))
    return {o["counter"]["name"]: o["counter"]["packets"] for o in data["nftables"] if "counter" in o}


def test_a_client_whose_network_vanishes_is_removed_and_the_others_told(tmp_path):
    the_lab = lab()
    subprocess.run(["ip", "netns", "exec", the_lab.ns_hub, "nft", "delete", "table", "bridge", TABLE],
                   capture_output=True, timeout=10)
    server = start_lab_server(tmp_path, the_lab)
    try:
        async def scenario():
            room = unique_room("vanish-net")
            async with Client("A") as a:
                await a.connect(server.url, server.token("A", room))
                victim = lk_client_proc.start(server.url, server.token("V", room), netns=the_lab.ns_proxy)
                try:
                    await lk_client_proc.connected(victim, "V")
                    await wait_until(
                        lambda: any(st.frames >= 50 for st in a.probe.audio_from("V")), 15,
                        lambda: f"A should hear V first: {[s.describe() for s in a.probe.audio_from('V')]}")
                    t0 = time.monotonic()
                    _cut(the_lab.ns_hub)
                    await a.events.wait_for(
                        "participant_disconnected", lambda p: p.identity == "V", 90, "V removed")
                    took = time.monotonic() - t0
                    counts = _counts(the_lab.ns_hub)
                    assert victim.poll() is None, "V's process must still run: only its network is gone"
                finally:
                    victim.kill()
                    victim.wait()
                assert server.metric("participants") == 1
                print(f"a client whose network vanished was removed, and A told, {took:.1f} s after the cut; "
                      f"dropped meanwhile: {counts['from_victim']} packets from V, {counts['to_victim']} to V")
                # V kept sending into the void (media, pings, retries) and the server kept trying.
                assert counts["from_victim"] > 0 and counts["to_victim"] > 0, counts
                assert took <= REMOVED_WITHIN_S, f"removed only after {took:.1f} s"
                # A's call with the server is untouched.
                assert a.room.connection_state == rtc.ConnectionState.CONN_CONNECTED, "A lost its own connection"

        run(scenario, timeout=150)
        server.assert_alive()
    finally:
        subprocess.run(["ip", "netns", "exec", the_lab.ns_hub, "nft", "delete", "table", "bridge", TABLE],
                       capture_output=True, timeout=10)
        stop_moselle(server)
