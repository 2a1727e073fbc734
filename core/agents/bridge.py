"""The adapter core: one live session as a voice agent's avatar, on an asyncio loop.

A voice agent framework hands the avatar its text-to-speech audio in segments
(one per reply), may cut a segment off (barge-in), and wants back a stream of
video frames with the audio that belongs to each, plus "this segment finished
playing, at position p, interrupted or not". :class:`AgentAvatar` is that
contract over :class:`avatar.engine.Session`; the LiveKit and Pipecat adapters
only translate frame types, so pacing, A/V sync and the event logic live here:

* **Pacing.** The session delivers frame ``k`` at ``open + k / fps`` on the
  real-time clock, idle or speaking; the stream yields them as they come.
* **A/V sync.** Every yielded :class:`AvatarFrame` carries exactly the audio
  shown with its picture (16 kHz mono int16, ``16000 / fps`` samples, cut from
  the session's own per-frame audio), so sound and picture cannot drift. A
  different output ``fps`` re-cuts that audio on the same sample counter and
  shows the picture whose audio span holds the frame's first sample.
* **Events.** :class:`SegmentEnd` follows the last speech frame of a segment in
  the stream (the session reports ``speech_ended`` on its output thread, in
  order with the frames); an interrupt yields one with ``interrupted=True``, and
  frames after it are idle (their audio silent and ``speaking`` false) — the
  session shows idle pictures within 2 frames. Its position is the segment's
  speech the consumer has taken from the stream, not what the session has
  rendered: a consumer running behind has not played the frames it holds yet.

Thread model: the session's output thread converts frames (resize, colour) and
hands them to the loop with ``call_soon_threadsafe``; everything else runs on
the loop. The stream is bounded: a consumer that falls ``queue_s`` behind loses
the oldest frames (counted in :attr:`AgentAvatar.dropped`), never the session;
one more than ``catch_up_s`` behind (a stall, or a framework whose own pacing
runs a little slow) skips idle frames until it has caught up, so a lag cannot
build up from one reply to the next.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

import numpy as np

from ..engine.session import SessionClosed
from ..errors import ConfigError
from ..interfaces import Sink, SinkReport, StreamInfo, VideoFrame

log = logging.getLogger(__name__)

PIXEL_FORMATS = ("rgb", "rgba", "bgr")


@dataclass
class AvatarOptions:
    """Which avatar an agent shows and how its frames come out."""

    #: an avatar package directory (or an opened package)
    avatar: str | Path | Any
    #: the UNet model; default: the package's
    model: str | Path | None = None
    #: the feature source (``ave``, ``hubert``, ``wenet``) and its options (``encoder``: the AVE encoder)
    features: str = "ave"
    feature_options: Mapping[str, Any] | None = None
    #: output (width, height); default: the avatar's own
    size: tuple[int, int] | None = None
    #: output frames per second; default: the model's (25); others re-time the frames on the audio clock
    fps: float | None = None
    #: ``avatar``: the avatar's own frames while idle; ``model``: idle frames through the model
    idle: str = "avatar"
    #: the most output the stream holds for a slow consumer, in seconds (beyond it the oldest frames are dropped)
    queue_s: float = 1.0
    #: a consumer further behind than this skips idle frames (never speech) until it has caught up
    catch_up_s: float = 0.08
    #: the pixel layout of :attr:`AvatarFrame.image`
    pixel_format: str = "rgb"

    def __post_init__(self) -> None:
        if self.size is not None:
            w, h = (int(v) for v in self.size)
            if w < 2 or h < 2 or w % 2 or h % 2:
                raise ConfigError(f"size must be two even numbers >= 2 (video encoders need them), got {self.size}")
            self.size = (w, h)
        if self.fps is not None and not 1 <= float(self.fps) <= 120:
            raise ConfigError(f"fps must be between 1 and 120, got {self.fps}")
        if self.idle not in ("avatar", "model"):
            raise ConfigError(f"idle must be avatar or model, not {self.idle!r}")
        if self.pixel_format not in PIXEL_FORMATS:
            raise ConfigError(f"pixel_format must be one of {', '.join(PIXEL_FORMATS)}, not {self.pixel_format!r}")
        if not self.queue_s > 0:
            raise ConfigError(f"queue_s must be positive, got {self.queue_s}")
        if not 0 < self.catch_up_s <= self.queue_s:
            raise ConfigError(f"catch_up_s must be positive and at most queue_s, got {self.catch_up_s}")


@dataclass
class AvatarFrame:
    """One output frame: its picture and the audio shown with it."""

    index: int
    pts: float  # seconds since the stream started
    image: np.ndarray  # [height, width, 3 or 4] uint8 in the stream's pixel format
    audio: np.ndarray  # int16 mono at ``sample_rate``; silent while idle
    sample_rate: int
    speaking: bool  # the audio is speech of the current segment


@dataclass
class SegmentStarted:
    """The first frame of a segment is next: ``latency_s`` from its first push, of which the model's look-ahead is ``inherent_s``."""

    latency_s: float
    inherent_s: float
    added_s: float | None
    #: when the session showed the segment's first frame (its clock: ``time.monotonic`` for live sessions)
    at: float = 0.0


