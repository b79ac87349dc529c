"""Helpers for driving Moselle with the real LiveKit Python SDK (livekit 1.2.x).

Everything here runs inside one asyncio loop per test (see `run`): each participant is
an rtc.Room in the same process. Synthetic media:
  * audio: 48 kHz mono sine, 10 ms frames, paced in real time;
  * video: I420 frames whose luma gradient shifts every frame and whose chroma (U, V) is a
    constant chosen per publisher, so receivers can tell publishers apart by colour.
Receivers decode everything they subscribe to (rtc.VideoStream / rtc.AudioStream) and keep
per-track statistics (frame count, size, chroma; audio RMS and dominant frequency).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from livekit import api, rtc

API_KEY = "devkey"
API_SECRET = "secret"

log = logging.getLogger("moselle.tests")

SAMPLE_RATE = 48000
AUDIO_FRAME_MS = 10
SAMPLES_PER_FRAME = SAMPLE_RATE * AUDIO_FRAME_MS // 1000
SINE_AMPLITUDE = 0.3  # of full scale: RMS ~ 6950 in int16
LOUD_RMS = 1000.0  # a 10 ms frame above this counts as "not silent" (silence/CNG is << 100)
FREQ_WINDOW_SAMPLES = SAMPLE_RATE  # 1 s of loud audio -> 1 Hz FFT bins


# --------------------------------------------------------------------------- tokens / misc


def make_token(
    identity: str,
    room: str,
    *,
    api_key: str = API_KEY,
    api_secret: str = API_SECRET,
    name: Optional[str] = None,
    **grants: Any,
) -> str:
    """Mint a standard LiveKit access token (room_join for `room`)."""
    video = api.VideoGrants(room_join=True, room=room, **grants)
    tok = api.AccessToken(api_key, api_secret).with_identity(identity).with_grants(video)
    if name:
        tok = tok.with_name(name)
    return tok.to_jwt()


def unique_room(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def run(coro_fn: Callable[[], Any], timeout: float) -> Any:
    """Run `coro_fn()` in a fresh event loop with an overall timeout (no test may hang)."""

    async def main() -> Any:
        try:
            return await asyncio.wait_for(coro_fn(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"test scenario did not finish within {timeout:.0f}s") from None

    return asyncio.run(main())


async def wait_until(pred: Callable[[], bool], timeout: float, describe: Callable[[], str]) -> None:
    """Poll `pred` every 50 ms; on timeout fail with `describe()`."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s: {describe()}")
        await asyncio.sleep(0.05)


def _describe_arg(a: Any) -> str:
    if isinstance(a, rtc.Participant):
        return f"participant({a.identity})"
    if isinstance(a, rtc.TrackPublication):
        return f"pub({a.sid},{rtc.TrackKind.Name(a.kind)},{rtc.TrackSource.Name(a.source)})"
    if isinstance(a, rtc.Track):
        return f"track({a.sid})"
    if isinstance(a, list):
        return "[" + ",".join(_describe_arg(x) for x in a) + "]"
    return repr(a)


# --------------------------------------------------------------------------- event log


ROOM_EVENTS = (
    "participant_connected",
    "participant_disconnected",
    "track_published",
    "track_unpublished",
    "track_subscribed",
    "track_unsubscribed",
    "track_subscription_failed",
    "track_muted",
    "track_unmuted",
    "active_speakers_changed",
    "connection_state_changed",
    "connected",
    "disconnected",
    "reconnecting",
    "reconnected",
)


@dataclass
class RecordedEvent:
    t: float
    name: str
    args: tuple


class EventLog:
    """Records every room event from before connect on, so no wait can miss one."""

    def __init__(self, owner: str, room: rtc.Room) -> None:
        self.owner = owner
        self.events: list[RecordedEvent] = []
        self._changed = asyncio.Event()
        for name in ROOM_EVENTS:
            room.on(name, self._recorder(name))

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            self.events.append(RecordedEvent(time.monotonic(), name, args))
            self._changed.set()

        return record

    def summary(self, last: int = 25) -> str:
        evs = self.events[-last:]
        if not evs:
            return "(no events)"
        return "; ".join(f"{e.name}({', '.join(_describe_arg(a) for a in e.args)})" for e in evs)

    def mark(self) -> int:
        """Index to pass as `since` to wait only for events after now."""
        return len(self.events)

    def find(self, name: str, pred: Callable[..., bool] = lambda *a: True) -> Optional[RecordedEvent]:
        for e in self.events:
            if e.name == name and pred(*e.args):
                return e
        return None

    async def wait_for(
        self,
        name: str,
        pred: Callable[..., bool] = lambda *a: True,
        timeout: float = 10.0,
        what: str = "",
        since: int = 0,
    ) -> RecordedEvent:
        """Wait for (or find already recorded) an event `name` whose args satisfy `pred`;
        `since` skips the events recorded before that index (see `mark`)."""
        deadline = time.monotonic() + timeout
        idx = since
        while True:
            while idx < len(self.events):
                e = self.events[idx]
                idx += 1
                if e.name == name and pred(*e.args):
                    return e
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.owner}: no '{name}' event {what} within {timeout:.0f}s; "
                    f"events seen: {self.summary()}"
                )
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


