"""The connectivity fallback with real LiveKit Python SDK clients: a call that started on UDP
survives the network taking UDP (and then TCP) away mid-call, without the user doing anything.

Runs in tests/netlab.sh's lab (both participants in the client namespace, the server in the
server namespace); the network failures are silent drops on the path, in both directions
(netlab.PathBlackhole, in the hub's bridge).

  * UDP dies mid-call, ICE-TCP stays open: the call goes on over TCP. Either libwebrtc moves
    to its TCP pair by itself, or the server's ladder (ICE failed while signaling lives ->
    Leave RECONNECT -> rejoin on the tcp rung) does it; the test says which.
  * UDP and ICE-TCP both die mid-call (signaling stays): the client cannot recover by
    itself; the server must notice (moselle_ice_fallbacks_total) and send it to the tcp
    rung. TCP is then opened again (UDP stays dead): the client must have rejoined by
    itself, on a session whose answer had no UDP candidate, and media flows over TCP.

Both print their timelines (seconds after the blackhole): client events, SDK log lines,
server log lines, first new decoded frames.

    tests/netlab.sh .venv/bin/pytest tests/connectivity/test_fallback.py -q -s
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import time
from dataclasses import dataclass, field

import pytest

from livekit import rtc

from netlab import ICE_TCP_PORT, Firewall, PathBlackhole, lab, start_lab_server, stop_moselle

from moselle_helpers import Client, run, unique_room, wait_until

W, H, FPS = 320, 180, 20
EVENT_TIMEOUT_S = 15.0
MEDIA_TIMEOUT_S = 15.0
# How long the server takes to give up on a session whose ICE died (str0m: ~15 s after the
# last consent check, plus 3 s for the client to recover by itself), with a margin.
LADDER_TIMEOUT_S = 35.0
# After the blackhole (test 1) or the reopening of TCP (test 2): the call must work again.
RECOVERY_TIMEOUT_S = 40.0
NEW_FRAMES = 40  # decoded after recovery: 2 s of video at 20 fps
# The call runs this long (from connect) before the network fails: past the server's first
# STUN deadline for new ICE-TCP connections (5 s), so standby TCP pairs are in their steady state.
STEADY_S = 6.0
TCP_METRICS = ("tcp_connections", "tcp_accepted_total", "tcp_rejected_total", "tcp_timeouts_total")
# What the server did for the video after the blackhole (in the report).
AFTER_METRICS = (*TCP_METRICS, "tcp_send_drops_total", "keyframe_requests_total", "keyframe_requests_ignored_total",
                 "bandwidth_pauses_total")
SERVER_LOG_LEVEL = "info,moselle=debug,str0m=warn"


@pytest.fixture(scope="module")
def the_lab():
    return lab()


@pytest.fixture(scope="module")
def server(the_lab, tmp_path_factory):
    # The ICE state changes (debug) belong in the timelines.
    old = os.environ.get("RUST_LOG")
    os.environ["RUST_LOG"] = old or SERVER_LOG_LEVEL
    try:
        srv = start_lab_server(tmp_path_factory.mktemp("moselle-fallback"), the_lab)
    finally:
        if old is None:
            del os.environ["RUST_LOG"]
    yield srv
    stop_moselle(srv)


# --------------------------------------------------------------------------- observation


class SdkLog(logging.Handler):
    """The SDK's own log lines (its Rust core: reconnects, leave requests), timestamped."""

    KEEP = re.compile(r"leave|reconnect|resum|restart|disconnect|fail|ice|close|retry|signal|join|connect",
                      re.IGNORECASE)

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:
            return
        if msg.startswith("libwebrtc") and record.levelno < logging.WARNING:
            return
        if self.KEEP.search(msg) or record.levelno >= logging.WARNING:
            self.lines.append((time.monotonic(), f"{record.levelname.lower()} {msg}"))


