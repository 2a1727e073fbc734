"""The stage logic every stream runs, offline or live (one copy).

Stages (threads of a :class:`~avatar.engine.session.Session`; the inference
runs on the shared :class:`~avatar.engine.scheduler.InferenceScheduler`)::

    features ─► batch + inference (shared) ─► compositing ─► sinks

* **features** (:func:`assemble_windows`): PCM chunks go through the feature
  source's :class:`RowStream` and :class:`~avatar.windows.WindowAssembler`;
  each frame's audio window leaves as soon as it is final (streaming first: an
  offline render is a stream whose audio arrives at once).
* **batch + inference**: windows are grouped into batches; the cached uint8
  visual inputs of the scheduled avatar frames (ping-pong) are normalised (or
  passed as uint8 to a model that normalises on the device) and the backend
  runs ONE call per batch (see :mod:`.scheduler`).
* **compositing** (:func:`composite_faces`): each 320 face is pasted into its
  full avatar frame.
* **sinks**: frames, each with its share of the audio (:class:`_AudioClock`),
  go to every sink in order.

Memory is bounded by the avatar frame store's budget, the memory-mapped face
cache and each session's look-ahead budget (frames in flight between the
features and the sinks, :attr:`SessionOptions.lookahead_frames`); audio beyond
it waits as PCM (an offline feeder blocks; live pushes are held as samples).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..interfaces import RowStream, SinkReport
from ..windows import WindowAssembler
from .cpu import StageCpu, cpu_per_frame

log = logging.getLogger(__name__)

STAGES = ("features", "visual", "inference", "decode", "composite", "sink")


# --------------------------------------------------------------------------- reports


#: the CPU accounting's name of a wall-time stage (the sinks' time is their encoding)
_CPU_NAME = {"sink": "encode"}


@dataclass
class StageTimes:
    """Busy time per stage (seconds) and how many items each handled; CPU time by stage and frame kind in ``cpu``."""

    seconds: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    items: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STAGES})
    cpu: StageCpu = field(default_factory=StageCpu, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, stage: str, seconds: float, items: int = 1, *, cpu_s: float | None = None, kind: str = "speech") -> None:
        """``seconds`` of wall time (and ``cpu_s`` of CPU time, when measured) spent in ``stage`` on ``items``."""
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
            self.items[stage] = self.items.get(stage, 0) + items
        if cpu_s is not None:
            self.cpu.add(_CPU_NAME.get(stage, stage), cpu_s, kind)

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
    #: frames skipped before inference to keep a real-time sink in time (their audio was kept)
    skipped: int = 0
    #: frames rendered too late for a real-time sink (their audio went out with the previous image)
    late: int = 0
    #: frames delivered that went through the model (the rest were idle or held frames)
    speech_frames: int | None = None
    #: the thread budget the render ran under (``ThreadBudget.to_dict()``; None: the libraries' own pools)
    threads: dict[str, Any] | None = None

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

    def cpu_ms_per_frame(self) -> dict[str, dict[str, float]]:
        """CPU ms per delivered frame by stage, for speech and idle frames (see :mod:`.cpu`)."""
        speech = self.frames if self.speech_frames is None else self.speech_frames
        return cpu_per_frame(self.stages.cpu, speech, self.frames - speech)

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
            "threads": self.threads,
            "interrupted": self.interrupted,
            "skipped": self.skipped,
            "late": self.late,
            "stage_s": dict(self.stages.seconds),
            "stage_ms_per_frame": self.stages.per_frame_ms(self.frames),
            "cpu_ms_per_frame": self.cpu_ms_per_frame(),
            "sinks": {k: vars(v) for k, v in self.sinks.items()},
        }


# --------------------------------------------------------------------------- plumbing


class _Stop(Exception):
    """Raised inside a stage when the stream is being torn down."""


# --------------------------------------------------------------------------- audio


def _pcm_chunks(
    audio: Any, sample_rate: int, chunk_s: float = 0.64, *, exact: bool = True
) -> tuple[Iterator[np.ndarray], int | None, np.ndarray | None]:
    """(chunk iterator, samples if known, whole signal if in memory) for a path, a file, an array or chunks.

    A file (a path, or an :class:`~avatar.audio.AudioFile`) is checked in one
    streaming pass and decoded again as its chunks are taken: its samples are
    never all in memory. Only a source whose chunked extraction is not exact
    (``exact=False``) gets the whole signal, decoded at once.
    """
    from ..audio import AudioFile

    step = max(1, int(chunk_s * sample_rate))
    if isinstance(audio, (str, Path)):
        from ..audio import load_audio, scan_audio

        audio = scan_audio(audio, sample_rate=sample_rate) if exact else load_audio(audio, sample_rate=sample_rate)
    if isinstance(audio, AudioFile):
        if audio.sample_rate != sample_rate:
            from ..errors import AudioError

            raise AudioError(f"{audio.path.name} was scanned at {audio.sample_rate} Hz; the features need {sample_rate} Hz")
        if exact:
            return audio.chunks(step), audio.samples, None
        audio = np.concatenate(list(audio.chunks(1 << 20)))
    if isinstance(audio, np.ndarray):
        pcm = _finite(np.ascontiguousarray(audio, dtype=np.float32).reshape(-1))
        return (pcm[i : i + step] for i in range(0, len(pcm), step)), len(pcm), pcm
    return (_finite(np.asarray(c, dtype=np.float32).reshape(-1)) for c in audio), None, None


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
        self._when: list[float] = []  # when each kept chunk was pushed
        self._base = 0  # absolute sample index of the first kept sample
        self._total = 0
        self._read = 0  # samples the feature stage has read (chunks before it and before the shares taken go)
        self.closed = False
        self._lock = threading.Condition()

    def add(self, chunk: np.ndarray, when: float = 0.0) -> None:
        with self._lock:
            self._buf.append(chunk)
            self._when.append(when)
            self._total += len(chunk)
            self._lock.notify_all()

    @property
    def unread(self) -> int:
        """Samples the feature stage has not read yet (and still may: see :meth:`take`)."""
        return self._total - max(self._read, self._base)

    def read(self, max_samples: int) -> tuple[np.ndarray, float]:
        """The next unread samples (at most ``max_samples``) for the feature stage, and when the last was pushed."""
        with self._lock:
            self._read = max(self._read, self._base)  # (audio its frames took before it was read is gone)
            start, end = self._read, min(self._total, self._read + max_samples)
            parts: list[np.ndarray] = []
            when = 0.0
            pos = self._base
            for chunk, t in zip(self._buf, self._when):
                if pos >= end:
                    break
                lo, hi = max(start - pos, 0), min(end - pos, len(chunk))
                if hi > lo:
                    parts.append(chunk[lo:hi])
                    when = t
                pos += len(chunk)
            self._read = end
        piece = np.concatenate(parts) if len(parts) > 1 else (parts[0] if parts else np.zeros(0, np.float32))
        return piece, when

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
            # drop whole chunks before ``start``: their frames are out. A frame is shown only after its window,
            # which for a source that extracts rows from the audio needs the audio up to and past its share (so
            # the feature stage has read these chunks); a source whose rows come before the audio (precomputed
            # rows) does not need it, and holding it for a reader that never comes would keep all of it
            while self._buf and self._base + len(self._buf[0]) <= start:
                self._base += len(self._buf[0])
                self._buf.pop(0)
                self._when.pop(0)
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


# --------------------------------------------------------------------------- stage bodies


def assemble_windows(stream: RowStream, assembler: WindowAssembler, chunk: np.ndarray | None) -> Iterator[tuple[int, np.ndarray]]:
    """Feed one PCM chunk (``None``: the end of the audio); the ``(frame, window)`` pairs now final.

    The rows are computed now; the windows are made as the iterator is consumed
    (a source of precomputed rows releases them all at once, read block by block
    as the windows are taken: the caller's look-ahead budget decides how many
    rows and windows exist at a time).
    """
    if chunk is None:
        blocks = stream.finish_blocks()
        return itertools.chain(itertools.chain.from_iterable(assembler.push(b) for b in blocks), assembler.finish())
    return itertools.chain.from_iterable(assembler.push(b) for b in stream.push_blocks(chunk) if len(b))


def composite_faces(
    package: Any,
    av_idx: Sequence[int],
    faces: np.ndarray,
    times: StageTimes,
    keep_face: bool = False,
    rounding: str = "nearest",
    kind: str = "speech",
) -> list[tuple[np.ndarray, np.ndarray | None, tuple[int, int, int, int]]]:
    """Model outputs ``[n, 3, 320, 320]`` pasted into their avatar frames: (image, face or None, box) each."""
    from ..vision import composite, output_to_uint8

    c0 = time.thread_time()
    faces_u8 = output_to_uint8(faces, rounding=rounding)
    times.add("composite", 0.0, 0, cpu_s=time.thread_time() - c0, kind=kind)
    out = []
    for a, face in zip(av_idx, faces_u8):
        t, c = time.perf_counter(), time.thread_time()
        frame = package.frame(a, writable=True)  # new memory: the face is pasted into it, not into a copy
        t1, c1 = time.perf_counter(), time.thread_time()
        box = tuple(int(v) for v in package.boxes[a])
        image = composite(frame, box, face, interpolation=package.crop_interpolation, inplace=True)
        times.add("decode", t1 - t, cpu_s=c1 - c, kind=kind)
        times.add("composite", time.perf_counter() - t1, cpu_s=time.thread_time() - c1, kind=kind)
        out.append((image, face if keep_face else None, box))
    return out
