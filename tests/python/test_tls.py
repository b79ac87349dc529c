"""HTTPS and WSS without a proxy: a node given a certificate and key serves
/healthz over HTTPS and LiveKit signaling over WSS (a JoinResponse to a real
token), re-reads its certificate on SIGHUP, and refuses to start on a key
it cannot read, saying which file."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp
from livekit.protocol import rtc as proto

from conftest import DEFAULT_BIN, HOST, _free_port
from moselle_helpers import make_token, unique_room

BIN = os.environ.get("MOSELLE_BIN", DEFAULT_BIN)


def make_cert(d: Path) -> tuple[Path, Path]:
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=moselle.test",
         "-addext", f"subjectAltName=IP:{HOST}"],
        check=True, capture_output=True,
    )
    return cert, key


def served_cert(port: int) -> bytes:
    """The certificate the node presents now (DER), without trusting it."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((HOST, port), timeout=5) as s, ctx.wrap_socket(s) as t:
        return t.getpeercert(binary_form=True)


def der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def test_https_wss_and_a_certificate_renewed_on_sighup(tmp_path):
    cert, key = make_cert(tmp_path)
    cfg = tmp_path / "tls.toml"
    cfg.write_text(f'[server]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n')
    port = _free_port(socket.SOCK_STREAM)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [BIN, "serve", "--dev", "--config", str(cfg), "--bind", HOST, "--http-port", str(port),
         "--udp-port", "0", "--tcp-port", "0"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    trusted = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"https://{HOST}:{port}/healthz", context=trusted, timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                assert time.monotonic() < deadline, "no HTTPS /healthz within 10 s"
                time.sleep(0.1)

        async def join_over_wss() -> proto.SignalResponse:
            token = make_token("W", unique_room("tls"))
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(f"wss://{HOST}:{port}/rtc?access_token={token}", ssl=trusted) as ws:
                    msg = await asyncio.wait_for(ws.receive(), 10)
                    assert msg.type == aiohttp.WSMsgType.BINARY, msg
                    return proto.SignalResponse.FromString(msg.data)

        resp = asyncio.run(join_over_wss())
        assert resp.WhichOneof("message") == "join", resp
        assert resp.join.participant.identity == "W"

        assert served_cert(port) == der(cert)
        old = der(cert)
        make_cert(tmp_path)  # renewed in place, as certbot does
        assert der(cert) != old
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while served_cert(port) != der(cert):
            assert time.monotonic() < deadline, "the renewed certificate was not served after SIGHUP"
            time.sleep(0.1)
        assert proc.poll() is None, "SIGHUP must not stop the node"
        with urllib.request.urlopen(f"https://{HOST}:{port}/healthz", context=ssl.create_default_context(cafile=str(cert)), timeout=2) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_an_unreadable_key_stops_the_start_naming_the_file(tmp_path):
    cert, _ = make_cert(tmp_path)
    cfg = tmp_path / "bad.toml"
    missing = tmp_path / "no-such-key.pem"
    cfg.write_text(f'[server]\ntls_cert_file = "{cert}"\ntls_key_file = "{missing}"\n')
    r = subprocess.run(
        [BIN, "serve", "--dev", "--config", str(cfg), "--bind", HOST, "--http-port", "0", "--udp-port", "0",
         "--tcp-port", "0"],
        capture_output=True, text=True, timeout=20, env={**os.environ, "RUST_BACKTRACE": "0"},
    )
    assert r.returncode != 0
    assert str(missing) in r.stderr and "private key" in r.stderr, r.stderr