@contextlib.contextmanager
def sdk_log():
    h = SdkLog()
    lg = logging.getLogger("livekit")
    lg.addHandler(h)
    try:
        yield h
    finally:
        lg.removeHandler(h)


class ServerLog:
    """Server log lines written after `mark()`, with their times on this process's monotonic
    clock (the server logs UTC wall-clock time)."""

    TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z\s+(.*)$")

    def __init__(self, server) -> None:
        self.server = server
        self.offset = 0
        self.wall0 = self.mono0 = 0.0

    def mark(self) -> None:
        self.offset = self.server.log_path.stat().st_size
        self.wall0, self.mono0 = time.time(), time.monotonic()

    def lines(self) -> list[tuple[float, str]]:
        with open(self.server.log_path, "rb") as f:
            f.seek(self.offset)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            m = self.TS.match(line)
            if not m:
                continue
            wall = dt.datetime.fromisoformat(m.group(1)[:26]).replace(tzinfo=dt.timezone.utc).timestamp()
            out.append((self.mono0 + wall - self.wall0, m.group(2)))
        return out


@dataclass
class FrameClock:
    """When `rx` decoded video frames from `tx` (all of tx's video tracks: a rejoin publishes
    a new one), sampled every 10 ms."""

    rx: Client
    tx: str
    times: list[float] = field(default_factory=list)  # one entry per sample where frames grew
    counts: list[int] = field(default_factory=list)

    def total(self) -> int:
        return sum(v.frames for v in self.rx.probe.video_from(self.tx))

    def sample(self, now: float) -> None:
        n = self.total()
        if not self.counts or n > self.counts[-1]:
            self.times.append(now)
            self.counts.append(n)

    def frames_after(self, t: float) -> int:
        before = [c for tt, c in zip(self.times, self.counts) if tt <= t]
        return self.total() - (before[-1] if before else 0)

    def largest_gap_after(self, t0: float) -> tuple[float, float] | None:
        """(last frame before, first frame after) the longest pause in decoded frames that
        ends after t0 (the pause may start just before t0: frames in flight)."""
        ts = [t for t in self.times if t >= t0]
        prev = [t for t in self.times if t < t0]
        points = prev[-1:] + ts
        if len(points) < 2:
            return None
        return max(zip(points, points[1:]), key=lambda g: g[1] - g[0])


async def sampling(clocks: list[FrameClock]) -> None:
    while True:
        now = time.monotonic()
        for c in clocks:
            c.sample(now)
        await asyncio.sleep(0.01)


def _cand(c) -> str:
    tcp = f" {rtc.stats.IceTcpCandidateType.Name(c.tcp_type).lower().removeprefix('candidate_')}" if c.protocol == "tcp" and c.HasField("tcp_type") else ""
    return f"{c.protocol} {rtc.stats.IceCandidateType.Name(c.candidate_type).lower()}{tcp} {c.address}:{c.port}"