# --------------------------------------------------------------------------- receive side


@dataclass
class VideoStats:
    identity: str
    track_sid: str
    subscribed_at: float
    frames: int = 0
    first_frame_at: Optional[float] = None
    width: int = 0
    height: int = 0
    sizes: set = field(default_factory=set)
    chroma: Optional[tuple[float, float]] = None  # mean (U, V) of a recent frame
    ended: bool = False
    error: Optional[str] = None

    def describe(self) -> str:
        ch = f"({self.chroma[0]:.0f},{self.chroma[1]:.0f})" if self.chroma else "-"
        return (
            f"video from {self.identity} {self.track_sid}: {self.frames} frames, "
            f"last {self.width}x{self.height}, sizes {sorted(self.sizes)}, chroma UV {ch}"
            + (", stream ended" if self.ended else "")
            + (f", error {self.error}" if self.error else "")
        )


@dataclass
class AudioStats:
    identity: str
    track_sid: str
    subscribed_at: float
    frames: int = 0
    samples: int = 0
    loud_samples: int = 0
    first_loud_at: Optional[float] = None
    max_rms: float = 0.0
    last_rms: float = 0.0
    sample_rate: int = 0
    peak_hz: Optional[float] = None
    _window: list = field(default_factory=list)
    _window_len: int = 0
    ended: bool = False
    error: Optional[str] = None

    def loud_seconds(self) -> float:
        return self.loud_samples / float(self.sample_rate or SAMPLE_RATE)

    def describe(self) -> str:
        pk = f"{self.peak_hz:.0f} Hz" if self.peak_hz is not None else "-"
        return (
            f"audio from {self.identity} {self.track_sid}: {self.frames} frames, "
            f"{self.loud_seconds():.2f}s above RMS {LOUD_RMS:.0f}, max RMS {self.max_rms:.0f}, "
            f"last RMS {self.last_rms:.0f}, peak {pk}"
            + (", stream ended" if self.ended else "")
            + (f", error {self.error}" if self.error else "")
        )


def dominant_frequency(samples: np.ndarray, sample_rate: int) -> float:
    x = samples.astype(np.float64)
    x = x - x.mean()
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1.0 / sample_rate)
    spec[freqs < 50] = 0.0
    return float(freqs[int(np.argmax(spec))])


class MediaProbe:
    """Decodes every track a room subscribes to and keeps per-track statistics."""

    def __init__(self, owner: str, room: rtc.Room) -> None:
        self.owner = owner
        self.video: dict[str, VideoStats] = {}
        self.audio: dict[str, AudioStats] = {}
        self._tasks: set[asyncio.Task] = set()
        room.on("track_subscribed", self._on_subscribed)

    def _on_subscribed(self, track: rtc.Track, pub: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant) -> None:
        now = time.monotonic()
        if isinstance(track, rtc.RemoteVideoTrack):
            st = VideoStats(p.identity, pub.sid, now)
            self.video[pub.sid] = st
            coro = self._consume_video(track, st)
        elif isinstance(track, rtc.RemoteAudioTrack):
            st2 = AudioStats(p.identity, pub.sid, now)
            self.audio[pub.sid] = st2
            coro = self._consume_audio(track, st2)
        else:
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def video_from(self, identity: str) -> list[VideoStats]:
        return [v for v in self.video.values() if v.identity == identity]

    def audio_from(self, identity: str) -> list[AudioStats]:
        return [a for a in self.audio.values() if a.identity == identity]

    async def _consume_video(self, track: rtc.RemoteVideoTrack, st: VideoStats) -> None:
        stream = rtc.VideoStream(track, format=rtc.VideoBufferType.I420, capacity=30)
        try:
            async for ev in stream:
                f = ev.frame
                st.frames += 1
                if st.first_frame_at is None:
                    st.first_frame_at = time.monotonic()
                st.width, st.height = f.width, f.height
                st.sizes.add((f.width, f.height))
                if st.frames % 10 == 1 and f.type == rtc.VideoBufferType.I420:
                    w, h = f.width, f.height
                    cw, chh = (w + 1) // 2, (h + 1) // 2
                    buf = np.frombuffer(f.data, dtype=np.uint8)
                    u = buf[w * h : w * h + cw * chh]
                    v = buf[w * h + cw * chh : w * h + 2 * cw * chh]
                    st.chroma = (float(u.mean()), float(v.mean()))
            st.ended = True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # keep the test's own assertion as the failure
            st.error = repr(e)
            log.exception("%s: video consumer failed", self.owner)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.aclose(), 3)

    async def _consume_audio(self, track: rtc.RemoteAudioTrack, st: AudioStats) -> None:
        stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1, capacity=200)
        try:
            async for ev in stream:
                f = ev.frame
                st.frames += 1
                st.samples += f.samples_per_channel
                st.sample_rate = f.sample_rate
                x = np.frombuffer(f.data, dtype=np.int16)
                if f.num_channels > 1:
                    x = x.reshape(-1, f.num_channels)[:, 0]
                if x.size == 0:
                    continue
                rms = float(np.sqrt(np.mean(np.square(x.astype(np.float64)))))
                st.last_rms = rms
                st.max_rms = max(st.max_rms, rms)
                if rms > LOUD_RMS:
                    st.loud_samples += x.size
                    if st.first_loud_at is None:
                        st.first_loud_at = time.monotonic()
                    if st.peak_hz is None:
                        st._window.append(x.copy())
                        st._window_len += x.size
                        if st._window_len >= FREQ_WINDOW_SAMPLES:
                            st.peak_hz = dominant_frequency(np.concatenate(st._window), f.sample_rate)
                            st._window = []
            st.ended = True
        except asyncio.CancelledError:
            raise
        except Exception as e:
            st.error = repr(e)
            log.exception("%s: audio consumer failed", self.owner)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.aclose(), 3)

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)


