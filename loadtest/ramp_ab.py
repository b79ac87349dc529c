"""How long a simulcast publisher takes to reach its top layer, as a
subscriber decodes it, with downlink BWE on against off, in alternating
runs (run inside tests/netns.sh, with the repo's venv):

    tests/netns.sh .venv/bin/python loadtest/ramp_ab.py RUNS [single|dual]

Prints one line per run and the medians. Issue 13's open question: with
BWE on, a publisher on a loaded host reached its top layer later."""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "python"))

import pytest  # noqa: E402  (conftest's start_moselle reports failures through it)

from conftest import start_moselle, stop_moselle  # noqa: E402
from moselle_helpers import Client, unique_room  # noqa: E402
from test_media import sender_diag  # noqa: E402

W, H = 960, 540


async def one(server, dual: bool, limit: float = 20.0) -> tuple[float, str]:
    room = unique_room("ramp")
    opts = {"single_peer_connection": not dual}
    async with Client("A") as a, Client("B") as b:
        await a.connect(server.url, server.token("A", room), **opts)
        await b.connect(server.url, server.token("B", room), **opts)
        t0 = time.monotonic()
        pub = await a.publish_video(W, H, 20, simulcast=True)
        while time.monotonic() - t0 < limit:
            st = b.probe.video.get(pub.sid)
            if st is not None and (st.width, st.height) == (W, H):
                return time.monotonic() - t0, await sender_diag(pub)
            await asyncio.sleep(0.05)
        return float("inf"), await sender_diag(pub)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    dual = len(sys.argv) > 2 and sys.argv[2] == "dual"
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(runs):
        for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
            d = Path(tempfile.mkdtemp(prefix=f"ramp-{mode}-"))
            flag = "--downlink-bwe" if mode == "on" else "--no-downlink-bwe"
            server = start_moselle(d, [flag])
            try:
                t, diag = asyncio.run(one(server, dual))
            finally:
                stop_moselle(server)
            times[mode].append(t)
            print(f"run {i} bwe {mode}: top layer after {t:.2f} s{diag}", flush=True)
    for mode, ts in times.items():
        print(f"bwe {mode}: median {statistics.median(ts):.2f} s, runs {', '.join(f'{t:.2f}' for t in ts)}")


if __name__ == "__main__":
    try:
        main()
    except pytest.fail.Exception as e:
        sys.exit(f"server did not start: {e}")