def ice_view(stats: list[rtc.stats.RtcStats]) -> dict:
    """One peer connection's selected pairs and remote candidates."""
    pairs, local, remote, transports, inbound = {}, {}, {}, [], []
    for s in stats:
        kind = s.WhichOneof("stats")
        if kind == "inbound_rtp" and s.inbound_rtp.stream.kind == "video":
            r = s.inbound_rtp
            inbound.append(f"ssrc {r.stream.ssrc} mid {r.inbound.mid}: {r.received.packets_received} packets "
                           f"({r.received.packets_lost} lost, {r.inbound.packets_discarded} discarded), "
                           f"frames {r.inbound.frames_received} received, {r.inbound.frames_decoded} decoded, "
                           f"{r.inbound.key_frames_decoded} key, {r.inbound.frames_dropped} dropped; "
                           f"sent PLI {r.inbound.pli_count}, NACK {r.inbound.nack_count}")
        elif kind == "candidate_pair":
            pairs[s.candidate_pair.rtc.id] = s.candidate_pair.candidate_pair
        elif kind == "local_candidate":
            local[s.local_candidate.rtc.id] = s.local_candidate.candidate
        elif kind == "remote_candidate":
            remote[s.remote_candidate.rtc.id] = s.remote_candidate.candidate
        elif kind == "transport":
            transports.append(s.transport.transport)
    ids = [t.selected_candidate_pair_id for t in transports if t.selected_candidate_pair_id]
    if not ids:
        ids = [i for i, p in pairs.items() if p.nominated and p.state == rtc.stats.PAIR_SUCCEEDED]
    selected = []
    for i in ids:
        p = pairs.get(i)
        if p is None:
            continue
        lc, rc = local.get(p.local_candidate_id), remote.get(p.remote_candidate_id)
        selected.append({
            "protocols": (lc.protocol if lc else "?", rc.protocol if rc else "?"),
            "desc": f"{_cand(lc) if lc else '?'} -> {_cand(rc) if rc else '?'} "
                    f"(sent {p.bytes_sent} B, received {p.bytes_received} B)",
        })
    everything = sorted(
        f"{local[p.local_candidate_id].protocol if p.local_candidate_id in local else '?'}->"
        f"{remote[p.remote_candidate_id].protocol if p.remote_candidate_id in remote else '?'} "
        f"{rtc.stats.IceCandidatePairState.Name(p.state).lower().removeprefix('pair_')}"
        + (" nominated" if p.nominated else "") for p in pairs.values())
    return {"selected": selected, "remote": sorted({_cand(c) for c in remote.values()}), "pairs": everything,
            "local": sorted({_cand(c) for c in local.values()}), "inbound": inbound}


async def ice_report(c: Client) -> dict[str, dict]:
    st = await c.room.get_rtc_stats()
    out = {"publisher": ice_view(st.publisher_stats), "subscriber": ice_view(st.subscriber_stats)}
    return {pc: v for pc, v in out.items() if v["selected"] or v["remote"]}


def selected_protocols(rep: dict[str, dict]) -> set[tuple[str, str]]:
    return {s["protocols"] for v in rep.values() for s in v["selected"]}


def describe_ice(who: str, rep: dict[str, dict]) -> list[str]:
    lines = []
    for pc, v in rep.items():
        for s in v["selected"] or [{"desc": "no selected pair"}]:
            lines.append(f"  {who} {pc}: {s['desc']}")
        lines.append(f"  {who} {pc} remote candidates: {', '.join(v['remote']) or '-'}")
        lines.append(f"  {who} {pc} candidate pairs: {', '.join(v['pairs']) or '-'}; "
                     f"local candidates: {', '.join(v['local']) or '-'}")
        lines += [f"  {who} {pc} video in: {i}" for i in v["inbound"]]
    return lines


# --------------------------------------------------------------------------- the call


async def _connect(c: Client, server, room: str) -> None:
    # Never abandoned before the SDK is done (a late result kills this process): the outer
    # run() timeout is the bound.
    try:
        await c.room.connect(server.url, server.token(c.identity, room), rtc.RoomOptions(auto_subscribe=True))
    except rtc.ConnectError as e:
        raise AssertionError(f"{c.identity}: Room.connect failed: {e.message}") from None


async def start_call(server, room: str, stack: contextlib.AsyncExitStack) -> tuple[Client, Client]:
    """A and B join, publish audio + video and decode each other's video."""
    a = await stack.enter_async_context(Client("A"))
    b = await stack.enter_async_context(Client("B"))

    async def join(c: Client, chroma, freq):
        await _connect(c, server, room)
        await c.publish_audio(freq)
        await c.publish_video(W, H, FPS, simulcast=False, chroma=chroma)

    t0 = time.monotonic()
    await asyncio.gather(join(a, (60, 196), 440.0), join(b, (196, 60), 660.0))
    for rx, tx in ((a, b), (b, a)):
        await rx.events.wait_for("track_subscribed", lambda t, p, *_: p.sid == tx.video_pub.sid, EVENT_TIMEOUT_S,
                                 f"for {tx.identity}'s video")
        await wait_until(lambda rx=rx, tx=tx: sum(v.frames for v in rx.probe.video_from(tx.identity)) >= 20,
                         MEDIA_TIMEOUT_S, lambda rx=rx, tx=tx: f"{rx.identity} decodes {tx.identity}'s video: "
                         + "; ".join(v.describe() for v in rx.probe.video_from(tx.identity)))
    await asyncio.sleep(max(0.0, t0 + STEADY_S - time.monotonic()))
    return a, b


