"""A call through an installed Moselle: B joins, A publishes a 440 Hz sine,
B must decode it. Tokens are signed with the secret of the node's keys file.

    call.py URL API_KEY API_SECRET
Run inside tests/netns.sh (libwebrtc gathers no loopback candidates).
Exit 0 when B heard A; an AssertionError otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from moselle_helpers import Client, make_token, run, unique_room, wait_until  # noqa: E402

FREQ_HZ = 440.0


def main() -> None:
    url, key, secret = sys.argv[1:4]
    room = unique_room("deb")

    async def scenario() -> None:
        t0 = time.monotonic()
        async with contextlib.AsyncExitStack() as stack:
            b = await stack.enter_async_context(Client("B"))
            a = await stack.enter_async_context(Client("A"))
            await b.connect(url, make_token("B", room, api_key=key, api_secret=secret))
            await a.connect(url, make_token("A", room, api_key=key, api_secret=secret))
            pub = await a.publish_audio(FREQ_HZ)
            await b.events.wait_for(
                "track_subscribed",
                lambda _t, p, *_: p.sid == pub.sid,
                10.0,
                f"for A's audio {pub.sid}",
            )
            st = b.probe.audio[pub.sid]
            await wait_until(
                lambda: st.peak_hz is not None,
                15.0,
                lambda: f"B should decode 1 s of A's sine; got {st.describe()}",
            )
            assert abs(st.peak_hz - FREQ_HZ) <= 15.0, f"B heard {st.peak_hz:.0f} Hz, A sends {FREQ_HZ:.0f} Hz"
            print(f"call ok in {time.monotonic() - t0:.1f}s: B received {st.describe()}")

    run(scenario, timeout=60)
    # The call's outcome is decided above. Leave without the SDK's native
    # teardown: it aborted the process once after a good call ("panic in a
    # function that cannot unwind", CI on 2026-11-25), which is no finding
    # about the server.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
