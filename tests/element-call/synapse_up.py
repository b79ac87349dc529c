"""Start a Synapse for the Element Call tests, set up users and an encrypted room, print them as JSON.

    .venv/bin/python tests/element-call/synapse_up.py --dir D [--transport-url http://IP:PORT] [--users alice,bob] [--sticky]

Synapse runs with MatrixRTC on (MSC4143 transports, MSC4222, delayed events). With
--transport-url, its `/rtc/transports` lists that LiveKit token service; without, it lists
none (clients then fall back to their own configuration). With --sticky, MSC4354 sticky
events are on (Element Call's matrix_2_0 mode publishes its membership with them). It registers an admin (for
Moselle's membership checks through the admin API) and the given users, each logged in
with one device, and creates an end-to-end-encrypted room (m.room.encryption in the
initial state) whose members may all publish their call membership
(org.matrix.msc3401.call.member at power level 0). One line of JSON goes to stdout:

    {"base_url", "server_name", "room_id", "admin": {...}, "users": {"alice": {user_id, access_token, device_id}}}

Then it keeps Synapse running until stdin closes or it gets SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from synapse_harness import Synapse  # noqa: E402

CALL_MEMBER = "org.matrix.msc3401.call.member"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="Synapse's directory (config, database, logs)")
    ap.add_argument("--transport-url", default="", help="livekit_service_url for matrix_rtc transports")
    ap.add_argument("--users", default="alice,bob,carol")
    ap.add_argument("--sticky", action="store_true", help="MSC4354 sticky events (Element Call's matrix_2_0 mode)")
    args = ap.parse_args()

    extra = {
        "experimental_features": {"msc4143_enabled": True, "msc4222_enabled": True},
        "max_event_delay_duration": "24h",
    }
    if args.sticky:
        extra["experimental_features"]["msc4354_enabled"] = True
    if args.transport_url:
        extra["matrix_rtc"] = {"transports": [{"type": "livekit", "livekit_service_url": args.transport_url}]}
    hs = Synapse(extra_config=extra)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        hs.start(args.dir)
        admin = hs.register("admin", admin=True)
        names = [n for n in args.users.split(",") if n]
        users = {n: hs.register(n) for n in names}
        creator = users[names[0]]
        room_id = hs.create_room(
            creator,
            invite=[users[n].user_id for n in names[1:]],
            preset="private_chat",
            name="Moselle call",
            initial_state=[{"type": "m.room.encryption", "state_key": "",
                            "content": {"algorithm": "m.megolm.v1.aes-sha2"}}],
            power_level_content_override={"events": {CALL_MEMBER: 0}},
        )
        for n in names[1:]:
            hs.join(users[n], room_id)

        def user(u):
            return {"user_id": u.user_id, "access_token": u.access_token, "device_id": u.device_id}

        print(json.dumps({
            "base_url": hs.base_url,
            "server_name": hs.server_name,
            "room_id": room_id,
            "dir": str(hs.dir),
            "admin": user(admin),
            "users": {n: user(u) for n, u in users.items()},
        }), flush=True)

        # Stay up until stdin closes (the test ended or died) or a signal.
        def watch_stdin():
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            finally:
                stop.set()

        threading.Thread(target=watch_stdin, daemon=True).start()
        while not stop.wait(1.0):
            if not hs.running:
                print("synapse exited:\n" + hs.log_tail(), file=sys.stderr, flush=True)
                return 1
        return 0
    except Exception as e:  # noqa: BLE001 - report anything to the test
        print(f"synapse_up failed: {e}\n{hs.log_tail() if hs.dir else ''}", file=sys.stderr, flush=True)
        return 1
    finally:
        hs.stop()


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