def tcp_metrics(server, names: tuple[str, ...] = TCP_METRICS) -> str:
    return ", ".join(f"{m} {server.metric(m):.0f}" for m in names)


def how_recovered(c: Client, sid_before: str, since: int) -> str:
    if c.room.local_participant.sid != sid_before:
        return "rejoined (full reconnect, new participant sid): the server's ladder"
    if any(e.name == "reconnected" for e in c.events.events[since:]):
        return "SDK resume (signaling reconnect + ICE restart, same session): client-driven"
    return "libwebrtc moved to its TCP pair, no reconnect: client-driven"


async def assert_on_udp(clients: list[Client]) -> list[str]:
    lines, wrong = [], []
    for c in clients:
        rep = await ice_report(c)
        lines += describe_ice(c.identity, rep)
        if not rep or selected_protocols(rep) != {("udp", "udp")}:
            wrong.append(c.identity)
    assert not wrong, f"the call should start on UDP ({', '.join(wrong)} is not):\n" + "\n".join(lines)
    return lines


def timeline(t0: float, clients: list[Client], since: dict[str, int], sdk: SdkLog, srv: ServerLog,
             extra: list[tuple[float, str]]) -> str:
    """Everything that happened after t0, in order, in seconds after t0."""
    items = list(extra)
    for c in clients:
        for e in c.events.events[since[c.identity]:]:
            if e.name in ("active_speakers_changed",):
                continue
            args = ", ".join(rtc.ConnectionState.Name(a) if e.name == "connection_state_changed" else
                             getattr(a, "identity", None) or getattr(a, "sid", None) or repr(a) for a in e.args)
            items.append((e.t, f"client {c.identity}: {e.name}({args})"))
    items += [(t, f"sdk: {m}") for t, m in sdk.lines if t >= t0 - 0.5]
    items += [(t, f"server: {m}") for t, m in srv.lines()]
    items.sort(key=lambda x: x[0])
    return "\n".join(f"  {t - t0:+7.2f}s  {m}" for t, m in items)


def fallbacks(server) -> int:
    return int(server.metric("ice_fallbacks_total"))


# --------------------------------------------------------------------------- cases