@dataclass
class SegmentEnd:
    """A segment finished playing (after its last frame in the stream) or was interrupted."""

    position_s: float  # seconds of the segment's speech the consumer took from the stream
    interrupted: bool


StreamItem = AvatarFrame | SegmentStarted | SegmentEnd


class _Retimer:
    """Source frames (the session's fps) to output frames (``fps_out``) on one audio sample counter.

    Output frame ``k`` holds samples ``[round(k·rate/fps_out), round((k+1)·rate/fps_out))``
    and the picture of the source frame whose audio holds its first sample; it
    is speaking if any of those samples are speech. A segment's start is
    released before the first output frame holding any of its audio, its end
    after the last one. With ``fps_out`` equal to the session's fps
    this is the identity (the session cuts its audio the same way).
    """

    def __init__(self, rate: int, fps_out: Fraction) -> None:
        self.rate = rate
        self.fps_out = fps_out
        self.k = 0
        self.samples = 0
        self.buf = np.zeros(0, np.int16)
        self.buf_start = 0
        # bounded by the re-timing itself: every frame arrives with its own audio, and _drain emits output frames
        # as soon as the audio covers them, so these hold about one input frame (and the events between two)
        self.images: collections.deque[tuple[int, np.ndarray, bool]] = collections.deque()
        self.events: collections.deque[tuple[int, Any]] = collections.deque()

    def start(self, k: int) -> int:
        return int(round(k * self.rate / self.fps_out))

    def add_frame(self, image: np.ndarray, audio: np.ndarray, speaking: bool) -> list[Any]:
        self.images.append((self.samples, image, speaking))
        self.buf = np.concatenate([self.buf, audio]) if len(self.buf) else audio
        self.samples += len(audio)
        return self._drain()

    def add_event(self, item: Any) -> list[Any]:
        self.events.append((self.samples, item))
        return self._drain()

    def _drain(self) -> list[Any]:
        out: list[Any] = []
        while True:
            a0, a1 = self.start(self.k), self.start(self.k + 1)
            # a segment's start goes before the first frame holding any of its audio, its end after the last
            while self.events and self.events[0][0] < (a1 if isinstance(self.events[0][1], SegmentStarted) else a0 + 1):
                out.append(self.events.popleft()[1])
            if self.samples < a1 or not self.images:
                return out
            while len(self.images) > 1 and self.images[1][0] <= a0:
                self.images.popleft()
            image = self.images[0][1]
            speaking = any(sp for st, _, sp in self.images if st < a1)  # any speech in its audio span
            audio = self.buf[a0 - self.buf_start:a1 - self.buf_start]
            self.buf, self.buf_start = self.buf[a1 - self.buf_start:], a1
            out.append(AvatarFrame(self.k, float(self.k / self.fps_out), image, audio, self.rate, speaking))
            self.k += 1

    def mute(self) -> None:
        """An interrupt: what is buffered is no longer speech."""
        self.images = collections.deque((s, img, False) for s, img, _ in self.images)
        self.buf = np.zeros_like(self.buf)


