"""A session's output: one frame per tick, the avatar walk across idle and speech, and when an utterance starts.

The walk rule: each output frame shows the walk position after the previous
one, or the same picture again (a hold); it never jumps. Idle frames advance
the walk one position per tick; an utterance is bound (when its first window
is submitted) to the walk position the output will reach at its planned start,
``start budget`` after that window; the idle walk stops one position before it
and holds there if the first frame is not ready yet, so the first speech frame
continues exactly where the idle walk is when it is shown.
"""

from __future__ import annotations

import math
import threading
import time
from fractions import Fraction
from typing import Any, Callable

import numpy as np

from ..interfaces import VideoFrame
from .pacing import wait_until
from .scheduler import WorkItem
from .stages import _Stop
from .utterance import _Utterance

_WAIT = object()


class _Output:
    """The output side of :class:`~.session.Session` (a mixin: it shares the session's state)."""

    # (set by Session.__init__)
    _cv: threading.Condition

    def run_output(self: Any, check: Callable[[], None] | None = None, on_frame: Callable[[], None] | None = None) -> None:
        """Deliver frames to the sinks until the stream ends (offline) or the session stops.

        Runs on the session's output thread, or on the caller's (offline renders:
        Ctrl-C lands there). ``check`` may raise to stop between frames.
        """
        self._out_thread = threading.current_thread()
        paced = self.options.paced
        frame_s = Fraction(1) / self.fps
        origin = self.clock.now()
        with self._cv:
            self._origin, self._k_next = origin, 0
        next_stats = origin + self.options.stats_interval_s
        k = 0
        while not self._stop.is_set():
            self._deliver_events()
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
            with self._cv:
                self._origin, self._k_next = origin, k
            if paced and now >= next_stats:
                next_stats = now + self.options.stats_interval_s
                self._emit("stats", stats=vars(self.stats()))
        self._deliver_events()

    def tick_time(self: Any, k: int) -> float:
        """Clock time of output tick ``k`` (call with the session's lock held)."""
        return self._origin + k / float(self.fps)

    def _next_frame(self: Any, k: int, due: float) -> tuple[VideoFrame, bool, float] | None:
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

    def _can_start(self: Any, utt: _Utterance) -> bool:
        if 0 not in utt.ready:
            return False
        if self.options.idle != "none" and utt.p0 is not None and self._walk < utt.p0:
            return False  # the idle walk has not reached the position the utterance was bound to
        return True

    def _start(self: Any, utt: _Utterance, k: int) -> None:
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

    def _finish(self: Any, utt: _Utterance) -> None:
        self._utts.popleft()
        if utt.started and utt.p0 is not None:
            self._walk = utt.p0 + utt.next_j
        self.state = "speaking" if self._utts and self._utts[0].started else "idle"
        self._cv.notify_all()
        if utt.total:
            self._emit("speech_ended", position_s=utt.next_j / float(self.fps))

    def _speech_frame(self: Any, utt: _Utterance, k: int, pts: Fraction, due: float) -> Any:
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
            self._cv.release()  # a source may yield rows before their audio: wait without the lock
            try:
                utt.audio.wait_for(j, self._stop)
            finally:
                self._cv.acquire()
        last = utt.total is not None and j == utt.total - 1 and not utt.cut
        share = utt.audio.take(j, last=self.options.remainder and last and utt.audio.closed)
        utt.next_j += 1
        self._cv.notify_all()  # a frame left the look-ahead: the features may go on
        entry = utt.ready.pop(j, None)
        utt.skipped.discard(j)
        if entry is None:
            return self._held(k, pts, share), False
        image, face, box, a = entry
        self._last = (image, a)
        self.speech_frames += 1
        now = self.clock.now()
        self._window_rendered.add(now)
        self.thinning.in_time()
        return VideoFrame(index=k, pts=pts, image=image, audio=share, avatar_index=a, face=face, box=box), True

    def _audio_arrived(self: Any, utt: _Utterance, j: int) -> bool:
        return utt.audio.closed or utt.audio.total >= utt.audio.bounds(j)[1]

    def _silence(self: Any, k: int) -> np.ndarray:
        per = Fraction(self.rate) / self.fps
        return np.zeros(int(round((k + 1) * per)) - int(round(k * per)), np.float32)

    def _held(self: Any, k: int, pts: Fraction, audio: np.ndarray) -> VideoFrame:
        if self._last is None:
            a = self._walk_frame(self._walk)
            self._last = (self.package.frame(a), a)
        image, a = self._last
        return VideoFrame(index=k, pts=pts, image=image, audio=audio, avatar_index=a)

    def _hold_frame(self: Any, k: int, pts: Fraction) -> VideoFrame:
        return self._held(k, pts, self._silence(k))

    def _idle_frame(self: Any, k: int, pts: Fraction, hold_before: int | None) -> VideoFrame:
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

    def _idle_through_model(self: Any, pos: int) -> np.ndarray | None:
        """The model's frame for walk position ``pos`` with silence, if it is ready; submits ahead."""
        idle = self._idle_utt
        if idle is None:
            idle = self._idle_utt = _Utterance(-1, self.rate, self.fps, self.clock.now())
            idle.p0 = 0
            idle.started = True
            idle.emitted = pos
            self._silent_window = _silent_window(self.source)
        # keep enough positions in flight ahead of the walk for one batch to come back in time
        sched = self.scheduler
        lead = max(self.options.idle_lead, math.ceil(sched.estimate_s(sched.batch_size) * float(self.fps)) + 2)
        now = self.clock.now()
        while idle.emitted <= pos + lead:
            p = idle.emitted
            idle.emitted += 1
            if p < pos:
                continue
            due = now + (p - pos) / float(self.fps) - self._composite_allowance()
            sched.submit(WorkItem(self, p, self._silent_window, -1, deadline=due, skippable=True, utterance=idle))
        for old in [p for p in idle.ready if p < pos]:
            del idle.ready[old]
        idle.skipped = {p for p in idle.skipped if p >= pos}
        entry = idle.ready.pop(pos, None)
        return None if entry is None else entry[0]


def _silent_window(source: Any) -> np.ndarray:
    """The audio window of a frame in the middle of one second of silence."""
    from ..errors import AudioError
    from ..windows import window

    rows = source.rows(np.zeros(source.sample_rate, np.float32))
    if not len(rows):
        raise AudioError(f"the {source.name} feature source yields no rows for a second of silence")
    # one window, not all of them: a source that ignores the audio (npy) answers with every row it has
    return window(rows, len(rows) // 2, padding=source.padding, before=source.window_before,
                  count=source.window_rows).reshape(source.window_shape)