def test_udp_dies_mid_call_the_call_goes_on_over_tcp(the_lab, server):
    """A call on UDP; UDP is then blackholed on the path (both ways), ICE-TCP stays open.
    Without anybody doing anything, each side decodes new frames from the other again and
    every selected pair is tcp. Prints the time from the blackhole to the first new decoded
    frame, and whether the server's ladder acted or the clients recovered by themselves."""
    server.assert_alive()
    room = unique_room("fallback-udp")
    out: dict = {}

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            sdk = stack.enter_context(sdk_log())
            a, b = await start_call(server, room, stack)
            clients = [a, b]
            out["before"] = await assert_on_udp(clients)
            out["tcp_before"] = tcp_metrics(server)
            sids = {c.identity: c.room.local_participant.sid for c in clients}
            clocks = [FrameClock(a, "B"), FrameClock(b, "A")]
            sampler = asyncio.ensure_future(sampling(clocks))
            stack.callback(sampler.cancel)
            srv = ServerLog(server)
            srv.mark()
            since = {c.identity: c.events.mark() for c in clients}
            f0 = fallbacks(server)
            await asyncio.sleep(0.3)

            t0 = time.monotonic()
            hole.set(udp=True)
            marks: list[tuple[float, str]] = [(t0, "test: UDP blackholed on the path (TCP open)")]
            tcp_since: dict[str, float] = {}
            reps: dict[str, dict] = {}

            def done() -> bool:
                return len(tcp_since) == 2 and all(
                    ck.frames_after(max(tcp_since.values())) >= NEW_FRAMES for ck in clocks)

            deadline = t0 + RECOVERY_TIMEOUT_S
            while not done() and time.monotonic() < deadline:
                for c in clients:
                    rep = await ice_report(c)
                    reps[c.identity] = rep
                    if c.identity not in tcp_since and rep and selected_protocols(rep) == {("tcp", "tcp")}:
                        tcp_since[c.identity] = time.monotonic()
                        marks.append((tcp_since[c.identity], f"test: {c.identity}'s selected pairs are all tcp"))
                await asyncio.sleep(0.25)
            out["recovered"] = done()
            out["fallbacks"] = fallbacks(server) - f0
            out["how"] = {c.identity: how_recovered(c, sids[c.identity], since[c.identity]) for c in clients}
            out["ice"] = [line for c in clients for line in describe_ice(c.identity, reps.get(c.identity, {}))]
            out["ice"].append(f"  server: {tcp_metrics(server, AFTER_METRICS)}")
            out["frames"] = []
            for ck in clocks:
                gap = ck.largest_gap_after(t0)
                if gap:
                    marks.append((gap[1], f"test: {ck.rx.identity} decodes {ck.tx}'s video again "
                                          f"(first new frame after a {gap[1] - gap[0]:.2f}s pause)"))
                out["frames"].append((ck.rx.identity, ck.tx, gap, ck.frames_after(t0)))
            out["t0"] = t0
            out["timeline"] = timeline(t0, clients, since, sdk, srv, marks)

    with Firewall(the_lab, "udp-allowed"), PathBlackhole(the_lab) as hole:
        try:
            run(scenario, timeout=120)
        except AssertionError as e:
            raise AssertionError(f"{e}\npath: {hole.report()}\nserver log tail:\n{server.log_tail(40)}") from None
        path = hole.report()
        udp_dropped = hole.counters()["udp_to_server"]

    t0 = out["t0"]
    lines = ["UDP dies mid-call:", "  before the blackhole:", *out["before"],
             f"  server ICE-TCP before the blackhole: {out['tcp_before']}", "  after:", *out["ice"]]
    for rx, tx, gap, n in out["frames"]:
        if gap:
            lines.append(f"  {rx} <- {tx}: blackhole -> first new decoded frame {gap[1] - t0:.2f}s "
                         f"(pause {gap[0] - t0:+.2f}s .. {gap[1] - t0:+.2f}s), {n} frames since the blackhole")
        else:
            lines.append(f"  {rx} <- {tx}: no frame decoded after the blackhole")
    driver = (f"SERVER-DRIVEN: the ladder acted ({out['fallbacks']} ice_fallbacks)" if out["fallbacks"] else
              "CLIENT-DRIVEN: the clients moved to TCP by themselves (ice_fallbacks_total unchanged)")
    lines += [f"  recovery: {driver}", *(f"  {who}: {how}" for who, how in out["how"].items()),
              f"  path: {path}", "  timeline:", out["timeline"]]
    report = "\n".join(lines)
    print(report)
    assert udp_dropped > 0, f"the blackhole should have dropped the clients' UDP:\n{report}"
    assert out["recovered"], (f"within {RECOVERY_TIMEOUT_S:.0f}s of the blackhole, both clients should be on tcp pairs "
                              f"and decode >= {NEW_FRAMES} new frames of each other's video:\n{report}")
    server.assert_alive()


