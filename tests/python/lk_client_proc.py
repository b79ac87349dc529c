"""A LiveKit participant in a process of its own, for tests that kill it
(kill -9: no Leave, no socket close by the SDK; the kernel closes the
socket). Usage: python lk_client_proc.py URL TOKEN. Prints "connected"
once it publishes audio, then runs until killed."""

from __future__ import annotations

import asyncio
import sys

from moselle_helpers import Client


async def main(url: str, token: str) -> None:
    c = Client("proc")
    await c.connect(url, token)
    await c.publish_audio(440.0)
    print("connected", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
