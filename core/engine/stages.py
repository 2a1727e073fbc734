"""The render engine: audio + avatar → frames → sinks, in concurrent stages.

Stages (one thread each, bounded queues between them, order kept by sequence
number)::

    features ─► batch + inference ─► compositing ─► sinks (calling thread)

* **features**: PCM chunks go through the feature source's :class:`RowStream`
  and :class:`~avatar.windows.WindowAssembler`; each frame's audio window leaves
  as soon as it is final (streaming first: an offline render is a stream whose
  audio arrives at once).
* **batch + inference**: windows are grouped into batches of ``batch_size``;
  the cached uint8 visual inputs of the scheduled avatar frames (ping-pong)
  are normalised (or passed as uint8 to a model that normalises on the device)
  and the backend runs ONE call per batch.
* **compositing**: each 320 face is pasted into its full avatar frame.
* **sinks**: frames, each with its share of the audio, go to every sink in
  order on the calling thread, so Ctrl-C lands there and every sink is closed
  (``aborted=True``) — a file sink finalises a playable file.

Memory is bounded by the queue sizes, the avatar frame store's budget and the
memory-mapped face cache.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..contract import ModelContract, check_feature_match, read_contract
from ..errors import AvatarError, ConfigError
from ..interfaces import Backend, BackendOptions, FeatureSource, Sink, SinkReport, StreamInfo, VideoFrame
from ..windows import WindowAssembler

log = logging.getLogger(__name__)

STAGES = ("features", "visual", "inference", "decode", "composite", "sink")


# --------------------------------------------------------------------------- reports


@dataclass
class StageTimes:
    """Busy time per stage (seconds) and how many items each handled."""

    seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    items: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STAGES})
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, stage: str, seconds: float, items: int = 1) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.items[stage] = self.items.get(stage, 0) + items

    def per_frame_ms(self, frames: int) -> dict[str, float]:
        return {s: 1000.0 * v / frames for s, v in self.seconds.items()} if frames else {}


@dataclass
class RenderReport:
    """What a render did and how long each part took."""

    frames: int
    fps: Fraction
    audio_s: float
    wall_s: float
    stages: StageTimes
    sinks: dict[str, SinkReport]
    backend: str
    feature_source: str
    batch_size: int
    interrupted: bool = False
    first_frame_s: float | None = None
    #: model calls the backend made (one per batch)
    backend_calls: int = 0

    @property
    def video_s(self) -> float:
        return self.frames / float(self.fps)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def realtime_factor(self) -> float:
        """Seconds of video made per second of wall time (> 1 is faster than real time)."""
        return self.video_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "fps": float(self.fps),
            "audio_s": self.audio_s,
            "video_s": self.video_s,
            "wall_s": self.wall_s,
            "frames_per_s": self.frames_per_s,
            "realtime_factor": self.realtime_factor,
            "first_frame_s": self.first_frame_s,
            "backend": self.backend,
            "feature_source": self.feature_source,
            "batch_size": self.batch_size,
            "backend_calls": self.backend_calls,
            "interrupted": self.interrupted,
            "stage_s": dict(self.stages.seconds),
            "stage_ms_per_frame": self.stages.per_frame_ms(self.frames),
            "sinks": {k: vars(v) for k, v in self.sinks.items()},
        }


# --------------------------------------------------------------------------- plumbing


class _Stop(Exception):
    """Raised inside a stage when the run is being torn down."""


_END = object()
_EMPTY = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Channel:
    """A bounded queue whose blocking calls give up when the run stops."""

    def __init__(self, size: int, stop: threading.Event) -> None:
        self.q: queue.Queue[Any] = queue.Queue(maxsize=max(0, size))
        self.stop = stop

    def put(self, item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise _Stop()
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self, timeout: float | None = None) -> Any:
        """The next item; ``_EMPTY`` if ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))
            try:
                return self.q.get(timeout=wait)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Stop() from None
                if deadline is not None and time.monotonic() >= deadline:
                    return _EMPTY


def _stage(name: str, stop: threading.Event, out: _Channel | None, fn: Callable[[], None]) -> threading.Thread:
    def target() -> None:
        try:
            fn()
        except _Stop:
            pass
        except BaseException as exc:  # forwarded to the caller's thread
            log.debug("stage %s failed", name, exc_info=True)
            if out is not None:
                try:
                    out.q.put_nowait(_Failure(exc))
                except queue.Full:
                    pass
            stop.set()
            _errors.append(exc)

    _errors: list[BaseException] = []
    t = threading.Thread(target=target, name=f"avatar-{name}", daemon=True)
    t.errors = _errors  # type: ignore[attr-defined]
    return t


# --------------------------------------------------------------------------- audio