# --------------------------------------------------------------------------- send side


def sine_frames(freq_hz: float, amplitude: float = SINE_AMPLITUDE):
    """Endless generator of 10 ms mono int16 sine frames with continuous phase."""
    n = 0
    idx = np.arange(SAMPLES_PER_FRAME, dtype=np.float64)
    while True:
        t = (n * SAMPLES_PER_FRAME + idx) / SAMPLE_RATE
        s = np.round(amplitude * 32767.0 * np.sin(2.0 * math.pi * freq_hz * t)).astype(np.int16)
        n += 1
        yield rtc.AudioFrame(bytearray(s.tobytes()), SAMPLE_RATE, 1, SAMPLES_PER_FRAME)


async def feed_audio(source: rtc.AudioSource, freq_hz: float, amplitude: float = SINE_AMPLITUDE) -> None:
    """Feed a sine in real time (at most ~60 ms ahead of the wall clock) until cancelled."""
    start = time.monotonic()
    for n, frame in enumerate(sine_frames(freq_hz, amplitude)):
        await source.capture_frame(frame)
        ahead = start + (n + 1) * AUDIO_FRAME_MS / 1000.0 - time.monotonic()
        if ahead > 0.06:
            await asyncio.sleep(ahead - 0.04)


class MovingPattern:
    """I420 frames: luma diagonal gradient that shifts each frame, constant chroma (U, V)."""

    def __init__(self, width: int, height: int, chroma: tuple[int, int]) -> None:
        self.width, self.height = width, height
        y = np.arange(height, dtype=np.uint32)[:, None]
        x = np.arange(width, dtype=np.uint32)[None, :]
        self._base = ((x + y) % 256).astype(np.uint8)
        cw, ch = (width + 1) // 2, (height + 1) // 2
        self._uv = bytes([chroma[0]]) * (cw * ch) + bytes([chroma[1]]) * (cw * ch)
        self.n = 0

    def next_frame(self) -> rtc.VideoFrame:
        shift = (self.n * 5) % 256
        self.n += 1
        luma = self._base + np.uint8(shift)  # uint8 arithmetic wraps around
        # a bright square that moves across the picture as well
        s = max(8, self.height // 8)
        x0 = (self.n * 8) % max(1, self.width - s)
        luma[self.height // 3 : self.height // 3 + s, x0 : x0 + s] = 235
        data = bytearray(luma.tobytes())
        data += self._uv
        return rtc.VideoFrame(self.width, self.height, rtc.VideoBufferType.I420, data)


async def feed_video(source: rtc.VideoSource, pattern: MovingPattern, fps: float) -> None:
    period = 1.0 / fps
    start = time.monotonic()
    n = 0
    while True:
        frame = pattern.next_frame()
        source.capture_frame(frame, timestamp_us=int((time.monotonic() - start) * 1e6))
        n += 1
        delay = start + n * period - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)


# --------------------------------------------------------------------------- participant


def _close_late_room(room: rtc.Room):
    """A done-callback for a connect given up on: disconnect its room if it joined after all."""
    def done(t: asyncio.Future) -> None:
        if not t.cancelled() and t.exception() is None:
            asyncio.ensure_future(room.disconnect())
    return done


class Client:
    """One participant: an rtc.Room plus its event log, media probe and media feeders.

    Use as `async with Client("A") as a:`; exiting always stops feeders and disconnects.
    """

    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.room = rtc.Room()
        self.events = EventLog(identity, self.room)
        self.probe = MediaProbe(identity, self.room)
        self._feeders: list[asyncio.Task] = []
        self._sources: list[Any] = []
        self.audio_track: Optional[rtc.LocalAudioTrack] = None
        self.video_track: Optional[rtc.LocalVideoTrack] = None
        self.audio_pub: Optional[rtc.LocalTrackPublication] = None
        self.video_pub: Optional[rtc.LocalTrackPublication] = None
        self.audio_freq: Optional[float] = None
        self.video_chroma: Optional[tuple[int, int]] = None

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def connect(self, url: str, token: str, timeout: float = 15.0, **options: Any) -> None:
        opts = rtc.RoomOptions(auto_subscribe=True, **options)
        # Room.connect must never be cancelled: the SDK (livekit 1.2.1) then
        # never tells its FFI core it is ready for room events, and the core
        # panics 15 s later, which the SDK answers by SIGTERMing its own
        # process (livekit/python-sdks#784). On a timeout the connect runs on
        # in the background and its room is closed once it returns.
        task = asyncio.ensure_future(self.room.connect(url, token, opts))
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            task.add_done_callback(_close_late_room(self.room))
            raise AssertionError(f"{self.identity}: Room.connect({url}) did not finish within {timeout:.0f}s") from None
        except rtc.ConnectError as e:
            raise AssertionError(f"{self.identity}: Room.connect({url}) failed: {e.message}") from None

    async def publish_audio(
        self, freq_hz: float, timeout: float = 15.0, amplitude: float = SINE_AMPLITUDE
    ) -> rtc.LocalTrackPublication:
        source = rtc.AudioSource(SAMPLE_RATE, 1)
        self._sources.append(source)
        track = rtc.LocalAudioTrack.create_audio_track(f"{self.identity}-mic", source)
        self._start(feed_audio(source, freq_hz, amplitude))
        opts = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        pub = await self._publish(track, opts, "audio", timeout)
        self.audio_track, self.audio_pub, self.audio_freq = track, pub, freq_hz
        return pub

    async def publish_video(
        self,
        width: int,
        height: int,
        fps: float,
        simulcast: bool,
        chroma: tuple[int, int] = (90, 200),
        timeout: float = 15.0,
        codec: "rtc.VideoCodec.ValueType" = rtc.VideoCodec.VP8,
    ) -> rtc.LocalTrackPublication:
        source = rtc.VideoSource(width, height)
        self._sources.append(source)
        track = rtc.LocalVideoTrack.create_video_track(f"{self.identity}-cam", source)
        self._start(feed_video(source, MovingPattern(width, height, chroma), fps))
        opts = rtc.TrackPublishOptions(
            source=rtc.TrackSource.SOURCE_CAMERA,
            simulcast=simulcast,
            video_codec=codec,
        )
        pub = await self._publish(track, opts, "video", timeout)
        self.video_track, self.video_pub, self.video_chroma = track, pub, chroma
        return pub

    async def _publish(self, track: Any, opts: rtc.TrackPublishOptions, what: str, timeout: float):
        try:
            return await asyncio.wait_for(self.room.local_participant.publish_track(track, opts), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.identity}: publish_track({what}) did not finish within {timeout:.0f}s") from None
        except Exception as e:
            raise AssertionError(f"{self.identity}: publish_track({what}) failed: {e!r}") from None

    def _start(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)

        def done(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("%s: media feeder failed: %r", self.identity, t.exception())

        task.add_done_callback(done)
        self._feeders.append(task)

    def stop_feeders(self) -> None:
        for t in self._feeders:
            t.cancel()

    async def disconnect(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.room.disconnect(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.identity}: Room.disconnect() did not finish within {timeout:.0f}s") from None

    async def aclose(self) -> None:
        """Best-effort teardown; never raises, never blocks for long."""
        self.stop_feeders()
        if self._feeders:
            await asyncio.wait(self._feeders, timeout=3)
        with contextlib.suppress(Exception):
            await self.probe.aclose()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.room.disconnect(), 5)
        for s in self._sources:
            with contextlib.suppress(Exception):
                await s.aclose()
        self._sources.clear()
