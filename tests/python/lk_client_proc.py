"""A LiveKit participant in a process of its own, for tests that kill it
(kill -9: no Leave, no socket close by the SDK; the kernel closes the
socket) or run it in another network namespace. Usage: python
lk_client_proc.py URL TOKEN [--video WxH]. Prints "connected" once it
publishes audio (and, with --video, a simulcast camera of that size at
20 fps), then runs until killed. Tests start it with `start()` and wait for
it with `connected()`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from moselle_helpers import Client


def start(url: str, token: str, *, netns: str | None = None, video: str | None = None,
          stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """This script in a process of its own (in network namespace `netns` if given)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), url, token, *(["--video", video] if video else [])]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            cwd=str(Path(__file__).resolve().parent))


async def connected(proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    """Wait until the process says it is connected and publishing."""
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    assert line.strip() == "connected", f"{what} did not connect: {line!r}"


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
