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
* **Bounded look-ahead.** At most ``lookahead_frames`` frames are in flight
  between the features and the sinks; audio beyond that waits as PCM (64 KB/s):
  an offline feeder blocks in :meth:`push_audio` (``wait=True``), live pushes
  never block. Memory does not grow with the length of the audio.
* **Output** (:mod:`.output`). A paced session delivers output frame ``k`` at
  ``origin + k / fps`` on its clock, from open to close, with continuous
  timestamps and audio (silence while idle); the walk never jumps.
* **Slower than real time.** Frames are skipped before inference (never
  audio): the scheduler drops a frame it cannot finish by its deadline, and a
  frame back too late is not shown; a skipped frame's tick shows the last image
  with that frame's audio.
* **Lifecycle.** :meth:`close` is idempotent and safe from any thread (also
  from a subscriber or a sink on the session's own thread). A failure wakes and
  ends every thread of the session; the output thread then closes the sinks.
  Events are delivered on the session's output thread only.
* **Offline** (``idle="none"``): no idle frames; the stream ends with the
  input. Unpaced, every frame waits for the model; paced (a real-time sink),
  the same skip rule applies.
"""

from __future__ import annotations

import collections
import logging
import math
import contextlib
import queue
import threading
import time
from fractions import Fraction
from typing import Any, Callable, Sequence

import numpy as np

from ..interfaces import FeatureSource, Sink, SinkReport, StreamInfo
from ..windows import WindowAssembler
from .events import EventStream, SessionEvent
from .intake import AudioIntake
from .output import _Output
from .pacing import Percentiles, RateWindow, Thinning
from .scheduler import InferenceScheduler, WorkItem
from .stages import StageTimes, _Stop, assemble_windows, composite_faces
from .utterance import IDLE_MODES, SessionClosed, SessionOptions, SessionStats, _Utterance

log = logging.getLogger(__name__)

#: samples the feature stage reads at a time (0.64 s at 16 kHz)
READ_SAMPLES = 10240

__all__ = ["IDLE_MODES", "Session", "SessionClosed", "SessionOptions", "SessionStats"]


class Session(_Output):
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
        self._fair_at = float("-inf")  # when the fair share was last asked for
        self.lags = Percentiles()
        self.latencies: list[float] = []
        self.added_latencies: list[float] = []
        #: the look-ahead every utterance waits for: the model's future rows plus the source's own
        self.inherent_s = (source.window_rows - source.window_before) / float(self.fps) + float(source.lookahead_s)
        #: frames in flight between the features and the sinks (the session's memory budget)
        self.lookahead = self.options.lookahead_frames or max(
            4 * scheduler.batch_size, math.ceil((scheduler.estimate_s(scheduler.batch_size) + 1.0) * float(self.fps)))
        self._frame_count = frame_count
        self._on_close = on_close
        self._wants_face = any(getattr(s, "wants_face", False) for s in self.sinks)
        self._ratio = Fraction(package.fps) / self.fps
        self._cv = threading.Condition()
        self._utts: collections.deque[_Utterance] = collections.deque(maxlen=10_000)
        self._gen = 0
        self._walk = self.options.walk_start
        self._origin = 0.0
        self._k_next = 0
        self._last: tuple[np.ndarray, int] | None = None  # last image shown and its avatar frame
        # one message per batch; at most the look-ahead is in flight, so the bound is never reached
        self._faces: queue.Queue[Any] = queue.Queue(maxsize=self.lookahead + 64)
        self._intake = AudioIntake(self.rate)
        self._push_lock = threading.Lock()
        self._subs: list[Callable[[SessionEvent], Any]] = []
        self._events: collections.deque[SessionEvent] = collections.deque(maxlen=1000)
        self._ev_lock = threading.Lock()
        self._out_thread: threading.Thread | None = None
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
        self._window_rendered = RateWindow(self.options.stats_interval_s)  # frames shown per second, O(1)
        self._idle_utt: _Utterance | None = None
        self._silent_window: np.ndarray | None = None
        self._close_lock = threading.Lock()
        self._closed = False
        self._aborted = False
        self._torn_down = False
        self._done = threading.Event()
        self._composite_s = 0.0  # running estimate of one frame's compositing

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
        self._origin = self.opened_at
        if self.options.paced:  # its start budget and every other's plan for it from now on (until _halt)
            self.scheduler.attach(self, float(self.fps))
        self.state = "idle"
        self._spawn("features", self._features)
        self._spawn("composite", self._composite)
        if output_thread:
            self._out_thread = self._spawn("output", self._output_thread)
        return self

    def _spawn(self, what: str, fn: Callable[[], None]) -> threading.Thread:
        def target() -> None:
            try:
                fn()
            except _Stop:
                pass
            except BaseException as exc:  # this session ends; the others go on
                log.debug("session %s: %s stage failed", self.name, what, exc_info=True)
                self._fail(exc)

        t = threading.Thread(target=target, name=f"avatar-{self.name}-{what}", daemon=True)
        self._threads.append(t)
        t.start()
        return t

    def _output_thread(self) -> None:
        try:
            self.run_output()
        except _Stop:
            pass
        except BaseException as exc:
            log.debug("session %s: output stage failed", self.name, exc_info=True)
            self._fail(exc)
        finally:
            self._teardown(aborted=False)  # on this thread: the sinks close and the last events go out here

    def close(self, aborted: bool = False, timeout: float = 10.0) -> dict[str, SinkReport]:
        """End the session: stop every thread, close the sinks. Returns their reports; never raises.

        Idempotent and thread-safe. Called from the session's own thread (a
        subscriber, a sink), it only asks the session to stop: the output thread
        closes the sinks when the call returns (the reports are then empty).
        """
        with self._close_lock:
            self._closed = True
            self._aborted = self._aborted or aborted
        self._halt()
        me = threading.current_thread()
        if me in self._threads:
            return self.reports
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._teardown(aborted=aborted)
        self._done.wait(max(0.0, deadline - time.monotonic()))
        return self.reports

    def _halt(self) -> None:
        """Wake and stop every thread of this session; drop its pending frames at the scheduler."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        try:
            self._faces.put_nowait(None)
        except queue.Full:
            pass
        self.scheduler.cancel(self)

    def _teardown(self, aborted: bool) -> None:
        """Close the sinks, emit ``closed``, release the shared parts (once, whoever gets here first)."""
        with self._close_lock:
            if self._torn_down:
                return
            self._torn_down = True
            self._closed = True
            aborted = aborted or self._aborted or self.error is not None
        self._halt()
        try:
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
            self._deliver_events(force=True)
        finally:
            self._done.set()
            if self._on_close is not None:
                try:
                    self._on_close(self)
                except Exception:
                    log.warning("session %s: releasing its shared parts failed", self.name, exc_info=True)
            self._release_refs()

    def _release_refs(self) -> None:
        # what a closed session still holds can point back at it (subscribers' closures, queued work items,
        # utterances): drop it so reference counting frees the session, not only the cyclic collector
        with self._cv:
            self._subs.clear()
            self._utts.clear()
            self._on_close = None
            with contextlib.suppress(queue.Empty):
                while True:
                    self._faces.get_nowait()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """close() was called (or the session ended by itself)."""
        return self._closed

    @property
    def alive(self) -> bool:
        return not self._closed and self.error is None

    # ------------------------------------------------------------------ input

    def push_audio(self, pcm: Any, sample_rate: int = 16000, *, wait: bool = False) -> None:
        """Add speech: ``[samples]`` or ``[samples, channels]``, float in [-1, 1] or int16, at any rate.

        Safe from any thread; never blocks on the model. Audio pushed while the
        session is idle starts an utterance. ``wait=True`` (an offline feeder)
        blocks while more than ``hold_s`` of audio waits for the features.
        """
        if not self.alive:
            raise SessionClosed(f"session {self.name} has ended" + (f": {self.error}" if self.error else ""))
        with self._push_lock:
            mono = self._intake.convert(pcm, sample_rate)
            utt = self._add(mono)
        if wait and utt is not None:
            hold = int(self.options.hold_s * self.rate)
            with self._cv:
                # (never while the frames made so far still wait for their audio: a source of
                # precomputed rows makes frames before the audio they belong to arrives)
                while (utt.total is None and utt.audio.unread > hold  # (total: the features are done with it)
                       and utt.audio.total >= utt.audio.bounds(utt.emitted)[1]
                       and not self._stop.is_set() and utt.gen == self._gen):
                    self._cv.wait(0.1)

    async def push_audio_async(self, pcm: Any, sample_rate: int = 16000) -> None:
        """:meth:`push_audio` for an event loop (it never blocks, so it runs inline)."""
        self.push_audio(pcm, sample_rate)

    def _add(self, mono: np.ndarray) -> _Utterance | None:
        if not len(mono):
            return None
        with self._cv:
            utt = self._utts[-1] if self._utts and not self._utts[-1].flushed else None
            if utt is None:
                utt = _Utterance(self._gen, self.rate, self.fps, self.clock.now())
                self._utts.append(utt)
            utt.audio.add(mono, self.clock.now())
            self._cv.notify_all()
        return utt

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
                self._cv.notify_all()

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
            self.scheduler.cancel(self, below_generation=self._gen)
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
            fps = self._window_rendered.rate(now)
            in_flight = sum(u.in_flight for u in self._utts)
        return SessionStats(
            state=self.state, frames=self.frames, speech_frames=self.speech_frames,
            fps=fps, skipped=self.skipped, late=self.late,
            underruns=self.underruns, position_s=cur.next_j / float(self.fps) if cur is not None else 0.0,
            **{f"{k}_s": v for k, v in self.lags.summary("lag").items()},
            latency_s=list(self.latencies), in_flight=in_flight, lookahead_frames=self.lookahead,
        )

    def _emit(self, kind: str, **kw: Any) -> None:
        """Queue an event; it is delivered on the output thread (at once when called there)."""
        ev = SessionEvent(kind=kind, session=self.name, frame=self.frames, time=self.clock.now(),
                          skipped=self.skipped, lag_s=self.lags.percentile(95), **kw)
        self._events.append(ev)
        if threading.current_thread() is self._out_thread:
            self._deliver_events()

    def _deliver_events(self, force: bool = False) -> None:
        """Call the subscribers with the queued events (the output thread, or teardown when it is gone)."""
        if not force and threading.current_thread() is not self._out_thread:
            return
        with self._ev_lock:
            while self._events:
                ev = self._events.popleft()
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
        """End this session with ``exc`` (its sinks are closed as aborted)."""
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        with self._cv:
            first = self.error is None
            if first:
                self.error = exc
            self.state = "failed"
        self._halt()  # wakes every thread of the session; the output thread then closes the sinks
        if first:
            self._emit("error", error=str(exc))

    # ------------------------------------------------------------------ features (stage)

    def _in_flight(self) -> int:
        return sum(u.in_flight for u in self._utts)

    def _next_input(self) -> tuple[_Utterance, np.ndarray | None, float]:
        """Wait for the next PCM to extract (None: the end of an utterance), within the look-ahead budget."""
        with self._cv:
            while True:
                if self._stop.is_set():
                    raise _Stop()
                utt = next((u for u in self._utts if u.total is None), None)
                if utt is not None and self._in_flight() < self.lookahead:
                    if utt.audio.unread:
                        # a source whose chunked extraction only approximates its offline result
                        # gets what has arrived in one piece (an offline render: the whole signal)
                        exact = getattr(self.source, "exact_streaming", True)
                        pcm, when = utt.audio.read(READ_SAMPLES if exact else utt.audio.unread)
                        self._cv.notify_all()  # an offline feeder may be waiting on the unread audio
                        return utt, pcm, when
                    if utt.flushed:
                        return utt, None, self.clock.now()
                self._cv.wait(0.1)

    def _wait_for_room(self) -> None:
        """Block while the look-ahead is full (frames in flight between the features and the sinks)."""
        with self._cv:
            while self._in_flight() >= self.lookahead:
                if self._stop.is_set():
                    raise _Stop()
                self._cv.wait(0.1)

    def _features(self) -> None:
        stream = None
        assembler = None
        cur: _Utterance | None = None
        limit = self.options.frame_limit
        while True:
            utt, data, pushed = self._next_input()
            if utt is not cur:
                cur, stream, assembler = utt, self.source.open_stream(), WindowAssembler(self.source)
            final = data is None
            t, c = time.perf_counter(), time.thread_time()
            pairs = assemble_windows(stream, assembler, data)  # the rows (the audio encoder) are computed here
            self.times.add("features", time.perf_counter() - t, 0, cpu_s=time.thread_time() - c)
            beyond = False
            while True:
                self._wait_for_room()
                t, c = time.perf_counter(), time.thread_time()
                j, w = next(pairs, (None, None))
                self.times.add("features", time.perf_counter() - t, int(j is not None), cpu_s=time.thread_time() - c)
                if j is None:
                    break
                if limit is not None and j >= limit:
                    beyond = True
                    break
                if j == 0:
                    utt.window0_pushed = pushed  # the push that made frame 0's window final
                self._submit(utt, j, w)
            cut = limit is not None and utt.emitted >= limit and (beyond or not final)
            if final or cut:
                with self._cv:
                    utt.cut = cut
                    utt.total = utt.emitted
                    self._cv.notify_all()
                cur = stream = assembler = None

    def _plan(self, utt: _Utterance, now: float) -> None:
        """Bind ``utt`` to its start: the walk position and tick its first frame is planned for (lock held).

        The plan is ``start budget`` after now, on the first tick the output is
        free (after the utterances before it), and the walk position the output
        reaches there — so the first speech frame continues the walk exactly.
        """
        budget = self.options.start_budget_s
        if budget is None:
            budget = self.scheduler.start_budget_s(float(self.fps)) + self._composite_allowance()
        fps = float(self.fps)
        prev = None
        for u in self._utts:
            if u is utt:
                break
            prev = u
        if prev is not None and prev.p0 is not None and prev.total is not None:
            pos_b = prev.p0 + prev.total
            start = prev.t0 if prev.t0 is not None else prev.t0_plan
            time_b = (start if start is not None else now) + prev.total / fps
        else:
            pos_b = self._walk
            time_b = self.tick_time(self._k_next)
        target = max(time_b, now + budget)
        gap = max(0, math.ceil((target - time_b) * fps - 1e-9))
        utt.t0_plan = time_b + gap / fps
        utt.p0 = pos_b + gap if self.options.idle != "none" else self._walk

    def _submit(self, utt: _Utterance, j: int, window: np.ndarray) -> None:
        paced = self.options.paced
        with self._cv:
            if utt.gen != self._gen:
                return
            utt.emitted = j + 1
            if utt.audio.total < utt.audio.bounds(j)[1]:
                self._cv.notify_all()  # a feeder holding audio back: this frame needs it
            now = self.clock.now()
            if utt.first_submit is None:
                utt.first_submit = now
                self._plan(utt, now)
            if paced and now - self._fair_at >= 0.5:  # never thinned below most of its fair share of the backend
                self._fair_at = now
                self.thinning.hold_at_least(0.8 * self.scheduler.fair_share_fps() / float(self.fps))
            thin = paced and not self.thinning.take(j)
            if thin:
                utt.skipped.add(j)
                self.skipped += 1
                self._cv.notify_all()
                return
            deadline = None
            if paced:
                start = utt.t0 if utt.t0 is not None else utt.t0_plan
                deadline = start + j / float(self.fps) - self._composite_allowance()
        self.scheduler.submit(WorkItem(self, j, window, utt.gen, deadline=deadline, skippable=j > 0, utterance=utt))

    def _composite_allowance(self) -> float:
        """What a frame needs after the model: compositing (measured) and a little slack."""
        return min(0.5 / float(self.fps), 2.0 * self._composite_s + 0.004)

    # ------------------------------------------------------------------ scheduler callbacks

    def avatar_index(self, item: WorkItem) -> int:
        utt: _Utterance = item.utterance
        with self._cv:
            if utt.p0 is None:
                utt.p0 = self._walk
            return self._walk_frame(utt.p0 + item.index)

    def _walk_frame(self, position: int) -> int:
        from ..schedule import pingpong

        return pingpong(int(position * self._ratio), int(self.package.frame_count))

    def visual_inputs(self, indices: Sequence[int]) -> np.ndarray:
        return self.package.visual_inputs(list(indices))

    def on_faces(self, items: list[WorkItem], av_idx: list[int], faces: np.ndarray, seconds: tuple[float, ...]) -> None:
        """``seconds``: wall (visual, inference) and, when measured, CPU (visual, inference) of this session's share."""
        idle = sum(1 for it in items if it.utterance is self._idle_utt) / len(items)
        for i, stage in enumerate(("visual", "inference")):
            cpu = seconds[2 + i] if len(seconds) > 2 + i else None
            for kind, part in (("speech", 1.0 - idle), ("idle", idle)):
                if part > 0:
                    self.times.add(stage, seconds[i] * part, round(len(items) * part),
                                   cpu_s=None if cpu is None else cpu * part, kind=kind)
        with self._cv:
            if self._torn_down:  # a batch that comes back after the close: nobody will take it
                return
            try:
                self._faces.put_nowait((items, av_idx, faces))
            except queue.Full:  # (the look-ahead bounds what is in flight; this is a bug, and ends this session only)
                full = True
            else:
                full = False
        if full:
            from ..errors import AvatarError

            self._fail(AvatarError(f"session {self.name}: more frames came back than its look-ahead holds"))

    def on_skipped(self, item: WorkItem) -> None:
        utt: _Utterance = item.utterance
        with self._cv:
            if utt is self._idle_utt:
                return
            if utt.gen == self._gen and item.index >= utt.next_j:  # (a frame already passed was counted late)
                utt.skipped.add(item.index)
                self.skipped += 1
                self._cv.notify_all()

    def on_failure(self, exc: BaseException) -> None:
        self._fail(exc)

    # ------------------------------------------------------------------ composite (stage)

    def _composite(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._faces.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg is None:
                return
            items, av_idx, faces = msg
            live = [(it, a, f) for it, a, f in zip(items, av_idx, faces)
                    if it.utterance.gen == self._gen or it.utterance is self._idle_utt]
            del msg, items, faces
            if not live:
                continue
            t = time.perf_counter()
            kind = "idle" if all(it.utterance is self._idle_utt for it, _, _ in live) else "speech"
            frames = composite_faces(self.package, [a for _, a, _ in live], np.stack([f for _, _, f in live]),
                                     self.times, keep_face=self._wants_face, rounding=self.options.output_rounding,
                                     kind=kind)
            per = (time.perf_counter() - t) / len(live)
            self._composite_s = per if not self._composite_s else 0.8 * self._composite_s + 0.2 * per
            with self._cv:
                for (it, a, _), (image, face, box) in zip(live, frames):
                    if it.index < it.utterance.next_j and it.utterance is not self._idle_utt:
                        continue  # too late: its tick has passed (it was counted late); not kept
                    it.utterance.ready[it.index] = (image, face, box, a)
                    if it.index == 0 and it.utterance.ready0_at is None:
                        it.utterance.ready0_at = self.clock.now()
                self._cv.notify_all()
            del live, frames
