"""The offline render: one session whose audio arrives at once and whose output is not paced.

:class:`Renderer` is what :func:`avatar.render.render` and ``avatar run`` use.
It runs the same stages as a live session (:mod:`.session`), on a scheduler
of its own, with no idle frames; the sinks are written on the calling thread,
so Ctrl-C lands there and every sink is closed (``aborted=True``) — a file
sink finalises a playable file. A real-time sink (``Sink.realtime``, e.g.
``rtmp``) makes the render paced: frames are then skipped before inference
when the machine is slower than real time, so the stream keeps its picture.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Iterator, Sequence

from ..compose import model_batch
from ..contract import ModelContract, check_feature_match
from ..errors import AvatarError, ConfigError
from ..interfaces import Backend, FeatureSource, Sink
from .pacing import REALTIME, Clock
from .scheduler import InferenceScheduler
from .session import Session, SessionOptions
from .stages import RenderReport, _pcm_chunks, _Stop

log = logging.getLogger(__name__)


@dataclass
class RenderOptions:
    """Engine options that are not plugin options."""

    batch_size: int = 8
    #: the look-ahead: batches in flight between the features and the sinks (beyond it the audio waits as PCM)
    queue_batches: int = 3
    progress: bool = False
    frame_limit: int | None = None
    #: how long a started batch waits for more frames before running partial (live input)
    flush_s: float = 0.02
    #: model output to pixels: ``nearest`` or ``truncate`` (the spec's), see vision.output_to_uint8
    output_rounding: str = "nearest"
    #: walk position of output frame 0 (1: upstream SyncTalk_2D's ping-pong start, for frame-by-frame comparison)
    walk_start: int = 0
    #: pace the output on a real-time clock; None: when any sink is real-time (``Sink.realtime``)
    paced: bool | None = None
    #: the clock a paced render runs on (tests and simulations may run it faster)
    clock: Clock = field(default=REALTIME, repr=False)


class Renderer:
    """One render: an avatar, a model on a backend, a feature source, sinks.

    Construct, then :meth:`run` with the audio. The caller owns nothing after
    ``run`` returns: the backend, the feature source and the sinks are closed.
    """

    def __init__(
        self,
        package: Any,
        backend: Backend,
        contract: ModelContract,
        source: FeatureSource,
        sinks: Sequence[Sink],
        options: RenderOptions | None = None,
        *,
        backend_name: str = "?",
    ) -> None:
        self.package = package
        self.backend = backend
        self.contract = contract
        self.source = source
        self.sinks = list(sinks)
        self.options = options or RenderOptions()
        self.backend_name = backend_name
        if self.options.batch_size < 1:
            raise ConfigError("batch size must be at least 1")
        if self.options.walk_start < 0:
            raise ConfigError(f"walk_start must be >= 0, got {self.options.walk_start}")
        check_feature_match(contract, source.name, tuple(source.window_shape))
        # a fixed-batch model runs at its own batch (partial batches padded), as in a live service
        self.options = replace(self.options, batch_size=model_batch(contract, self.options.batch_size))

    @property
    def paced(self) -> bool:
        """Whether output goes out on a real-time clock (a real-time sink is among the sinks)."""
        if self.options.paced is not None:
            return self.options.paced
        return any(getattr(s, "realtime", False) for s in self.sinks)

    def run(self, audio: Any) -> RenderReport:
        """Render ``audio``: a path or :class:`~avatar.audio.AudioFile` (decoded chunk by chunk as the
        render goes), a float32 array at 16 kHz, or an iterable of chunks."""
        rate = self.source.sample_rate
        fps = Fraction(self.source.fps)
        opts = self.options
        interrupted: int | None = None  # the signal that interrupted the run
        start = time.perf_counter()
        error: BaseException | None = None
        bar: _Progress | None = None
        session: Session | None = None
        scheduler: InferenceScheduler | None = None
        intake: threading.Thread | None = None
        first: list[float] = []
        signals = _InterruptSignals()
        try:
            exact = getattr(self.source, "exact_streaming", True)
            # a file is decoded as the render takes its chunks (memory does not grow with its length)
            chunks, samples, whole = _pcm_chunks(audio, rate, exact=exact)
            if whole is not None and not exact:
                # chunked extraction only approximates this source's offline result: one push
                chunks = iter([whole]) if len(whole) else iter([])
            # the source knows what it yields: precomputed rows need not match the audio
            expected = self.source.expected_frames(samples)
            if expected is not None and opts.frame_limit is not None:
                expected = min(expected, opts.frame_limit)
            scheduler = InferenceScheduler(
                self.backend, self.contract, batch_size=opts.batch_size, max_wait_s=opts.flush_s, clock=opts.clock
            )
            if self.paced:
                scheduler.warm()  # a real-time stream must not start on first-call costs
            session = Session(
                self.package, self.source, scheduler, self.sinks,
                SessionOptions(idle="none", paced=self.paced, walk_start=opts.walk_start,
                               lookahead_frames=(max(1, opts.queue_batches) + 1) * opts.batch_size,
                               frame_limit=opts.frame_limit, remainder=True, clock=opts.clock,
                               output_rounding=opts.output_rounding),
                name="render", frame_count=expected,
            )
            signals.attach(session)
            session.open(output_thread=False)
            intake = threading.Thread(target=_feed, args=(session, chunks, rate), name="avatar-audio", daemon=True)
            bar = _Progress(expected, enabled=opts.progress)
            intake.start()
            first: list[float] = []

            def on_frame() -> None:
                if not first:
                    first.append(time.perf_counter() - start)
                if bar is not None:
                    bar.update(1)

            session.run_output(check=signals.check, on_frame=on_frame)
            if signals.last is not None:
                interrupted = signals.last
        except KeyboardInterrupt:
            interrupted = signals.last or signal.SIGINT
        except _Stop:
            interrupted = signals.last
        except BaseException as exc:
            error = exc
        finally:
            # Cleanup must finish even if Ctrl-C is pressed again: outputs first.
            with signals.ignored():
                if session is not None:
                    session.close(aborted=interrupted is not None or error is not None)
                    if error is None and session.error is not None:
                        error = session.error
                if bar is not None:
                    bar.close()
                # The audio intake may be blocked inside a live source that cannot be
                # interrupted: it is a daemon and is not waited for.
                if scheduler is not None:
                    scheduler.close()
                for part in (self.backend, self.source):  # each is closed even if another fails
                    try:
                        part.close()
                    except Exception as exc:
                        log.warning("closing %s failed: %s", getattr(part, "name", part), exc)
                        if error is None:
                            error = exc
        wall = time.perf_counter() - start
        if session is None:  # the run never started: nothing to report
            raise error if error is not None else KeyboardInterrupt()
        report = RenderReport(
            frames=session.frames,
            fps=fps,
            audio_s=session.audio_samples / rate,
            wall_s=wall,
            stages=session.times,
            sinks=session.reports,
            backend=self.backend_name,
            feature_source=self.source.name,
            batch_size=opts.batch_size,
            interrupted=interrupted is not None,
            first_frame_s=first[0] if first else None,
            backend_calls=self.backend.stats.calls,
            skipped=session.skipped,
            late=session.late,
            speech_frames=session.speech_frames,
        )
        if error is not None:
            with contextlib.suppress(AttributeError):  # what was done before the failure, for `avatar run --report`
                error.report = report  # type: ignore[attr-defined]
            raise error
        if interrupted is not None:
            raise RenderInterrupted(report, int(interrupted))
        if report.frames == 0:
            from ..errors import AudioError

            raise AudioError("no frames were rendered: the audio is empty or too short for one frame")
        return report


def _feed(session: Session, chunks: Iterator[Any], rate: int) -> None:
    """The audio intake: every chunk pushed at once (unpaced), then the end of the input."""
    try:
        for chunk in chunks:
            if not session.alive:
                return
            session.push_audio(chunk, rate, wait=True)  # blocks while the look-ahead is full: memory stays bounded
        session.end_input()
    except BaseException as exc:  # bad audio ends the render with its error
        session.fail(exc)


class RenderInterrupted(AvatarError):
    """The render was interrupted (Ctrl-C / SIGTERM); sinks were closed and finalised."""

    exit_code = 130

    def __init__(self, report: RenderReport, signum: int = signal.SIGINT) -> None:
        self.report = report
        self.signum = signum
        self.exit_code = 128 + int(signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        super().__init__(f"interrupted ({name}) after {report.frames} frames; outputs were finalised")


class _Progress:
    """A terminal progress bar on stderr (only when asked and stderr is a terminal)."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.bar = None
        if enabled and total and sys.stderr.isatty():
            import click

            self.bar = click.progressbar(length=total, label="rendering", file=sys.stderr, show_pos=True, show_eta=True)
            self.bar.__enter__()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class _InterruptSignals:
    """While rendering, Ctrl-C and SIGTERM ask the run to stop between frames.

    The first signal only sets a flag (and stops the session): the frame being
    written completes, so no encoded packet is lost halfway through a mux, and
    the sinks are then closed normally. A second signal raises KeyboardInterrupt
    at once (an escape hatch if a sink hangs). While outputs are being finalised
    both signals are held off. Does nothing outside the main thread, where
    signals cannot be handled.
    """

    def __init__(self) -> None:
        self.last: int | None = None
        self._session: Session | None = None
        self._main = threading.current_thread() is threading.main_thread()
        self._previous: dict[int, Any] = {}
        if not self._main:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):  # pragma: no cover - embedded interpreters
                pass

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.last is not None:
            raise KeyboardInterrupt()
        self.last = signum
        if self._session is not None:
            self._session.request_stop()

    def attach(self, session: Session) -> None:
        self._session = session

    def check(self) -> None:
        """Raise ``_Stop`` if a signal asked the run to stop."""
        if self.last is not None:
            raise _Stop()

    @contextlib.contextmanager
    def ignored(self) -> Iterator[None]:
        """Hold SIGINT/SIGTERM off during cleanup, then restore the caller's handlers."""
        if not self._main:
            yield
            return
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            yield
        finally:
            for sig, prev in self._previous.items():
                signal.signal(sig, prev)
