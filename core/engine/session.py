"""A session: one output stream's state, fed by streaming speech.

A session owns the audio clock, the feature stream and window assembler, the
avatar walk, the pacing and the sinks of one stream; nothing in it is shared
but the inference (an :class:`~.scheduler.InferenceScheduler`). Threads::

    push_audio ─► features ─► scheduler (shared) ─► composite ─► output ─► sinks

* **Utterances.** Audio pushed while nothing is being said starts an
  utterance; :meth:`Session.flush` ends it (its tail is rendered at once);
  :meth:`Session.interrupt` drops it. Each utterance gets a fresh feature
  stream, so its frames equal an offline render of the same audio whose walk
  starts where the utterance's does.
* **Output.** A paced session delivers output frame ``k`` at
  ``origin + k / fps`` on its clock, from open to close, with continuous
  timestamps and audio (silence while idle). Idle frames are the avatar's own
  frames continuing the same walk (no model call), or — ``idle="model"`` —
  rendered through the model with a silent window.
* **Slower than real time.** Frames are skipped before inference (never
  audio): :class:`~.pacing.Thinning` spreads the skipped frames evenly and the
  scheduler drops a frame it cannot finish by its due time. A skipped frame's
  tick shows the last image with that frame's audio.
* **Offline** (``idle="none"``): no idle frames; the stream ends with the
  input. Unpaced, every frame waits for the model; paced (a real-time sink),
  the same skip rule applies.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import AudioError, AvatarError, ConfigError
from ..interfaces import FeatureSource, Sink, SinkReport, StreamInfo, VideoFrame
from ..windows import WindowAssembler
from .events import EventStream, SessionEvent
from .intake import AudioIntake
from .pacing import REALTIME, Clock, Percentiles, Thinning, wait_until
from .scheduler import InferenceScheduler, WorkItem
from .stages import StageTimes, _AudioClock, _Stop, assemble_windows, composite_faces

log = logging.getLogger(__name__)

IDLE_MODES = ("avatar", "model", "none")


class SessionClosed(AvatarError):
    """The session has ended (closed, or failed); it takes no more audio."""


@dataclass
class SessionOptions:
    """How a session paces and idles (the service's defaults suit a live stream)."""

    #: while not speaking: the avatar's own frames, frames through the model with silence, or none (offline)
    idle: str = "avatar"
    #: deliver on a real-time clock (False: as fast as frames are made)
    paced: bool = True
    #: walk position of the first output frame (1: upstream SyncTalk_2D's start)
    walk_start: int = 0
    #: stop after this many speech frames (offline renders)
    frame_limit: int | None = None
    #: the last frame of an utterance also takes the audio after it (offline: nothing is lost)
    remainder: bool = False
    clock: Clock = REALTIME
    stats_interval_s: float = 1.0
    #: a paced utterance starts this long after its first frame is ready (slack for the frames after it)
    start_margin_s: float = 0.02
    #: how long a paced tick may wait past its due time for a frame still in the model
    grace_s: float = 0.01
    #: frames of look-ahead that idle frames through the model are submitted ahead of their tick
    idle_lead: int = 4
    #: model output to pixels: ``nearest`` or ``truncate`` (the specification's), see vision.output_to_uint8
    output_rounding: str = "nearest"

    def __post_init__(self) -> None:
        if self.output_rounding not in ("nearest", "truncate"):  # vision.ROUNDINGS, without importing OpenCV here
            raise ConfigError(f"output_rounding must be nearest or truncate, not {self.output_rounding!r}")
        if self.idle not in IDLE_MODES:
            raise ConfigError(f"idle must be one of {', '.join(IDLE_MODES)}, not {self.idle!r}")
        if self.walk_start < 0:
            raise ConfigError(f"walk_start must be >= 0, got {self.walk_start}")


@dataclass
class SessionStats:
    """A snapshot: what ``GET /v1/sessions/{id}`` shows."""

    state: str  # idle | speaking | failed | closed
    frames: int  # output frames delivered
    speech_frames: int  # frames rendered through the model and shown
    fps: float  # rendered frames shown per second over the last stats interval
    skipped: int  # frames skipped before inference
    late: int  # frames rendered but too late to show (their audio went out with the last image)
    underruns: int  # ticks when an utterance had no audio yet (the input was slower than real time)
    position_s: float  # seconds of the current utterance shown
    lag_p50_s: float = 0.0
    lag_p95_s: float = 0.0
    lag_p99_s: float = 0.0
    latency_s: list[float] = field(default_factory=list)


class _Utterance:
    def __init__(self, gen: int, rate: int, fps: Fraction, pushed_at: float) -> None:
        self.gen = gen
        self.audio = _AudioClock(rate, fps)
        self.pushed_at = pushed_at
        self.flushed = False
        self.total: int | None = None  # frames, once the features have ended
        self.emitted = 0  # windows the feature stage has produced
        self.p0: int | None = None  # walk position of frame 0
        self.t0: float | None = None  # clock time frame 0 was (or is expected to be) shown
        self.first_submit: float | None = None
        self.started = False
        self.next_j = 0
        self.ready: dict[int, tuple[np.ndarray, np.ndarray | None, tuple[int, int, int, int], int]] = {}
        self.skipped: set[int] = set()
        self.cut = False  # the frame limit ended it (its audio remainder is not rendered)
        self.ready0_at: float | None = None  # when frame 0 became ready
        self.window0_pushed: float | None = None  # when the audio that completed frame 0's window was pushed


_FLUSH = object()
_WAIT = object()
_END = object()


class Session:
    """One avatar stream. Made by :meth:`avatar.engine.AvatarService.open_session` (or an offline render)."""

    def __init__(
        self,
        package: Any,
        source: FeatureSource,
        scheduler: InferenceScheduler,
        sinks: Sequence[Sink],
        options: SessionOptions | None = None,
        *,
        name: str = "session",
        frame_count: int | None = None,
        on_close: Callable[["Session"], None] | None = None,
    ) -> None:
        self.package = package
        self.source = source
        self.scheduler = scheduler
        self.sinks = list(sinks)
        self.options = options or SessionOptions()
        self.name = name
        self.clock = self.options.clock
        self.fps = Fraction(source.fps)
        self.rate = int(source.sample_rate)
        self.times = StageTimes()
        self.thinning = Thinning(self.clock)
        self.lags = Percentiles()
        self.latencies: list[float] = []
        self.added_latencies: list[float] = []
        #: the look-ahead every utterance waits for: the model's future rows plus the source's own
        self.inherent_s = (source.window_rows - source.window_before) / float(self.fps) + float(source.lookahead_s)
        self._frame_count = frame_count
        self._on_close = on_close
        self._wants_face = any(getattr(s, "wants_face", False) for s in self.sinks)
        self._ratio = Fraction(package.fps) / self.fps
        self._cv = threading.Condition()
        self._utts: collections.deque[_Utterance] = collections.deque()
        self._gen = 0
        self._walk = self.options.walk_start
        self._last: tuple[np.ndarray, int] | None = None  # last image shown and its avatar frame
        self._in: queue.Queue[Any] = queue.Queue()
        self._faces: queue.Queue[Any] = queue.Queue()
        self._intake = AudioIntake(self.rate)
        self._push_lock = threading.Lock()
        self._subs: list[Callable[[SessionEvent], Any]] = []
        self._stop = threading.Event()
        self._input_ended = False
        self._threads: list[threading.Thread] = []
        self._opened: list[Sink] = []
        self.reports: dict[str, SinkReport] = {}
        self.error: BaseException | None = None
        self.state = "new"
        self.frames = 0
        self.speech_frames = 0
        self.skipped = 0
        self.late = 0
        self.underruns = 0
        self.audio_samples = 0
        self.first_frame_at: float | None = None
        self.opened_at = 0.0
        self._window_rendered: collections.deque[float] = collections.deque()
        self._idle_utt: _Utterance | None = None
        self._silent_window: np.ndarray | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def open(self, *, output_thread: bool = True) -> "Session":
        """Open the sinks and start the threads (``output_thread=False``: the caller runs :meth:`run_output`)."""
        info = StreamInfo(
            width=int(self.package.width), height=int(self.package.height), fps=self.fps, sample_rate=self.rate,
            frame_count=self._frame_count, title=str(getattr(self.package, "name", "")),
        )
        for s in self.sinks:
            try:
                s.open(info)
            except BaseException:
                # the sinks already open are closed now: a file sink's lock and partial file,
                # an RTMP worker process must not outlive a session that never started
                for o in reversed(self._opened):
                    try:
                        o.close(aborted=True)
                    except Exception as exc:
                        log.warning("closing sink %s after a failed open failed: %s", o.name, exc)
                self._opened.clear()
                raise
            self._opened.append(s)
        self.opened_at = self.clock.now()
        self.state = "idle"
        self._spawn("features", self._features)
        self._spawn("composite", self._composite)
        if output_thread:
            self._spawn("output", self._output_thread)
        return self

    def _spawn(self, what: str, fn: Callable[[], None]) -> None:
        def target() -> None:
            try:
                fn()
            except _Stop:
                pass
            except BaseException as exc:  # this session ends; the others go on
                log.debug("session %s: %s stage failed", self.name, what, exc_info=True)
                self._fail(exc)

        t = threading.Thread(target=target, name=f"avatar-{self.name}-{what}", daemon=True)
        t.start()
        self._threads.append(t)

    def close(self, aborted: bool = False, timeout: float = 10.0) -> dict[str, SinkReport]:
        """End the session: stop every thread, close the sinks. Returns their reports; never raises."""
        if self._closed:
            return self.reports
        self._closed = True
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._in.put(_END)
        self._faces.put(_END)
        self.scheduler.cancel(self)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        aborted = aborted or self.error is not None
        for s in self._opened:
            key = s.name if s.name not in self.reports else f"{s.name}#{len(self.reports) + 1}"
            try:
                self.reports[key] = s.close(aborted=aborted)
            except Exception as exc:  # closing must not hide the first error
                log.warning("closing sink %s failed: %s", s.name, exc)
                if self.error is None:
                    self.error = exc
        if self.state != "failed":
            self.state = "closed"
        self._emit("closed")
        if self._on_close is not None:
            self._on_close(self)
        return self.reports

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """close() was called."""
        return self._closed

    @property
    def alive(self) -> bool:
        return not self._closed and self.error is None

    # ------------------------------------------------------------------ input

    def push_audio(self, pcm: Any, sample_rate: int = 16000) -> None:
        """Add speech: ``[samples]`` or ``[samples, channels]``, float in [-1, 1] or int16, at any rate.

        Safe from any thread; never blocks on the model. Audio pushed while the
        session is idle starts an utterance.
        """
        if not self.alive:
            raise SessionClosed(f"session {self.name} has ended" + (f": {self.error}" if self.error else ""))
        with self._push_lock:
            mono = self._intake.convert(pcm, sample_rate)
            self._add(mono)

    async def push_audio_async(self, pcm: Any, sample_rate: int = 16000) -> None:
        """:meth:`push_audio` for an event loop (it never blocks, so it runs inline)."""
        self.push_audio(pcm, sample_rate)

    def _add(self, mono: np.ndarray) -> None:
        if not len(mono):
            return
        with self._cv:
            utt = self._utts[-1] if self._utts and not self._utts[-1].flushed else None
            if utt is None:
                utt = _Utterance(self._gen, self.rate, self.fps, self.clock.now())
                self._utts.append(utt)
            utt.audio.add(mono)
        self._in.put((utt, mono, self.clock.now()))

    def flush(self) -> None:
        """The utterance ended: render its tail now instead of waiting for more audio."""
        with self._push_lock:
            tail = self._intake.drain()
            if len(tail):
                self._add(tail)
            with self._cv:
                utt = self._utts[-1] if self._utts and not self._utts[-1].flushed else None
                if utt is None:
                    return
                utt.flushed = True
                utt.audio.close()
            self._in.put((utt, _FLUSH, self.clock.now()))

    def end_input(self) -> None:
        """No more audio will come (offline): the stream ends after the last utterance."""
        self.flush()
        with self._cv:
            self._input_ended = True
            self._cv.notify_all()

    def interrupt(self) -> float:
        """Barge-in: drop queued audio and frames not yet shown; idle within 2 frames.

        Returns the seconds of the current utterance that were shown.
        """
        with self._push_lock:
            self._intake.reset()
            with self._cv:
                cur = self._utts[0] if self._utts and self._utts[0].started else None
                shown = cur.next_j / float(self.fps) if cur is not None else 0.0
                if cur is not None and cur.p0 is not None:
                    self._walk = cur.p0 + cur.next_j
                had = bool(self._utts)
                self._utts.clear()
                self._gen += 1
                if self.state == "speaking":  # the output is idle from the next tick
                    self.state = "idle"
                self._cv.notify_all()
            self.scheduler.cancel(self)
            self._in.put(("interrupt", self._gen))
        if had:
            self._emit("interrupted", position_s=shown)
        return shown

    # ------------------------------------------------------------------ events and stats

    def subscribe(self, fn: Callable[[SessionEvent], Any]) -> Callable[[], None]:
        """Call ``fn(event)`` for every event (on the session's output thread: keep it short).

        Returns a function that unsubscribes.
        """
        self._subs.append(fn)
        return lambda: self._subs.remove(fn) if fn in self._subs else None

    def events(self, maxsize: int = 1000) -> EventStream:
        """The events as an async iterator for an asyncio server (call it on the event loop).

        It subscribes at once, so nothing emitted after this call is missed; it
        ends after ``closed``. A consumer that falls ``maxsize`` events behind
        loses the oldest, never blocks the stream.
        """
        return EventStream(self, maxsize)

    def stats(self) -> SessionStats:
        now = self.clock.now()
        with self._cv:
            cur = self._utts[0] if self._utts and self._utts[0].started else None
            while self._window_rendered and self._window_rendered[0] < now - self.options.stats_interval_s:
                self._window_rendered.popleft()
            rendered = len(self._window_rendered)
        return SessionStats(
            state=self.state, frames=self.frames, speech_frames=self.speech_frames,
            fps=rendered / self.options.stats_interval_s, skipped=self.skipped, late=self.late,
            underruns=self.underruns, position_s=cur.next_j / float(self.fps) if cur is not None else 0.0,
            **{f"{k}_s": v for k, v in self.lags.summary("lag").items()},
            latency_s=list(self.latencies),
        )

    def _emit(self, kind: str, **kw: Any) -> None:
        ev = SessionEvent(kind=kind, session=self.name, frame=self.frames, time=self.clock.now(),
                          skipped=self.skipped, lag_s=self.lags.percentile(95), **kw)
        for fn in list(self._subs):
            try:
                fn(ev)
            except Exception:  # a subscriber's bug must not end the stream
                log.warning("session %s: an event subscriber failed", self.name, exc_info=True)

    def request_stop(self) -> None:
        """Stop delivering frames (between frames); :meth:`close` still has to be called."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()

    def fail(self, exc: BaseException) -> None:
        """End this session with ``exc`` (its sinks are closed as aborted by :meth:`close`)."""
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._cv:
            if self.error is None:
                self.error = exc
            self.state = "failed"
            self._stop.set()
            self._cv.notify_all()
        self.scheduler.cancel(self)
        self._emit("error", error=str(exc))

    # ------------------------------------------------------------------ features (stage)

    def _features(self) -> None:
        stream = None
        assembler = None
        cur: _Utterance | None = None
        limit = self.options.frame_limit
        while not self._stop.is_set():
            msg = self._in.get()
            if msg is _END:
                return
            if isinstance(msg, tuple) and msg[0] == "interrupt":
                stream = assembler = cur = None
                continue
            utt, data, pushed = msg
            if utt.gen != self._gen:
                continue
            if utt.total is not None:  # cut by the frame limit: the rest is not rendered
                continue
            if utt is not cur:
                cur, stream, assembler = utt, self.source.open_stream(), WindowAssembler(self.source)
            t, c = time.perf_counter(), time.thread_time()
            final = data is _FLUSH
            pairs = assemble_windows(stream, assembler, None if final else data)
            self.times.add("features", time.perf_counter() - t, len(pairs), cpu_s=time.thread_time() - c)
            beyond = False
            if limit is not None:
                beyond = any(j >= limit for j, _ in pairs)
                pairs = [(j, w) for j, w in pairs if j < limit]
            for j, w in pairs:
                if j == 0:
                    utt.window0_pushed = pushed  # the push that made frame 0's window final
                self._submit(utt, j, w)
            cut = limit is not None and utt.emitted >= limit and (beyond or not final)
            if final or cut:
                with self._cv:
                    utt.cut = cut
                    utt.total = utt.emitted
                    self._cv.notify_all()

    def _submit(self, utt: _Utterance, j: int, window: np.ndarray) -> None:
        with self._cv:
            if utt.gen != self._gen:
                return
            utt.emitted = j + 1
            if utt.first_submit is None:
                utt.first_submit = self.clock.now()
            thin = self.options.paced and not self.thinning.take(j)
            if thin:
                utt.skipped.add(j)
                self.skipped += 1
                self._cv.notify_all()
                return
        self.scheduler.submit(WorkItem(self, j, window, utt.gen, skippable=j > 0, utterance=utt))

    # ------------------------------------------------------------------ scheduler callbacks

    def deadline(self, item: WorkItem) -> float | None:
        if not self.options.paced:
            return None
        utt: _Utterance = item.utterance
        if utt is self._idle_utt:
            return self.clock.now() + (item.index - self._walk) / float(self.fps)
        if utt.gen != self._gen:
            return float("-inf")
        frame_s = 1.0 / float(self.fps)
        if utt.t0 is not None:
            return utt.t0 + item.index * frame_s - 0.25 * frame_s  # a quarter frame for compositing
        base = utt.first_submit if utt.first_submit is not None else self.clock.now()
        return base + self.scheduler.estimate_s(self.scheduler.batch_size) + (item.index + 1) * frame_s

    def avatar_index(self, item: WorkItem) -> int:
        utt: _Utterance = item.utterance
        with self._cv:
            if utt.p0 is None:
                if self.options.idle == "none":
                    utt.p0 = self._walk
                else:
                    # bound now, at inference: the walk position frame 0 is expected to be shown at
                    lead = math.ceil(self.scheduler.estimate_s(self.scheduler.batch_size) * float(self.fps)) + 1
                    utt.p0 = self._walk + lead
            return self._walk_frame(utt.p0 + item.index)

    def _walk_frame(self, position: int) -> int:
        from ..schedule import pingpong

        return pingpong(int(position * self._ratio), int(self.package.frame_count))

    def visual_inputs(self, indices: Sequence[int]) -> np.ndarray:
        return self.package.visual_inputs(list(indices))

    def on_faces(self, items: list[WorkItem], av_idx: list[int], faces: np.ndarray, seconds: tuple[float, ...]) -> None:
        idle = sum(1 for it in items if it.utterance is self._idle_utt) / len(items)
        for i, stage in enumerate(("visual", "inference")):
            cpu = seconds[2 + i] if len(seconds) > 2 + i else None
            self.times.add(stage, seconds[i] * (1 - idle), round(len(items) * (1 - idle)),
                           cpu_s=None if cpu is None else cpu * (1 - idle))
            if idle:
                self.times.add(stage, seconds[i] * idle, round(len(items) * idle),
                               cpu_s=None if cpu is None else cpu * idle, kind="idle")
        self._faces.put((items, av_idx, faces))

    def on_skipped(self, item: WorkItem) -> None:
        utt: _Utterance = item.utterance
        with self._cv:
            if utt is self._idle_utt:
                return
            if utt.gen == self._gen:
                self.thinning.missed()
                utt.skipped.add(item.index)
                self.skipped += 1
                self._cv.notify_all()

    def on_failure(self, exc: BaseException) -> None:
        self._fail(exc)

    # ------------------------------------------------------------------ composite (stage)

    def _composite(self) -> None:
        while not self._stop.is_set():
            msg = self._faces.get()
            if msg is _END:
                return
            items, av_idx, faces = msg
            live = [(it, a, f) for it, a, f in zip(items, av_idx, faces)
                    if it.utterance.gen == self._gen or it.utterance is self._idle_utt]
            if not live:
                continue
            kind = "idle" if all(it.utterance is self._idle_utt for it, _, _ in live) else "speech"
            frames = composite_faces(self.package, [a for _, a, _ in live], np.stack([f for _, _, f in live]),
                                     self.times, keep_face=self._wants_face, rounding=self.options.output_rounding,
                                     kind=kind)
            with self._cv:
                for (it, a, _), (image, face, box) in zip(live, frames):
                    it.utterance.ready[it.index] = (image, face, box, a)
                    if it.index == 0 and it.utterance.ready0_at is None:
                        it.utterance.ready0_at = self.clock.now()
                self._cv.notify_all()

    # ------------------------------------------------------------------ output

    def _output_thread(self) -> None:
        self.run_output()

    def run_output(self, check: Callable[[], None] | None = None, on_frame: Callable[[], None] | None = None) -> None:
        """Deliver frames to the sinks until the stream ends (offline) or the session stops.

        Runs on the session's output thread, or on the caller's (offline renders:
        Ctrl-C lands there). ``check`` may raise to stop between frames.
        """
        paced = self.options.paced
        frame_s = Fraction(1) / self.fps
        origin = self.clock.now()
        next_stats = origin + self.options.stats_interval_s
        k = 0
        while not self._stop.is_set():
            if check is not None:
                check()
            if paced:
                if not wait_until(self.clock, origin + float(k * frame_s), self._stop):
                    break
            got = self._next_frame(k, origin + float(k * frame_s))
            if got is None:
                break
            vf, speech, slip = got
            if paced and slip:
                origin += slip  # an offline stream waited for its input: the clock slips
            now = self.clock.now()
            if paced:
                self.lags.add(now - (origin + float(k * frame_s)))
            t, c = time.perf_counter(), time.thread_time()
            for s in self._opened:
                s.write(vf)
            self.times.add("sink", time.perf_counter() - t, cpu_s=time.thread_time() - c,
                           kind="speech" if speech else "idle")
            self.frames += 1
            self.audio_samples += len(vf.audio)
            if self.first_frame_at is None:
                self.first_frame_at = self.clock.now()
            if on_frame is not None:
                on_frame()
            k += 1
            if paced and now >= next_stats:
                next_stats = now + self.options.stats_interval_s
                self._emit("stats", stats=vars(self.stats()))

    def _next_frame(self, k: int, due: float) -> tuple[VideoFrame, bool, float] | None:
        """The frame for output tick ``k``: (frame, is speech, clock slip); None at the end of an offline stream.

        The slip is how long an offline stream (``idle="none"``) waited for its
        input or for its first frame; a paced stream's clock moves by it.
        """
        pts = Fraction(k) / self.fps
        live = self.options.idle != "none"
        slip = 0.0
        while True:
            with self._cv:
                if self._stop.is_set():
                    raise _Stop()
                utt = self._utts[0] if self._utts else None
                if utt is not None and utt.total is not None and utt.next_j >= utt.total:
                    self._finish(utt)
                    continue
                if utt is None:
                    if live:
                        return self._idle_frame(k, pts, hold_before=None), False, 0.0
                    if self._input_ended:
                        return None
                elif not utt.started and self._can_start(utt):
                    self._start(utt, k)
                elif not utt.started and live:
                    return self._idle_frame(k, pts, hold_before=utt.p0), False, 0.0
                if utt is not None and utt.started:
                    got = self._speech_frame(utt, k, pts, due + slip)
                    if got is _WAIT:
                        self._cv.wait(0.002 / self.clock.speed)
                        continue
                    if got is not None:
                        return got[0], got[1], slip
                    if live:
                        # the input is slower than real time: a tick of silence, the utterance waits
                        self.underruns += 1
                        if utt.t0 is not None:
                            utt.t0 += 1.0 / float(self.fps)
                        return self._hold_frame(k, pts), False, 0.0
                t = self.clock.now()
                self._cv.wait(0.05)
                waited = self.clock.now() - t
                slip += waited
                if utt is not None and utt.started and utt.t0 is not None:
                    utt.t0 += waited  # later frames are due later too

    def _can_start(self, utt: _Utterance) -> bool:
        if 0 not in utt.ready:
            return False
        if not self.options.paced or utt.ready0_at is None:
            return True
        # a little slack for the frames after the first (they travel the same pipeline)
        return self.clock.now() >= utt.ready0_at + self.options.start_margin_s

    def _start(self, utt: _Utterance, k: int) -> None:
        utt.started = True
        utt.t0 = self.clock.now()
        if utt.p0 is None:
            utt.p0 = self._walk
        self.state = "speaking"
        latency = utt.t0 - utt.pushed_at
        added = None if utt.window0_pushed is None else utt.t0 - utt.window0_pushed
        for values, v in ((self.latencies, latency), (self.added_latencies, added)):
            if v is not None:
                values.append(v)
            if len(values) > 10_000:  # bounded memory in a long session
                del values[:5000]
        self._emit("speech_started", latency_s=latency, inherent_s=self.inherent_s, added_s=added,
                   walk_position=utt.p0)

    def _finish(self, utt: _Utterance) -> None:
        self._utts.popleft()
        if utt.started and utt.p0 is not None:
            self._walk = utt.p0 + utt.next_j
        self.state = "speaking" if self._utts and self._utts[0].started else "idle"
        self._cv.notify_all()
        if utt.total:
            self._emit("speech_ended", position_s=utt.next_j / float(self.fps))

    def _speech_frame(self, utt: _Utterance, k: int, pts: Fraction, due: float) -> Any:
        j = utt.next_j
        paced = self.options.paced
        if j not in utt.ready and j not in utt.skipped:
            if not paced or j >= utt.emitted or not self._audio_arrived(utt, j):
                return None  # unpaced: wait for the model; or the input has not come yet
            if self.clock.now() < due + self.options.grace_s:
                return _WAIT  # in the model, nearly done: worth a few ms of lag
            # paced, its audio is here, and the frame is still in the model: too late to show it
            self.late += 1
            self.thinning.missed()
            utt.skipped.add(j)
        if not paced:
            utt.audio.wait_for(j, self._stop)  # a source may yield rows before their audio
        last = utt.total is not None and j == utt.total - 1 and not utt.cut
        share = utt.audio.take(j, last=self.options.remainder and last and utt.audio.closed)
        utt.next_j += 1
        entry = utt.ready.pop(j, None)
        utt.skipped.discard(j)
        if entry is None:
            return self._held(k, pts, share), False
        image, face, box, a = entry
        self._last = (image, a)
        self.speech_frames += 1
        now = self.clock.now()
        self._window_rendered.append(now)
        while self._window_rendered[0] < now - self.options.stats_interval_s:
            self._window_rendered.popleft()
        self.thinning.in_time()
        return VideoFrame(index=k, pts=pts, image=image, audio=share, avatar_index=a, face=face, box=box), True

    def _audio_arrived(self, utt: _Utterance, j: int) -> bool:
        return utt.audio.closed or utt.audio.total >= utt.audio.bounds(j)[1]

    def _silence(self, k: int) -> np.ndarray:
        per = Fraction(self.rate) / self.fps
        return np.zeros(int(round((k + 1) * per)) - int(round(k * per)), np.float32)

    def _held(self, k: int, pts: Fraction, audio: np.ndarray) -> VideoFrame:
        if self._last is None:
            a = self._walk_frame(self._walk)
            self._last = (self.package.frame(a), a)
        image, a = self._last
        return VideoFrame(index=k, pts=pts, image=image, audio=audio, avatar_index=a)

    def _hold_frame(self, k: int, pts: Fraction) -> VideoFrame:
        return self._held(k, pts, self._silence(k))

    def _idle_frame(self, k: int, pts: Fraction, hold_before: int | None) -> VideoFrame:
        """The avatar's own frame at the next walk position (held before a bound utterance start)."""
        pos = self._walk
        if hold_before is not None and pos >= hold_before:
            return self._hold_frame(k, pts)
        self._walk += 1
        a = self._walk_frame(pos)
        image = None
        if self.options.idle == "model":
            image = self._idle_through_model(pos)
        if image is None:
            t, c = time.perf_counter(), time.thread_time()
            image = self.package.frame(a)
            self.times.add("decode", time.perf_counter() - t, cpu_s=time.thread_time() - c, kind="idle")
        self._last = (image, a)
        return VideoFrame(index=k, pts=pts, image=image, audio=self._silence(k), avatar_index=a)

    # ------------------------------------------------------------------ idle through the model

    def _idle_through_model(self, pos: int) -> np.ndarray | None:
        """The model's frame for walk position ``pos`` with silence, if it is ready; submits ahead."""
        idle = self._idle_utt
        if idle is None:
            idle = self._idle_utt = _Utterance(-1, self.rate, self.fps, self.clock.now())
            idle.p0 = 0
            idle.started = True
            idle.emitted = pos
            self._silent_window = _silent_window(self.source)
        # keep enough positions in flight ahead of the walk for one batch to come back in time
        lead = max(self.options.idle_lead, math.ceil(self.scheduler.estimate_s(self.scheduler.batch_size) * float(self.fps)) + 2)
        while idle.emitted <= pos + lead:
            p = idle.emitted
            idle.emitted += 1
            if p < pos:
                continue
            self.scheduler.submit(WorkItem(self, p, self._silent_window, -1, skippable=True, utterance=idle))
        for old in [p for p in idle.ready if p < pos]:
            del idle.ready[old]
        idle.skipped = {p for p in idle.skipped if p >= pos}
        entry = idle.ready.pop(pos, None)
        return None if entry is None else entry[0]


def _silent_window(source: FeatureSource) -> np.ndarray:
    """The audio window of a frame in the middle of one second of silence."""
    from ..windows import make_windows

    rows = source.rows(np.zeros(source.sample_rate, np.float32))
    if not len(rows):
        raise AudioError(f"the {source.name} feature source yields no rows for a second of silence")
    return make_windows(rows, source)[len(rows) // 2]


def check_audio(pcm: np.ndarray) -> np.ndarray:
    if not np.isfinite(pcm).all():
        raise AudioError("the audio has NaN or infinite samples; clean the signal before pushing it")
    return pcm
