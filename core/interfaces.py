"""The three plugin kinds: feature sources, inference backends and sinks.

Plugins subclass these and register the class through a hook (see
:mod:`avatar.hookspecs`). Constructors take keyword options only, so the CLI and
the Python API can pass user options straight through.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np


# --------------------------------------------------------------------------- shared


@dataclass(frozen=True)
class Availability:
    """Whether a registered component can be used here, and if not, why.

    ``install`` is the exact command that fixes a missing dependency, if that is
    the reason. Checks must be cheap (no model loading, no GPU initialisation
    beyond what the check needs).
    """

    usable: bool
    reason: str = ""
    install: str | None = None

    @classmethod
    def ok(cls) -> "Availability":
        return cls(True)

    @classmethod
    def missing(cls, package: str, extra: str | None = None) -> "Availability":
        cmd = f"pip install 'avatar-sdk[{extra}]'" if extra else f"pip install {package}"
        return cls(False, f"{package} is not installed", cmd)


class Component(ABC):
    """Common class attributes of everything a plugin registers."""

    #: unique name within its kind, used on the command line (``--backend cpu``)
    name: ClassVar[str]
    #: one line for ``avatar plugins``
    description: ClassVar[str] = ""

    @classmethod
    def availability(cls) -> Availability:
        """Cheap check whether this component can be used on this machine."""
        return Availability.ok()


# --------------------------------------------------------------------------- features


class RowStream(ABC):
    """Incremental feature extraction: PCM chunks in, feature rows out.

    Rows come out as soon as they are determined; for any chunking the
    concatenated rows equal the offline result of :meth:`FeatureSource.rows`.
    """

    @abstractmethod
    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Add 16 kHz mono float32 samples; return the rows now final, ``[k, *row_shape]``."""

    @abstractmethod
    def finish(self) -> np.ndarray:
        """Signal the end of the audio; return all remaining rows."""

    def push_blocks(self, pcm: np.ndarray) -> Iterator[np.ndarray]:
        """:meth:`push` as blocks of rows, which a stream may produce as they are taken.

        The engine uses this. The default computes ``push(pcm)`` now and
        yields it as one block; a stream whose rows exist already (precomputed
        rows) reads them block by block, so a long file is never in memory at once.
        """
        return iter((self.push(pcm),))

    def finish_blocks(self) -> Iterator[np.ndarray]:
        """:meth:`finish` as blocks of rows (see :meth:`push_blocks`)."""
        return iter((self.finish(),))


class FeatureSource(Component):
    """Turns audio into per-video-frame feature rows and model audio windows.

    Row ``i`` belongs to video frame ``i``. The model's audio input for frame
    ``i`` is the window of rows ``[i - window_before, i - window_before + window_rows)``
    padded at the edges by :attr:`padding` and reshaped to :attr:`window_shape`
    (see :mod:`avatar.windows`).
    """

    #: video frames per second the rows are produced for (25 for AVE/HuBERT, 20 for WeNet)
    fps: ClassVar[Fraction] = Fraction(25)
    #: shape of one row (AVE: (512,), HuBERT: (2, 1024), WeNet: (16, 512))
    row_shape: ClassVar[tuple[int, ...]]
    #: shape of the model's audio input for one frame, without batch
    window_shape: ClassVar[tuple[int, ...]]
    window_rows: ClassVar[int] = 16
    window_before: ClassVar[int] = 8
    #: sample rate of the PCM the source consumes
    sample_rate: ClassVar[int] = 16000
    #: False when chunked extraction only approximates the offline result
    exact_streaming: ClassVar[bool] = True

    def __init__(self, *, padding: str | None = None, **options: Any) -> None:
        self.padding = padding or self.default_padding
        if self.padding not in ("replicate", "zero"):
            from .errors import ConfigError

            raise ConfigError(f"padding must be 'replicate' or 'zero', not {self.padding!r}")

    default_padding: ClassVar[str] = "zero"

    @property
    def lookahead_s(self) -> float:
        """Seconds of audio after a frame's time that its window depends on."""
        return 0.0

    def expected_frames(self, samples: int | None) -> int | None:
        """Frames a render of ``samples`` audio samples yields; None when unknown (live audio).

        The engine tells sinks this before the first frame (progress total, file
        metadata). The default, one frame per started ``1/fps`` of audio, is
        what ``ave`` yields; a source that yields another count (precomputed
        rows: the file's length) overrides it.
        """
        if samples is None:
            return None
        return math.ceil(samples * Fraction(self.fps) / self.sample_rate)

    @abstractmethod
    def open_stream(self) -> RowStream:
        """Start an incremental extraction."""

    def rows(self, pcm: np.ndarray) -> np.ndarray:
        """Offline rows for a whole 16 kHz mono float32 signal."""
        stream = self.open_stream()
        parts = [stream.push(np.asarray(pcm, dtype=np.float32)), stream.finish()]
        return np.concatenate([p for p in parts if len(p)] or [np.zeros((0, *self.row_shape), np.float32)])

    def windows(self, pcm: np.ndarray) -> np.ndarray:
        """Offline model audio inputs ``[N, *window_shape]`` for a whole signal."""
        from .windows import make_windows

        return make_windows(self.rows(pcm), self)

    def close(self) -> None:
        """Release models and sessions."""


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (``None``/str for dynamic axes) and numpy dtype of a model tensor."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    def __str__(self) -> str:
        dims = ",".join("?" if not isinstance(d, int) else str(d) for d in self.shape)
        return f"{self.name}[{dims}] {np.dtype(self.dtype).name}"


