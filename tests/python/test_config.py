"""Configs as operators write them: a file states only what differs from the
embedded default, unknown keys are refused by their full path, secrets come
from a file or the environment and short ones are refused outside --dev,
and `moselle check-config` shows the effective config with secrets masked."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from livekit import rtc

from conftest import DEFAULT_BIN, start_moselle, stop_moselle
from moselle_helpers import Client, make_token, run, unique_room

LONG_SECRET = "Zt3q8KfW2mXc7RbN4pLs9HvJ6yDg1uEa5oQi"  # 36 characters


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    bin_path = os.environ.get("MOSELLE_BIN", DEFAULT_BIN)
    full_env = {k: v for k, v in os.environ.items() if k != "LIVEKIT_KEYS"}
    full_env.update(env or {})
    return subprocess.run(
        [bin_path, "check-config", *args], capture_output=True, text=True, timeout=30, env=full_env
    )


def test_a_partial_file_runs_on_the_defaults_and_secrets_are_masked(tmp_path):
    cfg = tmp_path / "moselle.toml"
    cfg.write_text(f'[server]\nnode_id = "lu-7"\n\n[keys]\nprovider = "{LONG_SECRET}"\n')
    r = check(str(cfg))
    assert r.returncode == 0, r.stderr
    assert 'node_id = "lu-7"' in r.stdout, r.stdout
    assert "http_port = 7880" in r.stdout, "the rest comes from the embedded default"
    assert "tcp_port = 7881" in r.stdout
    assert LONG_SECRET not in r.stdout + r.stderr, "a secret was printed"
    assert 'provider = "********"' in r.stdout


def test_unknown_keys_are_refused_by_their_full_path(tmp_path):
    cfg = tmp_path / "typo.toml"
    cfg.write_text('[matrix.membership]\nmethd = "admin_api"\n')
    r = check(str(cfg), "--dev")
    assert r.returncode != 0
    assert "matrix.membership.methd" in r.stderr, r.stderr


def test_every_problem_is_listed_and_short_secrets_need_dev(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[server]\njurisdiction = "Luxembourg"\n\n[keys]\nk = "short"\n')
    r = check(str(cfg))
    assert r.returncode != 0
    problems = [l for l in r.stderr.splitlines() if l.startswith("problem:")]
    assert any("jurisdiction" in p for p in problems), r.stderr
    assert any('"k"' in p and "32" in p for p in problems), r.stderr
    assert "short" not in r.stderr.replace("shorter", ""), "the secret itself was printed"
    cfg.write_text('[keys]\nk = "short"\n')
    assert check(str(cfg), "--dev").returncode == 0
    # The embedded default alone has no keys: a production start is refused.
    r = check()
    assert r.returncode != 0 and "no API keys" in r.stderr, r.stderr


def test_keys_from_a_file_and_from_livekit_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# one per line, as LiveKit's key_file\nfromfile: {LONG_SECRET}\n")
    keys.chmod(0o600)
    cfg = tmp_path / "moselle.toml"
    cfg.write_text(f'keys_file = "{keys}"\n')
    r = check(str(cfg), env={"LIVEKIT_KEYS": f"fromenv: {LONG_SECRET[::-1]}"})
    assert r.returncode == 0, r.stderr
    assert 'fromfile = "********"' in r.stdout and 'fromenv = "********"' in r.stdout, r.stdout
    r = check(str(cfg), env={"LIVEKIT_KEYS": "broken-entry-without-colon"})
    assert r.returncode != 0 and "LIVEKIT_KEYS" in r.stderr, r.stderr


def test_a_production_node_on_a_partial_config_takes_real_clients(tmp_path):
    """No --dev: the key comes from a keys file; the Python SDK joins with a
    token signed by it, and one signed by the dev key is refused."""
    keys = tmp_path / "keys"
    keys.write_text(f"prod: {LONG_SECRET}\n")
    cfg = tmp_path / "moselle.toml"
    cfg.write_text(f'keys_file = "{keys}"\n\n[room]\nempty_timeout_secs = 5\n')
    srv = start_moselle(tmp_path, ["--config", str(cfg)], dev=False)
    try:
        room = unique_room("prod")

        async def scenario():
            async with contextlib.AsyncExitStack() as stack:
                a = await stack.enter_async_context(Client("A"))
                await a.connect(srv.url, make_token("A", room, api_key="prod", api_secret=LONG_SECRET))
                assert a.room.connection_state == rtc.ConnectionState.CONN_CONNECTED
                dev = await stack.enter_async_context(Client("D"))
                refused = None
                try:
                    await dev.connect(srv.url, make_token("D", room), timeout=8)
                except AssertionError as e:
                    refused = str(e)
                assert refused and "failed" in refused, (
                    f"a token signed with the dev key must be refused at once, got: {refused!r}"
                )

        run(scenario, 40)
    finally:
        stop_moselle(srv)
