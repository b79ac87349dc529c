"""A LiveKit participant in a process of its own, for tests that kill it
(kill -9: no Leave, no socket close by the SDK; the kernel closes the
socket) or run it in another network namespace. Usage: python
lk_client_proc.py URL TOKEN [--video WxH]. Prints "connected" once it
publishes audio (and, with --video, a simulcast camera of that size at
20 fps), then runs until killed."""

from __future__ import annotations

import asyncio
import sys

from moselle_helpers import Client


async def main(url: str, token: str, video: str | None) -> None:
    c = Client("proc")
    await c.connect(url, token)
    await c.publish_audio(440.0)
    if video:
        w, h = (int(x) for x in video.split("x"))
        await c.publish_video(w, h, 20, simulcast=True)
    print("connected", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    video = sys.argv[sys.argv.index("--video") + 1] if "--video" in sys.argv else None
    asyncio.run(main(sys.argv[1], sys.argv[2], video))