def test_udp_and_tcp_die_the_server_sends_the_client_to_the_tcp_rung(the_lab, server):
    """A call on UDP; UDP and ICE-TCP are then blackholed on the path (signaling stays), so
    the clients cannot recover by themselves. The server must see their ICE fail and move
    them down its ladder (moselle_ice_fallbacks_total rises, Leave RECONNECT). TCP then
    comes back (UDP stays dead): each client must have rejoined by itself, media flows
    again over tcp pairs, and the new session's remote candidates have no UDP candidate
    (the server's tcp rung: proof the server drove it)."""
    server.assert_alive()
    room = unique_room("fallback-ladder")
    out: dict = {}

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            sdk = stack.enter_context(sdk_log())
            a, b = await start_call(server, room, stack)
            clients = [a, b]
            out["before"] = await assert_on_udp(clients)
            remote_before = {c.identity: [r for v in (await ice_report(c)).values() for r in v["remote"]]
                             for c in clients}
            out["remote_before"] = remote_before
            out["tcp_before"] = tcp_metrics(server)
            sids_before = {c.identity: c.room.local_participant.sid for c in clients}
            clocks = [FrameClock(a, "B"), FrameClock(b, "A")]
            sampler = asyncio.ensure_future(sampling(clocks))
            stack.callback(sampler.cancel)
            srv = ServerLog(server)
            srv.mark()
            since = {c.identity: c.events.mark() for c in clients}
            f0 = fallbacks(server)
            await asyncio.sleep(0.3)

            t0 = time.monotonic()
            out["t0"] = t0
            hole.set(udp=True, tcp_ports=(ICE_TCP_PORT,))
            marks: list[tuple[float, str]] = [(t0, f"test: UDP and TCP to {ICE_TCP_PORT} blackholed (signaling open)")]

            def tl() -> str:
                return timeline(t0, clients, since, sdk, srv, marks)

            # The server's ladder: wait for ice_fallbacks_total to count both sessions (they
            # lost ICE at the same moment); a lone one gets 3 s for its peer to follow.
            first = None
            while True:
                n = fallbacks(server) - f0
                now = time.monotonic()
                if n and first is None:
                    first = now
                    marks.append((now, f"test: ice_fallbacks_total +{n}"))
                if n >= 2 or (first is not None and now - first >= 3.0):
                    break
                if now - t0 > LADDER_TIMEOUT_S:
                    out["ladder_s"] = None
                    raise AssertionError(
                        f"moselle_ice_fallbacks_total did not rise within {LADDER_TIMEOUT_S:.0f}s of the blackhole "
                        f"though the clients' ICE is dead and their signaling open:\ntimeline:\n{tl()}")
                await asyncio.sleep(0.1)
            out["ladder_s"] = first - t0
            out["fallbacks"] = fallbacks(server) - f0
            t_open = time.monotonic()
            hole.set(udp=True)  # TCP back, UDP still dead
            marks.append((t_open, f"test: TCP to {ICE_TCP_PORT} open again (ice_fallbacks_total "
                                  f"+{out['fallbacks']}); UDP still blackholed"))

            # Nobody calls connect() again: the clients must rejoin by themselves.
            reps: dict[str, dict] = {}
            tcp_since: dict[str, float] = {}

            def done() -> bool:
                return len(tcp_since) == 2 and all(
                    ck.frames_after(max(tcp_since.values())) >= NEW_FRAMES for ck in clocks)

            while not done() and time.monotonic() < t_open + RECOVERY_TIMEOUT_S:
                for c in clients:
                    if not c.room.isconnected():
                        continue
                    rep = await ice_report(c)
                    reps[c.identity] = rep
                    if c.identity not in tcp_since and rep and selected_protocols(rep) == {("tcp", "tcp")}:
                        tcp_since[c.identity] = time.monotonic()
                        marks.append((tcp_since[c.identity], f"test: {c.identity}'s selected pairs are all tcp"))
                await asyncio.sleep(0.25)
            out["recovered"] = done()
            out["sids"] = {c.identity: (sids_before[c.identity], c.room.local_participant.sid) for c in clients}
            out["connected"] = {c.identity: c.room.isconnected() for c in clients}
            out["reps"] = reps
            out["frames"] = []
            for ck in clocks:
                gap = ck.largest_gap_after(t0)
                if gap:
                    marks.append((gap[1], f"test: {ck.rx.identity} decodes {ck.tx}'s video again "
                                          f"(first new frame after a {gap[1] - gap[0]:.2f}s pause)"))
                out["frames"].append((ck.rx.identity, ck.tx, gap, ck.frames_after(t_open)))
            out["t_open"] = t_open
            out["timeline"] = tl()

    with Firewall(the_lab, "udp-allowed"), PathBlackhole(the_lab) as hole:
        try:
            run(scenario, timeout=150)
        except AssertionError as e:
            raise AssertionError(f"{e}\npath: {hole.report()}\nserver log tail:\n{server.log_tail(60)}") from None
        path = hole.report()
        dropped = hole.counters()

    t0, t_open = out["t0"], out["t_open"]
    lines = ["UDP and ICE-TCP die mid-call:", "  before the blackhole:", *out["before"],
             f"  server ICE-TCP before the blackhole: {out['tcp_before']}",
             f"  server ladder: ice_fallbacks_total first rose {out['ladder_s']:.2f}s after the blackhole "
             f"(+{out['fallbacks']}); TCP reopened at {t_open - t0:.2f}s",
             "  after:"]
    no_udp_remote, wrong = [], []
    for who, rep in out["reps"].items():
        lines += describe_ice(who, rep)
        if any(r.startswith("udp") for v in rep.values() for r in v["remote"]):
            no_udp_remote.append(who)
        if not rep or selected_protocols(rep) != {("tcp", "tcp")}:
            wrong.append(who)
    for who, (s0, s1) in out["sids"].items():
        lines.append(f"  {who}: participant sid {s0} -> {s1}, connected={out['connected'][who]}")
    for rx, tx, gap, n in out["frames"]:
        if gap:
            lines.append(f"  {rx} <- {tx}: blackhole -> first new decoded frame {gap[1] - t0:.2f}s, "
                         f"TCP reopened -> first new decoded frame {gap[1] - t_open:.2f}s; "
                         f"{n} frames since TCP reopened")
        else:
            lines.append(f"  {rx} <- {tx}: no frame decoded after the blackhole")
    lines += [f"  path: {path}", "  timeline:", out["timeline"]]
    report = "\n".join(lines)
    print(report)
    # UDP is what the clients were using: its loss must show. Whether a
    # client dials ICE-TCP before the server's Leave varies; TCP drops are
    # reported above, the TCP rule being in place is what stops recovery.
    assert dropped["udp_to_server"] > 0, (
        f"the blackhole should have dropped the clients' UDP:\n{report}")
    assert out["fallbacks"] >= 1, f"the server's ladder should have acted:\n{report}"
    assert all(any(r.startswith("udp") for r in rs) for rs in out["remote_before"].values()), (
        f"before the blackhole the server's answers should carry UDP candidates:\n{report}")
    assert all(out["connected"].values()), f"both clients should be connected at the end:\n{report}"
    assert all(s0 != s1 for s0, s1 in out["sids"].values()), (
        f"both clients should have rejoined (new participant sid) by themselves:\n{report}")
    assert out["recovered"] and not wrong, (
        f"within {RECOVERY_TIMEOUT_S:.0f}s of TCP reopening, both clients should be on tcp pairs and decode "
        f">= {NEW_FRAMES} new frames of each other's video (not: {', '.join(wrong) or '-'}):\n{report}")
    assert not no_udp_remote, (
        f"the rejoined sessions ({', '.join(no_udp_remote)}) should have no UDP remote candidate "
        f"(the server's tcp rung):\n{report}")
    server.assert_alive()