def _pcm_chunks(audio: Any, sample_rate: int, chunk_s: float = 0.64) -> tuple[Iterator[np.ndarray], np.ndarray | None]:
    """(chunk iterator, whole signal if known) for a path, an array or an iterable of chunks."""
    if isinstance(audio, (str, Path)):
        from ..audio import load_audio

        audio = load_audio(audio, sample_rate=sample_rate)
    if isinstance(audio, np.ndarray):
        pcm = _finite(np.ascontiguousarray(audio, dtype=np.float32).reshape(-1))
        step = max(1, int(chunk_s * sample_rate))
        return (pcm[i : i + step] for i in range(0, len(pcm), step)), pcm
    return (_finite(np.asarray(c, dtype=np.float32).reshape(-1)) for c in audio), None


def _finite(pcm: np.ndarray) -> np.ndarray:
    """Refuse NaN/Inf samples: one of them poisons features and the audio encoder."""
    if not np.isfinite(pcm).all():
        from ..errors import AudioError

        bad = int((~np.isfinite(pcm)).sum())
        raise AudioError(f"the audio has {bad} NaN or infinite sample(s); clean the signal before rendering")
    return pcm


class _AudioClock:
    """PCM kept until each frame has taken its share (``sample_rate / fps`` samples).

    Audio is added by its own intake stage as it arrives, independently of
    feature extraction, so a frame never leaves before its audio (a source like
    precomputed features emits rows before the audio they belong to).
    """

    def __init__(self, sample_rate: int, fps: Fraction) -> None:
        self.rate = sample_rate
        self.fps = fps
        self._buf: list[np.ndarray] = []
        self._base = 0  # absolute sample index of the first kept sample
        self._total = 0
        self.closed = False
        self._lock = threading.Condition()

    def add(self, chunk: np.ndarray) -> None:
        with self._lock:
            self._buf.append(chunk)
            self._total += len(chunk)
            self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._lock.notify_all()

    def wait_for(self, index: int, stop: threading.Event | None = None) -> None:
        """Block until frame ``index``'s share has arrived or the audio has ended."""
        _, end = self.bounds(index)
        with self._lock:
            while self._total < end and not self.closed:
                if stop is not None and stop.is_set():
                    raise _Stop()
                self._lock.wait(0.1)

    @property
    def total(self) -> int:
        return self._total

    def bounds(self, index: int) -> tuple[int, int]:
        per = Fraction(self.rate) / self.fps
        return int(round(index * per)), int(round((index + 1) * per))

    def take(self, index: int, last: bool) -> np.ndarray:
        """Frame ``index``'s share; the last frame also takes any remainder.

        Shares are taken in index order; consumed chunks are dropped.
        """
        start, end = self.bounds(index)
        with self._lock:
            if last:
                # the last frame carries the rounding remainder (less than a share);
                # audio far beyond the last frame (features shorter than the audio) is cut
                end = max(end, min(self._total, 2 * end - start))
            # drop whole chunks before ``start``
            while self._buf and self._base + len(self._buf[0]) <= start:
                self._base += len(self._buf[0])
                self._buf.pop(0)
            parts: list[np.ndarray] = []
            pos = self._base
            for chunk in self._buf:
                if pos >= end:
                    break
                lo, hi = max(start - pos, 0), min(end - pos, len(chunk))
                if hi > lo:
                    parts.append(chunk[lo:hi])
                pos += len(chunk)
        piece = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if len(piece) < end - start and not last:
            piece = np.concatenate([piece, np.zeros(end - start - len(piece), np.float32)])
        return piece.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- engine