class AgentAvatar:
    """One agent's avatar: push its TTS audio per segment, interrupt, iterate the frames.

    Several agents should share one :class:`~avatar.engine.AvatarService`
    (``service=``): their frames then batch on one backend. Without one, the
    avatar opens a private service with ``backend`` and closes it with itself.
    Call :meth:`start` and every other method on the event loop that iterates it.
    """

    def __init__(self, options: AvatarOptions, *, service: Any = None, backend: str = "auto",
                 name: str | None = None) -> None:
        self.options = options
        self._service = service
        self._own_service = service is None
        self._backend = backend
        self._name = name
        self.session: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fps = Fraction(0)
        self.sample_rate = 0
        self.size = (0, 0)
        self.dropped = 0  # frames a consumer lost by falling ``queue_s`` behind
        self.caught_up = 0  # idle frames skipped to catch up with a consumer behind by more than ``catch_up_s``
        self._nframes = 0
        self._catch_up = 1
        self.frames = 0  # frames handed to the consumer
        self._taken = 0  # speech samples of the current segment handed to the consumer
        self._lock = threading.Lock()
        self._gen = 0  # interrupts so far: output-thread items of an older generation are stale
        self._speaking = False
        self._retimer: _Retimer | None = None
        # bounded: _hand_over drops the oldest frames beyond ``_cap`` (queue_s of frames); events are a few per segment
        self._items: collections.deque[tuple[int, Any]] = collections.deque()
        self._cap = 1
        self._wake: asyncio.Event | None = None
        self._open_segment = False  # audio pushed since the last end_segment
        self._pending = 0  # segments ended by end_segment and not yet played out
        self._closed = False
        self._unsubscribe: Callable[[], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> "AgentAvatar":
        """Open the session (loads the avatar, the feature source and the shared backend in a thread)."""
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await asyncio.to_thread(self._open)
        return self

    def _open(self) -> None:
        from ..engine import AvatarService

        o = self.options
        if self._service is None:
            self._service = AvatarService(backend=self._backend)
        sink = _BridgeSink(self)
        s = self._service.open_session(o.avatar, sinks=[sink], features=o.features, feature_options=o.feature_options,
                                       model=o.model, idle=o.idle, name=self._name)
        self.session = s
        self.sample_rate = int(s.rate)
        self.fps = Fraction(o.fps).limit_denominator(1001) if o.fps else Fraction(s.fps)
        self.size = o.size or (int(s.package.width), int(s.package.height))
        self._cap = max(2, int(float(self.fps) * o.queue_s))
        self._catch_up = max(1, int(round(float(self.fps) * o.catch_up_s)))
        self._unsubscribe = s.subscribe(self._on_event)
        with self._lock:
            self._retimer = _Retimer(self.sample_rate, self.fps)
        if self._closed:  # aclose() (a cancelled start) came while this thread was opening: nothing may stay open
            self._close()

    async def aclose(self) -> None:
        """Close the session (and the private service, if any); the stream ends."""
        if self._closed:
            return
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        await asyncio.to_thread(self._close)
        if self._wake is not None:
            self._wake.set()

    def _close(self) -> None:
        with self._lock:
            session, self.session = self.session, None
            service = self._service if self._own_service else None
            if service is not None:
                self._service = None
        if session is not None:
            session.close()
        if service is not None:
            service.close()

    async def __aenter__(self) -> "AgentAvatar":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ input (on the loop)

    def push_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Speech of the current segment: ``[samples]`` or ``[samples, channels]``, int16 or float, any rate."""
        a = np.asarray(pcm)
        if self.session is None:
            raise SessionClosed("the avatar is not running: call `await avatar.start()` first (or it was closed)")
        if not a.size:
            return
        self.session.push_audio(a, sample_rate)
        self._open_segment = True

    def end_segment(self) -> None:
        """The segment's audio is complete: render its tail now; a :class:`SegmentEnd` follows its last frame."""
        if not self._open_segment or self.session is None:
            return
        self.session.flush()  # the session shows every segment with audio, at least one frame of it
        self._open_segment = False
        self._pending += 1

    def interrupt(self) -> float | None:
        """Barge-in: drop the rest of the segment(s). Returns the seconds of it the consumer took, or None if nothing was playing.

        Frames from now on are idle (silent, ``speaking`` false); a
        :class:`SegmentEnd` with ``interrupted=True`` is yielded first.
        """
        if self.session is None:
            return None
        had = self._open_segment or self._pending > 0
        self.session.interrupt()
        shown = self._taken / self.sample_rate  # what the consumer took: the frames it holds are muted below
        self._taken = 0
        with self._lock:
            self._gen += 1
            self._speaking = False
            if self._retimer is not None:
                self._retimer.mute()
        for i, (gen, item) in enumerate(self._items):
            if isinstance(item, AvatarFrame) and item.speaking:
                self._items[i] = (gen, _muted(item))
        self._open_segment, self._pending = False, 0
        if had:
            self._items.append((self._gen, SegmentEnd(shown, True)))
            self._wake_up()
        return shown if had else None

    @property
    def speaking(self) -> bool:
        """The avatar is showing speech now."""
        return self._speaking

    def stats(self) -> dict[str, Any]:
        """The session's figures plus the stream's (frames handed out, dropped for a slow consumer)."""
        st = vars(self.session.stats()) if self.session is not None else {}
        return {**st, "stream_frames": self.frames, "stream_dropped": self.dropped, "stream_caught_up": self.caught_up}

    # ------------------------------------------------------------------ output (async iterator)

    def __aiter__(self) -> AsyncIterator[StreamItem]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamItem]:
        wake = self._wake
        if wake is None:
            raise ConfigError("call `await avatar.start()` before iterating its frames")
        while True:
            while self._items:
                _, item = self._items.popleft()
                if isinstance(item, AvatarFrame):
                    self._nframes -= 1
                    if not item.speaking and self._nframes > self._catch_up:
                        # the consumer is behind (a stall; a framework pacing itself a little slower):
                        # catch up on idle pictures, never on speech, so the lag cannot build up
                        self.caught_up += 1
                        continue
                    self.frames += 1
                    if item.speaking:
                        self._taken += len(item.audio)
                elif isinstance(item, SegmentEnd) and not item.interrupted:
                    item, self._taken = SegmentEnd(self._taken / self.sample_rate, False), 0
                yield item
            if self._closed or (self.session is not None and not self.session.alive):
                return
            wake.clear()
            await wake.wait()

    # ------------------------------------------------------------------ from the session's output thread

    def _on_frame(self, vf: VideoFrame) -> None:
        if self._retimer is None:
            return  # the session's first frames, before open_session returned (the size is not known yet)
        image = _convert(vf.image, self.size, self.options.pixel_format)
        audio = np.clip(np.asarray(vf.audio, np.float32) * 32768.0, -32768, 32767).astype(np.int16)
        with self._lock:
            if self._retimer is None:
                return
            speaking = self._speaking
            if not speaking:
                audio = np.zeros_like(audio)  # idle, or a frame already in flight when an interrupt came
            out = self._retimer.add_frame(image, audio, speaking)
            gen = self._gen
        self._hand_over(gen, out)

    def _on_event(self, ev: Any) -> None:
        item: Any = None
        with self._lock:
            if ev.kind == "speech_started":
                self._speaking = True
                item = SegmentStarted(float(ev.latency_s or 0.0), float(ev.inherent_s or 0.0), ev.added_s, float(ev.time))
            elif ev.kind == "speech_ended":
                if not self._speaking:
                    return  # an interrupt already ended it
                self._speaking = False
                item = SegmentEnd(float(ev.position_s or 0.0), False)
            elif ev.kind in ("error", "closed"):
                item = None
            else:
                return
            out = self._retimer.add_event(item) if (item is not None and self._retimer is not None) else []
            gen = self._gen
        if item is None:  # the session ended: wake the consumer so the stream ends
            self._hand_over(gen, [])
            return
        self._hand_over(gen, out)

    def _hand_over(self, gen: int, out: list[Any]) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._put, gen, out)
        except RuntimeError:  # the loop closed meanwhile
            pass

    # ------------------------------------------------------------------ on the loop

    def _put(self, gen: int, items: list[Any]) -> None:
        for item in items:
            if gen != self._gen:
                if isinstance(item, AvatarFrame) and item.speaking:
                    item = _muted(item)
                elif isinstance(item, (SegmentStarted, SegmentEnd)) and not getattr(item, "interrupted", False):
                    continue  # of a segment the interrupt already ended
            if isinstance(item, SegmentEnd) and not item.interrupted:
                self._pending = max(0, self._pending - 1)
            self._items.append((gen, item))
            self._nframes += isinstance(item, AvatarFrame)
        while self._nframes > self._cap:
            for j, (_, i) in enumerate(self._items):
                if isinstance(i, AvatarFrame):
                    del self._items[j]
                    self._nframes -= 1
                    self.dropped += 1
                    break
        self._wake_up()

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()


class _BridgeSink(Sink):
    """The session's sink: hands every frame to its :class:`AgentAvatar`."""

    name = "agent"

    def __init__(self, owner: AgentAvatar) -> None:
        self.owner = owner
        self.count = 0

    def open(self, info: StreamInfo) -> None:
        pass

    def write(self, frame: VideoFrame) -> None:
        self.count += 1
        self.owner._on_frame(frame)

    def close(self, aborted: bool = False) -> SinkReport:
        self.owner._hand_over(self.owner._gen, [])
        return SinkReport(frames=self.count)


def _muted(f: AvatarFrame) -> AvatarFrame:
    return AvatarFrame(f.index, f.pts, f.image, np.zeros_like(f.audio), f.sample_rate, False)


def _convert(bgr: np.ndarray, size: tuple[int, int], fmt: str) -> np.ndarray:
    import cv2

    h, w = bgr.shape[:2]
    if (w, h) != tuple(size):
        shrink = size[0] < w or size[1] < h
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if fmt == "rgb":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if fmt == "rgba":
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGBA)
    return np.ascontiguousarray(bgr)