#: per-call times a backend keeps (:attr:`BackendStats.call_s`)
RECENT_CALLS = 64


@dataclass
class BackendStats:
    """What a backend measured about itself (for the benchmark harness)."""

    load_s: float = 0.0
    calls: int = 0
    items: int = 0
    run_s: float = 0.0
    #: the newest calls' seconds (a fixed number: a backend serves for hours)
    call_s: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=RECENT_CALLS))

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, seconds: float, items: int) -> None:
        with self._lock:  # (a backend with concurrency > 1 records from several threads)
            self.calls += 1
            self.items += items
            self.run_s += seconds
            self.call_s.append(seconds)


@dataclass(frozen=True)
class BackendOptions:
    """Options every backend understands; backend-specific ones go in ``extra``."""

    device_id: int = 0
    precision: str = "fp32"  # "fp32" | "fp16"
    max_batch: int = 16
    threads: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: the user chose ``precision`` (``--precision``/``--fp16``): ``auto`` may change only a default
    precision_explicit: bool = False


class Backend(Component):
    """Runs one ONNX model (a UNet-328 or an audio encoder) on some hardware.

    Lifecycle: construct (loads the model), :meth:`run` any number of times,
    :meth:`close` (or use as a context manager). ``run`` does one real batched
    call; arrays it returns do not alias internal buffers unless the backend
    documents otherwise.
    """

    #: rank for ``--backend auto`` (higher first); None: never chosen by auto (e.g. a
    #: backend that builds engines for minutes before the first frame)
    priority: ClassVar[int | None] = None

    def __init__(self, model_path: str | Path, options: BackendOptions | None = None) -> None:
        self.model_path = Path(model_path)
        self.options = options or BackendOptions()
        self.stats = BackendStats()

    @property
    def concurrency(self) -> int:
        """How many :meth:`run` calls this backend serves at once, each on its own share of its threads.

        The shared scheduler keeps that many batches in flight. 1 (the default):
        calls run one after another. A backend that returns more must make
        :meth:`run` safe to call from that many threads together.
        """
        return 1

    @property
    @abstractmethod
    def inputs(self) -> Sequence[TensorInfo]:
        """Model inputs as the backend sees them."""

    @property
    @abstractmethod
    def outputs(self) -> Sequence[TensorInfo]:
        """Model outputs as the backend sees them."""

    @abstractmethod
    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference call on a whole batch."""

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: ``{input name: array}`` in, ``{output name: array}`` out."""
        start = time.perf_counter()
        out = self._run(feeds)
        first = next(iter(feeds.values()))
        self.stats.record(time.perf_counter() - start, int(first.shape[0]) if first.ndim else 1)
        return out

    def close(self) -> None:
        """Release sessions, engines and device buffers."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- sinks


@dataclass(frozen=True)
class StreamInfo:
    """What a sink needs to know before the first frame."""

    width: int
    height: int
    fps: Fraction
    sample_rate: int = 16000
    audio_channels: int = 1
    #: expected number of frames, if known (offline renders)
    frame_count: int | None = None
    #: a name for the stream (the avatar's), for metadata
    title: str = ""


@dataclass
class VideoFrame:
    """One output frame on the audio clock.

    ``audio`` holds this frame's share of the PCM (float32 mono at the stream's
    sample rate, normally ``sample_rate / fps`` samples), so a sink that muxes
    it frame by frame cannot drift. ``face`` (320x320 BGR uint8) and ``box``
    (x1, y1, x2, y2 in the full frame) are the model output and where it went.
    """

    index: int
    pts: Fraction
    image: np.ndarray
    audio: np.ndarray
    avatar_index: int = 0
    face: np.ndarray | None = None
    box: tuple[int, int, int, int] | None = None


@dataclass
class SinkReport:
    """What a sink reports when it closes (counts for live sinks)."""

    frames: int = 0
    dropped: int = 0
    stalled_s: float = 0.0
    reconnects: int = 0
    gap_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


class Sink(Component):
    """Receives frames in order and delivers them somewhere.

    ``open`` is called once before the first frame, ``write`` once per frame in
    index order, ``close`` exactly once at the end, also after an error or an
    interrupt (``aborted=True``): a file sink must leave a playable file then.
    """

    #: set True by sinks that want the 320 face and its box in each frame
    wants_face: ClassVar[bool] = False
    #: set True by sinks that pace output in real time (live)
    realtime: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.options = options

    @abstractmethod
    def open(self, info: StreamInfo) -> None:
        """Prepare for frames described by ``info``."""

    @abstractmethod
    def write(self, frame: VideoFrame) -> None:
        """Deliver one frame (with its audio share)."""

    @abstractmethod
    def close(self, aborted: bool = False) -> SinkReport:
        """Finalise; never raises for an already-failed stream."""