@dataclass
class RenderOptions:
    """Engine options that are not plugin options."""

    batch_size: int = 8
    queue_batches: int = 3
    progress: bool = False
    frame_limit: int | None = None
    #: how long a started batch waits for more frames before running partial (live input)
    flush_s: float = 0.02


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
        check_feature_match(contract, source.name, tuple(source.window_shape))
        if contract.fixed_batch is not None and self.options.batch_size != contract.fixed_batch:
            raise ConfigError(
                f"the model has a fixed batch of {contract.fixed_batch}; use --batch {contract.fixed_batch} "
                "or export it with a dynamic batch axis"
            )
        self.times = StageTimes()
        self.wants_face = any(getattr(s, "wants_face", False) for s in self.sinks)

    # -- stage bodies ------------------------------------------------------------

    def _audio_intake(self, chunks: Iterator[np.ndarray], clock: _AudioClock, out: _Channel, stop: threading.Event) -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    raise _Stop()
                clock.add(chunk)
                out.put(chunk)
        finally:
            clock.close()
        out.put(_END)

    def _features(self, inp: _Channel, out: _Channel) -> None:
        stream = self.source.open_stream()
        assembler = WindowAssembler(self.source)
        limit = self.options.frame_limit
        sent = 0

        def emit(pairs: list[tuple[int, np.ndarray]], final: bool = False) -> bool:
            """Send windows; ``final`` marks the last window of the whole stream."""
            nonlocal sent
            for k, (i, w) in enumerate(pairs):
                if limit is not None and sent >= limit:
                    return False
                out.put((i, w, final and k == len(pairs) - 1))
                sent += 1
            return True

        ended = True
        while True:
            chunk = inp.get()
            if chunk is _END:
                break
            if isinstance(chunk, _Failure):
                out.put(chunk)
                return
            t = time.perf_counter()
            rows = stream.push(chunk)
            pairs = list(assembler.push(rows)) if len(rows) else []
            self.times.add("features", time.perf_counter() - t, len(pairs))
            if not emit(pairs):
                ended = False
                break
        if ended:
            t = time.perf_counter()
            rows = stream.finish()
            pairs = list(assembler.push(rows)) + list(assembler.finish())
            self.times.add("features", time.perf_counter() - t, len(pairs))
            emit(pairs, final=True)
        out.put(_END)

    def _avatar_index(self, i: int) -> int:
        from ..schedule import pingpong

        n = self.package.frame_count
        ratio = Fraction(self.package.fps) / self.source.fps
        return pingpong(int(i * ratio), n)

    def _infer(self, inp: _Channel, out: _Channel) -> None:
        b = self.options.batch_size
        vis_name, aud_name = self.contract.visual.name, self.contract.audio.name
        # the backend may have converted the model (e.g. uint8_visual): ask it, not the file
        vis_info = next((t for t in self.backend.inputs if t.name == vis_name), self.contract.visual)
        uint8 = np.dtype(vis_info.dtype) == np.uint8
        from ..vision import normalize

        fixed = self.contract.fixed_batch
        done = False
        while not done:
            idx: list[int] = []
            wins: list[np.ndarray] = []
            lasts: list[bool] = []
            while len(idx) < b:
                # once a batch has begun, a pause in the input (live audio) sends
                # what is there rather than holding ready frames back
                item = inp.get() if not idx else inp.get(timeout=self.options.flush_s)
                if item is _EMPTY:
                    break
                if item is _END:
                    done = True
                    break
                if isinstance(item, _Failure):
                    out.put(item)
                    return
                idx.append(item[0])
                wins.append(item[1])
                lasts.append(item[2])
            if not idx:
                break
            t = time.perf_counter()
            av_idx = [self._avatar_index(i) for i in idx]
            visual = self.package.visual_inputs(av_idx)
            if not uint8:
                visual = normalize(visual)
            audio = np.stack(wins).astype(np.float32, copy=False)
            n = len(idx)
            if fixed is not None and n < fixed:  # a fixed-batch model: pad, then drop the padding
                visual = np.concatenate([visual, np.repeat(visual[-1:], fixed - n, axis=0)])
                audio = np.concatenate([audio, np.repeat(audio[-1:], fixed - n, axis=0)])
            t1 = time.perf_counter()
            self.times.add("visual", t1 - t, n)
            result = self.backend.run({vis_name: visual, aud_name: audio})
            faces = result[self.contract.output.name][:n]
            self.times.add("inference", time.perf_counter() - t1, n)
            out.put((idx, av_idx, faces, lasts))
        out.put(_END)

    def _composite(self, inp: _Channel, out: _Channel) -> None:
        from ..vision import composite, output_to_uint8

        while True:
            item = inp.get()
            if item is _END:
                break
            if isinstance(item, _Failure):
                out.put(item)
                return
            idx, av_idx, faces, lasts = item
            faces_u8 = output_to_uint8(faces)
            for i, a, face, last in zip(idx, av_idx, faces_u8, lasts):
                t = time.perf_counter()
                frame = self.package.frame(a)
                t1 = time.perf_counter()
                box = tuple(int(v) for v in self.package.boxes[a])
                image = composite(frame, box, face)
                self.times.add("decode", t1 - t)
                self.times.add("composite", time.perf_counter() - t1)
                out.put((i, a, image, face if self.wants_face else None, box, last))
        out.put(_END)

    # -- run ---------------------------------------------------------------------

    def run(self, audio: Any) -> RenderReport:
        """Render ``audio`` (path, float32 array at 16 kHz, or iterable of chunks)."""
        rate = self.source.sample_rate
        fps = Fraction(self.source.fps)
        clock = _AudioClock(rate, fps)
        stop = threading.Event()
        started: list[threading.Thread] = []
        opened: list[Sink] = []
        reports: dict[str, SinkReport] = {}
        interrupted: int | None = None  # the signal that interrupted the run
        frames = 0
        audio_out = 0
        first_frame_s = None
        start = time.perf_counter()
        error: BaseException | None = None
        bar: _Progress | None = None
        signals = _InterruptSignals(stop)
        try:
            chunks, whole = _pcm_chunks(audio, rate)
            # the source knows what it yields: precomputed rows need not match the audio
            expected = self.source.expected_frames(len(whole) if whole is not None else None)
            if expected is not None and self.options.frame_limit is not None:
                expected = min(expected, self.options.frame_limit)
            info = StreamInfo(
                width=int(self.package.width),
                height=int(self.package.height),
                fps=fps,
                sample_rate=rate,
                frame_count=expected,
                title=str(getattr(self.package, "name", "")),
            )
            qsize = self.options.queue_batches
            # audio is small and arrives at most as fast as it is read: unbounded
            q_audio = _Channel(0, stop)
            q_feat = _Channel(qsize * self.options.batch_size * 2, stop)
            q_inf = _Channel(qsize, stop)
            q_comp = _Channel(qsize * self.options.batch_size, stop)
            threads = [
                _stage("audio", stop, q_audio, lambda: self._audio_intake(chunks, clock, q_audio, stop)),
                _stage("features", stop, q_feat, lambda: self._features(q_audio, q_feat)),
                _stage("inference", stop, q_inf, lambda: self._infer(q_feat, q_inf)),
                _stage("composite", stop, q_comp, lambda: self._composite(q_inf, q_comp)),
            ]
            for s in self.sinks:
                s.open(info)
                opened.append(s)
            bar = _Progress(expected, enabled=self.options.progress)
            for t in threads:
                t.start()
                started.append(t)
            while True:
                signals.check()
                item = q_comp.get()
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                i, a, image, face, box, last = item
                clock.wait_for(i, stop)
                # only the true end of the stream takes the audio remainder
                share = clock.take(i, last=last and clock.closed)
                vf = VideoFrame(index=i, pts=Fraction(i) / fps, image=image, audio=share, avatar_index=a, face=face, box=box)
                t0 = time.perf_counter()
                for s in opened:
                    s.write(vf)
                self.times.add("sink", time.perf_counter() - t0)
                frames += 1
                audio_out += len(share)
                if first_frame_s is None:
                    first_frame_s = time.perf_counter() - start
                bar.update(1)
        except KeyboardInterrupt:
            interrupted = signals.last or signal.SIGINT
        except _Stop:
            interrupted = signals.last
        except BaseException as exc:
            error = exc
        finally:
            # Cleanup must finish even if Ctrl-C is pressed again: outputs first.
            with signals.ignored():
                stop.set()
                aborted = interrupted is not None or error is not None
                for s in opened:
                    key = s.name if s.name not in reports else f"{s.name}#{len(reports) + 1}"
                    try:
                        reports[key] = s.close(aborted=aborted)
                    except Exception as exc:  # closing must not hide the first error
                        log.warning("closing sink %s failed: %s", s.name, exc)
                        if error is None:
                            error = exc
                # The audio intake may be blocked inside a live source that cannot be
                # interrupted: it is a daemon and is not waited for.
                deadline = time.monotonic() + 5.0
                for t in started:
                    if t.name != "avatar-audio":
                        t.join(timeout=max(0.0, deadline - time.monotonic()))
                for t in started:
                    errs = getattr(t, "errors", [])
                    if errs and error is None:
                        error = errs[0]
                if bar is not None:
                    bar.close()
                self.backend.close()
                self.source.close()
        wall = time.perf_counter() - start
        if error is not None:
            raise error
        report = RenderReport(
            frames=frames,
            fps=fps,
            audio_s=audio_out / rate,
            wall_s=wall,
            stages=self.times,
            sinks=reports,
            backend=self.backend_name,
            feature_source=self.source.name,
            batch_size=self.options.batch_size,
            interrupted=interrupted is not None,
            first_frame_s=first_frame_s,
            backend_calls=self.backend.stats.calls,
        )
        if interrupted is not None:
            raise RenderInterrupted(report, int(interrupted))
        if frames == 0:
            from ..errors import AudioError

            raise AudioError("no frames were rendered: the audio is empty or too short for one frame")
        return report


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

    The first signal only sets a flag (and the run's stop event): the frame being
    written completes, so no encoded packet is lost halfway through a mux, and
    the sinks are then closed normally. A second signal raises KeyboardInterrupt
    at once (an escape hatch if a sink hangs). While outputs are being finalised
    both signals are held off. Does nothing outside the main thread, where
    signals cannot be handled.
    """

    def __init__(self, stop: threading.Event) -> None:
        self.last: int | None = None
        self._stop = stop
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
        self._stop.set()

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
