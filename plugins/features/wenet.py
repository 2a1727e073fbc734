"""WeNet feature source: a WenetSpeech U2++ conformer encoder (ONNX) over Kaldi fbank.

The layout follows the public extraction code of the UNet-328 family
(Ultralight-Digital-Human's ``wenet_infer.py``, used by SyncTalk_2D's WeNet mode):

* the 16 kHz waveform is scaled to the int16 range (``x * 32767``, truncated to
  int16 as upstream does), with 320 ms of zeros before it and 350 ms after;
* Kaldi fbank, 80 bins, 25 ms / 10 ms frames, dither 0, ``snip_edges`` (the
  torchaudio/Kaldi default), computed with ``kaldi-native-fbank``;
* chunk ``k`` is fbank frames ``[5k, 5k + 67)`` (zero-padded past the end), encoded
  on its own with zero caches and ``offset = 100``; its ``[16, 512]`` output is the
  row of 20 fps video frame ``k``.

Row count: with ``T`` fbank frames of the padded signal, ``N = 1 + max(0, (T - 63) // 5)``
(upstream's ``while end < T`` loop); for ``d`` seconds of audio that is ``20 * d + 1``
rows give or take one. Empty audio gives no rows.

Because every chunk is encoded with zero caches and the fbank is computed online,
chunked extraction equals the offline result exactly (:attr:`exact_streaming`).
The encoder runs through a registered inference backend (``backend="cpu"`` by
default), so a GPU backend can run it too.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from avatar.errors import BackendError, ConfigError, FeatureError, MissingDependency
from avatar.hookspecs import hookimpl
from avatar.interfaces import Availability, Backend, BackendOptions, FeatureSource, RowStream, TensorInfo

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
#: zeros before the audio (upstream ``32 * 160``) and after it (``35 * 160``)
PAD_BEFORE = 32 * 160
PAD_AFTER = 35 * 160
#: fbank frames per encoder chunk and between chunk starts (5 x 10 ms = one 20 fps frame)
CHUNK_FRAMES = 67
CHUNK_STRIDE = 5
NUM_BINS = 80
#: upstream feeds offset 100 to every chunk (it positions the relative encoding)
OFFSET = 100
#: cache shapes of the published export, used where the model leaves a dimension dynamic
DEFAULT_ATT_CACHE = (3, 8, 16, 128)
DEFAULT_CNN_CACHE = (3, 1, 512, 14)
ROW_SHAPE = (16, 512)
INPUT_NAMES = ("chunk", "offset", "att_cache", "cnn_cache")

_HOW_TO_GET = (
    "WeNet features need the WenetSpeech U2++ conformer encoder exported to ONNX with inputs "
    "chunk[1,1,67,80], offset, att_cache[3,8,16,128], cnn_cache[3,1,512,14] (the `encoder.onnx` that "
    "Ultralight-Digital-Human / SyncTalk_2D's WeNet mode uses); pass its path as model=PATH "
    "(`--wenet-model PATH`)"
)


def int16_scale(pcm: np.ndarray) -> np.ndarray:
    """Float PCM in [-1, 1] to the int16 range Kaldi fbank expects, as float32.

    Upstream multiplies by 32767 and casts to int16 (truncation toward zero);
    values outside [-1, 1] are clipped instead of wrapping around.
    """
    x = np.asarray(pcm, dtype=np.float32) * np.float32(32767.0)
    return np.clip(x, -32768.0, 32767.0).astype(np.int16).astype(np.float32)


def fbank_options() -> Any:
    """Kaldi fbank options of the WeNet front end (80 bins, 25/10 ms, dither 0)."""
    knf = _import_knf()
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(SAMPLE_RATE)
    opts.frame_opts.frame_length_ms = 25.0
    opts.frame_opts.frame_shift_ms = 10.0
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = NUM_BINS
    opts.energy_floor = 0.0
    return opts


def fbank(samples_int16_range: np.ndarray) -> np.ndarray:
    """Offline Kaldi fbank ``[T, 80]`` of samples already in the int16 range."""
    knf = _import_knf()
    f = knf.OnlineFbank(fbank_options())
    f.accept_waveform(float(SAMPLE_RATE), np.ascontiguousarray(samples_int16_range, dtype=np.float32))
    f.input_finished()
    n = f.num_frames_ready
    if n == 0:
        return np.zeros((0, NUM_BINS), np.float32)
    return np.stack([np.array(f.get_frame(i), dtype=np.float32) for i in range(n)])


def row_count(fbank_frames: int) -> int:
    """Rows upstream's chunk loop makes from ``fbank_frames`` frames of the padded signal."""
    if fbank_frames <= 0:
        return 0
    return 1 + max(0, (fbank_frames - (CHUNK_FRAMES - CHUNK_STRIDE + 1)) // CHUNK_STRIDE)


def rows_for_samples(samples: int) -> int:
    """Rows (20 fps frames) for ``samples`` of audio: the padded signal's fbank frames through :func:`row_count`.

    Kaldi's ``snip_edges`` framing keeps ``1 + (L - 400) // 160`` frames of an
    ``L``-sample signal (none shorter than one 25 ms window); empty audio gives no rows.
    """
    if samples <= 0:
        return 0
    padded = samples + PAD_BEFORE + PAD_AFTER
    window, shift = SAMPLE_RATE * 25 // 1000, SAMPLE_RATE * 10 // 1000
    return row_count(0 if padded < window else 1 + (padded - window) // shift)


def _import_knf() -> Any:
    try:
        import kaldi_native_fbank as knf
    except ImportError as exc:
        raise MissingDependency("kaldi-native-fbank", "wenet", feature="WeNet features") from exc
    return knf


class _Encoder:
    """The WeNet encoder behind a backend, with its I/O checked against the signature."""

    def __init__(self, path: Path, backend: str, options: BackendOptions | None) -> None:
        self.backend = _open_backend(path, backend, options)
        try:
            self._plan(self.backend.inputs, self.backend.outputs)
            # One real call: the declared shapes can be dynamic, the result cannot.
            probe = np.zeros((CHUNK_FRAMES, NUM_BINS), np.float32)
            out = self.encode(probe)
        except Exception:
            self.backend.close()
            raise
        if out.shape != ROW_SHAPE:
            self.backend.close()
            raise FeatureError(
                f"WeNet encoder {path} returns '{self.output}' of shape {out.shape} per chunk; "
                f"expected {ROW_SHAPE} (batch 1, 16 frames, 512 values). {_HOW_TO_GET}"
            )

    def _plan(self, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]) -> None:
        found = {t.name: t for t in inputs}
        if set(found) != set(INPUT_NAMES):
            raise FeatureError(
                "WeNet encoder has the wrong inputs: expected chunk[1,1,67,80] float32, offset int64, "
                f"att_cache{list(DEFAULT_ATT_CACHE)} float32, cnn_cache{list(DEFAULT_CNN_CACHE)} float32; "
                f"found {', '.join(str(t) for t in inputs) or 'none'}. {_HOW_TO_GET}"
            )
        chunk = found["chunk"]
        # The family's export adds a channel axis ([1,1,67,80]); stock WeNet exports use [1,67,80].
        if len(chunk.shape) not in (3, 4) or not _fits(chunk.shape[-2:], (CHUNK_FRAMES, NUM_BINS)):
            raise FeatureError(
                f"WeNet encoder input 'chunk' must be [1,1,67,80] (or [1,67,80]); found {chunk}. {_HOW_TO_GET}"
            )
        self.chunk_shape = (1,) * (len(chunk.shape) - 2) + (CHUNK_FRAMES, NUM_BINS)
        self.chunk_dtype = np.dtype(chunk.dtype)
        off = found["offset"]
        if not np.issubdtype(np.dtype(off.dtype), np.integer) or len(off.shape) > 1:
            raise FeatureError(f"WeNet encoder input 'offset' must be an int64 scalar or [1]; found {off}")
        self.offset = np.full((1,) * len(off.shape), OFFSET, dtype=np.dtype(off.dtype))
        self.att_cache = _zeros(found["att_cache"], DEFAULT_ATT_CACHE)
        self.cnn_cache = _zeros(found["cnn_cache"], DEFAULT_CNN_CACHE)
        names = [t.name for t in outputs]
        if not names:
            raise FeatureError("WeNet encoder has no outputs; expected output[1,16,512], r_att_cache, r_cnn_cache")
        self.output = "output" if "output" in names else names[0]
        out = next(t for t in outputs if t.name == self.output)
        if len(out.shape) != 3 or not _fits(out.shape, (1, *ROW_SHAPE)):
            raise FeatureError(
                f"WeNet encoder output '{self.output}' must be [1,16,512]; found {out}. {_HOW_TO_GET}"
            )

    def _feeds(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "chunk": chunk.reshape(self.chunk_shape).astype(self.chunk_dtype, copy=False),
            "offset": self.offset,
            "att_cache": self.att_cache,
            "cnn_cache": self.cnn_cache,
        }

    def encode(self, chunk: np.ndarray) -> np.ndarray:
        """One 67x80 fbank chunk (zero caches) to its ``[16, 512]`` row."""
        try:
            out = self.backend.run(self._feeds(chunk))[self.output]
        except BackendError as exc:
            raise FeatureError(f"WeNet encoder failed on a chunk: {exc}") from exc
        return np.asarray(out, dtype=np.float32).reshape(out.shape[1:]) if out.ndim == 3 else np.asarray(out)

    def close(self) -> None:
        self.backend.close()


def _fits(declared: Sequence[Any], wanted: Sequence[int]) -> bool:
    return len(declared) == len(wanted) and all(not isinstance(d, int) or d == w for d, w in zip(declared, wanted))


def _zeros(info: TensorInfo, default: tuple[int, ...]) -> np.ndarray:
    if len(info.shape) != len(default):
        raise FeatureError(f"WeNet encoder input '{info.name}' must be {list(default)}; found {info}")
    shape = tuple(d if isinstance(d, int) else w for d, w in zip(info.shape, default))
    return np.zeros(shape, dtype=np.dtype(info.dtype))


def _open_backend(path: Path, backend: str, options: BackendOptions | None) -> Backend:
    from avatar.plugins import get_plugin_manager

    cls = get_plugin_manager().backend_class(backend)
    try:
        return cls(path, options or BackendOptions())
    except BackendError as exc:
        raise FeatureError(f"cannot load the WeNet encoder {path} on backend '{backend}': {exc}") from exc


def _info(arg: Any) -> TensorInfo:
    kinds = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    return TensorInfo(arg.name, tuple(arg.shape), np.dtype(kinds.get(arg.type, np.float32)))


class WenetStream(RowStream):
    """Online fbank + one encoder call per completed 67-frame chunk (exact, see module doc)."""

    def __init__(self, encoder: _Encoder) -> None:
        knf = _import_knf()
        self._enc = encoder
        self._fbank = knf.OnlineFbank(fbank_options())
        self._fbank.accept_waveform(float(SAMPLE_RATE), np.zeros(PAD_BEFORE, np.float32))
        self._feats: list[np.ndarray] = []  # fbank frames from self._base on
        self._base = 0
        self._next = 0  # next row (chunk) index
        self._samples = 0
        self._finished = False

    def _collect(self) -> int:
        ready = self._fbank.num_frames_ready
        have = self._base + len(self._feats)
        for i in range(have, ready):
            self._feats.append(np.array(self._fbank.get_frame(i), dtype=np.float32))  # pop() frees the original
        if ready > have:
            self._fbank.pop(ready - have)  # indices stay absolute; frees the copy inside
        return ready

    def _chunk(self, k: int, total: int) -> np.ndarray:
        start = CHUNK_STRIDE * k
        stop = min(start + CHUNK_FRAMES, total)
        out = np.zeros((CHUNK_FRAMES, NUM_BINS), np.float32)
        if stop > start:
            out[: stop - start] = np.stack(self._feats[start - self._base : stop - self._base])
        return out

    def _rows(self, upto: int, total: int) -> np.ndarray:
        rows = []
        while self._next < upto:
            rows.append(self._enc.encode(self._chunk(self._next, total)))
            self._next += 1
        drop = CHUNK_STRIDE * self._next - self._base
        if drop > 0:
            del self._feats[:drop]
            self._base += drop
        return np.stack(rows) if rows else np.zeros((0, *ROW_SHAPE), np.float32)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        if self._finished:
            raise FeatureError("push() after finish(); open a new stream for new audio")
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size:
            self._samples += pcm.size
            self._fbank.accept_waveform(float(SAMPLE_RATE), int16_scale(pcm))
        ready = self._collect()
        # Chunk k is complete (and therefore final) once frame 5k + 66 exists.
        complete = max(0, (ready - CHUNK_FRAMES) // CHUNK_STRIDE + 1)
        return self._rows(complete, ready)

    def finish(self) -> np.ndarray:
        if self._finished:
            return np.zeros((0, *ROW_SHAPE), np.float32)
        self._finished = True
        if self._samples == 0:
            return np.zeros((0, *ROW_SHAPE), np.float32)
        self._fbank.accept_waveform(float(SAMPLE_RATE), np.zeros(PAD_AFTER, np.float32))
        self._fbank.input_finished()
        total = self._collect()
        return self._rows(row_count(total), total)


class WenetSource(FeatureSource):
    """WeNet (WenetSpeech U2++ conformer) encoder features: one [16, 512] row per 20 fps frame."""

    name = "wenet"
    description = "WeNet U2++ conformer encoder (ONNX) over Kaldi fbank; [16,512] rows at 20 fps"
    fps: ClassVar[Fraction] = Fraction(20)
    row_shape: ClassVar[tuple[int, ...]] = ROW_SHAPE
    window_shape: ClassVar[tuple[int, ...]] = (256, 16, 32)
    default_padding: ClassVar[str] = "zero"
    exact_streaming: ClassVar[bool] = True

    def __init__(
        self,
        *,
        model: str | Path | None = None,
        backend: str = "cpu",
        backend_options: BackendOptions | None = None,
        padding: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(padding=padding)
        if options:
            raise ConfigError(
                f"wenet: unknown option(s) {', '.join(sorted(options))}; it takes model=PATH, backend=NAME, padding"
            )
        if model is None:
            raise FeatureError(f"the wenet feature source needs model=PATH. {_HOW_TO_GET}")
        path = Path(model).expanduser()
        if not path.is_file():
            raise FeatureError(f"WeNet encoder not found: {path}. {_HOW_TO_GET}")
        _import_knf()
        self.model_path = path
        self.backend_name = backend
        self._encoder = _Encoder(path, backend, backend_options)

    @classmethod
    def availability(cls) -> Availability:
        import importlib.util

        if importlib.util.find_spec("kaldi_native_fbank") is None:
            return Availability.missing("kaldi-native-fbank", "wenet")
        return Availability.ok()

    @property
    def lookahead_s(self) -> float:
        """Audio after frame i's time that its window needs.

        Row k's chunk ends 66 fbank frames + one 25 ms window after its start,
        ``k * 50 ms - 320 ms``: ``t_k + 365 ms``; the window reaches 7 rows ahead (+350 ms).
        """
        row = (CHUNK_FRAMES - 1) * 0.010 + 0.025 - PAD_BEFORE / SAMPLE_RATE
        after = self.window_rows - self.window_before - 1
        return round(row + after / float(self.fps), 6)

    def expected_frames(self, samples: int | None) -> int | None:
        """Video frames (rows) for ``samples`` of audio: upstream's chunk loop, not the 20 fps rounding."""
        return None if samples is None else rows_for_samples(samples)

    def open_stream(self) -> WenetStream:
        return WenetStream(self._encoder)

    def close(self) -> None:
        self._encoder.close()


@hookimpl
def register_feature_sources(register: Any) -> None:
    register(WenetSource)
