"""AVE features: mel windows through a Wav2Lip-style audio encoder, one 512-row per 25 fps frame.

The pipeline (see docs/features.md for the derivations):

- the mel spectrogram of :mod:`avatar.mel` (80 rows per second);
- video frame ``f`` gets the 16 mel rows starting at ``int(80 f / 25)`` (the
  upstream ``AudDataset.crop_audio_window``; ``(16 f) // 5`` in integers, which
  equals the float expression for every ``f``); a window that would run past the
  end is shifted back to end at the last mel row;
- the encoder (an ONNX model run by any registered backend) maps each window
  ``[1, 80, 16]`` to 512 values;
- rows are framed like upstream, ``[w0, w0, w1, w2, ...]``: row ``r`` holds the
  window of frame ``max(r - 1, 0)``. There are ``ceil(n * 25 / 16000)`` rows for
  ``n`` samples, so the video lasts as long as the audio within one frame;
  upstream's ``int((T_mel - 16) / 80 * 25) + 2`` windows plus its two duplicated
  rows are a prefix of these rows, the extra rows repeat the last window.

Streaming: a row is final as soon as its 16 mel rows exist and do not reach the
end of the audio; rows whose window touches the end wait for ``finish()``.
"""

from __future__ import annotations

import importlib.util
import logging
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from avatar.errors import ConfigError, FeatureError
from avatar.hookspecs import hookimpl
from avatar.interfaces import Availability, Backend, BackendOptions, FeatureSource, RowStream
from avatar.mel import HOP, N_MELS, PAD_MODES, SILENCE, MelStream

log = logging.getLogger(__name__)

MEL_WINDOW = 16  # mel rows per encoder window (200 ms)
ROW_SIZE = 512
_SR = 16000
_SAMPLES_PER_FRAME = 640  # 16000 / 25
_WINDOW_SLICE = 1024  # windows built per encode() call when a push releases many
_MAKE_ENCODER = (
    "make one with `avatar export audio-encoder --checkpoint audio_visual_encoder.pth -o encoder.onnx` "
    "(the real SyncTalk_2D encoder) or `avatar make-test-model --kind audio-encoder -o encoder.onnx` "
    "(random weights, for tests)"
)


def frame_count(n_samples: int) -> int:
    """Rows (video frames) for ``n_samples`` of 16 kHz audio: ``ceil(n * 25 / 16000)``."""
    return -(-int(n_samples) // _SAMPLES_PER_FRAME)


def upstream_frame_count(n_samples: int) -> int:
    """Rows upstream SyncTalk_2D makes: ``int((T_mel - 16) / 80 * 25) + 2`` windows + 2 duplicates."""
    t_mel = 1 + int(n_samples) // HOP
    return int((t_mel - 16) / 80.0 * 25) + 4


def window_start(row: int) -> int:
    """First mel row of row ``row``'s window before the end shift-back (``int(80 f / 25)``, f = max(row-1, 0))."""
    return (16 * max(int(row) - 1, 0)) // 5


def samples_for_row(row: int) -> int:
    """Samples that must have been pushed before row ``row`` is final (away from the end).

    Mel row ``t`` needs samples up to ``200 t + 400`` (STFT centring); the
    window's last mel row is ``window_start(row) + 15``.
    """
    return HOP * (window_start(row) + MEL_WINDOW - 1) + 400


class AveSource(FeatureSource):
    """Mel windows through an audio-encoder ONNX model: ``[N, 512]`` rows at 25 fps.

    Options:
        encoder: path to the audio-encoder ONNX (``[B, 1, 80, 16]`` -> ``[B, 512]``); required.
        backend: registered backend that runs it (default ``"cpu"``).
        batch: most windows per encoder call (default 64).
        device_id: accelerator index handed to the backend (default 0).
        batch_wait_s: how long a partial encoder batch waits for the windows of other
            sessions sharing this source (default 0.003; 0: never wait). Sessions of
            one service share the source, so their windows go through ONE encoder
            call when they arrive together (see :class:`avatar.batching.CallBatcher`).
        stft_pad: STFT centre padding, ``"constant"`` (librosa >= 0.10, SyncTalk_2D)
            or ``"reflect"`` (librosa < 0.10, Wav2Lip-era features).
        padding: window edge padding, ``"replicate"`` (the specification's, default)
            or ``"zero"`` (upstream's).
        min_rows: a stream encodes only once this many rows are ready (default 1: each
            row as soon as its audio is in; the end of a stream flushes the rest). A
            real-time stream makes one row per 40 ms frame; every encoder call reads the
            encoder's weights back into the cache the model call evicted, so on a busy
            CPU two rows per call cost ~15 % less CPU per row for at most one frame
            (40 ms) more latency. A live service's thread budget sets 2 on a CPU.
    """

    name: ClassVar[str] = "ave"
    description: ClassVar[str] = "AVE: mel windows -> audio-encoder ONNX, 512 values per 25 fps frame"
    fps: ClassVar[Fraction] = Fraction(25)
    row_shape: ClassVar[tuple[int, ...]] = (ROW_SIZE,)
    window_shape: ClassVar[tuple[int, ...]] = (32, 16, 16)
    default_padding: ClassVar[str] = "replicate"

    def __init__(
        self,
        *,
        encoder: str | Path | None = None,
        backend: str = "cpu",
        batch: int = 64,
        device_id: int = 0,
        stft_pad: str = "constant",
        padding: str | None = None,
        threads: int | None = None,
        batch_wait_s: float = 0.003,
        min_rows: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(padding=padding)
        if options:
            raise ConfigError(
                f"unknown option(s) for feature source 'ave': {', '.join(sorted(options))} "
                "(valid: encoder, backend, batch, batch_wait_s, device_id, min_rows, stft_pad, padding, threads)"
            )
        if encoder is None or str(encoder) == "":
            raise ConfigError(f"the 'ave' feature source needs an audio-encoder model: pass encoder=PATH; {_MAKE_ENCODER}")
        path = Path(encoder)
        if not path.is_file():
            raise FeatureError(f"audio-encoder model not found: {path}; {_MAKE_ENCODER}")
        try:
            self.batch = int(batch)
        except (TypeError, ValueError):
            raise ConfigError(f"batch must be a positive integer, not {batch!r}") from None
        if self.batch < 1:
            raise ConfigError(f"batch must be a positive integer, not {batch!r}")
        try:
            self.min_rows = int(min_rows)
        except (TypeError, ValueError):
            raise ConfigError(f"min_rows must be a positive integer, not {min_rows!r}") from None
        if not 1 <= self.min_rows <= self.batch:
            raise ConfigError(f"min_rows must be between 1 and batch ({self.batch}), not {min_rows!r}")
        if stft_pad not in PAD_MODES:
            raise ConfigError(f"stft_pad must be one of {', '.join(PAD_MODES)}, not {stft_pad!r}")
        self.stft_pad = stft_pad
        self.encoder_path = path
        self.backend_name = backend
        from avatar.plugins import get_plugin_manager

        cls = get_plugin_manager().backend_class(backend)
        if threads is not None and int(threads) < 1:
            raise ConfigError(f"threads must be at least 1 (leave it out for all cores), not {threads!r}")
        opts = BackendOptions(max_batch=self.batch, device_id=int(device_id), threads=None if threads is None else int(threads))
        self._backend: Backend | None = cls(path, opts)
        try:
            self._input, self._output, self._fixed_batch = self._check_encoder(self._backend)
        except FeatureError:
            self._backend.close()
            raise
        try:
            wait = float(batch_wait_s)
        except (TypeError, ValueError):
            wait = -1.0
        if not wait >= 0:
            self._backend.close()
            raise ConfigError(f"batch_wait_s must be a number of seconds >= 0, not {batch_wait_s!r}")
        from avatar.batching import CallBatcher

        #: the shared front of the encoder: concurrent streams' windows run as one call
        self.batcher = CallBatcher(self._encode_now, max_batch=self._fixed_batch or self.batch, max_wait_s=wait)
        log.debug("ave: encoder %s on backend %s, batch %d, stft_pad %s", path, backend, self.batch, stft_pad)

    @classmethod
    def availability(cls) -> Availability:
        # the built-in backends are ONNX Runtime; a third-party backend may not need it,
        # but the default path does, and the check must stay cheap (no import)
        if importlib.util.find_spec("onnxruntime") is None:
            return Availability.missing("onnxruntime-gpu")
        return Availability.ok()

    # ------------------------------------------------------------------ encoder

    @property
    def backend(self) -> Backend:
        """The backend running the encoder (its ``stats`` time the encoder for benchmarks)."""
        if self._backend is None:
            raise FeatureError("the 'ave' feature source was closed; create a new one")
        return self._backend

    def _check_encoder(self, be: Backend) -> tuple[Any, str, int | None]:
        if len(be.inputs) != 1 or not be.outputs:
            raise FeatureError(
                f"{self.encoder_path.name} is not an audio encoder: it has {len(be.inputs)} inputs "
                f"({', '.join(str(t) for t in be.inputs)}); the AVE encoder takes one [B,1,80,16] mel window; "
                f"{_MAKE_ENCODER}"
            )
        info = be.inputs[0]
        want = (1, N_MELS, MEL_WINDOW)
        dims = tuple(info.shape)
        if len(dims) != 4 or any(isinstance(d, int) and d != w for d, w in zip(dims[1:], want)):
            raise FeatureError(
                f"{self.encoder_path.name} takes {info}, but AVE mel windows are [B,1,80,16]; "
                f"is this the UNet-328 model instead of the audio encoder? {_MAKE_ENCODER}"
            )
        fixed = dims[0] if isinstance(dims[0], int) else None
        return info, be.outputs[0].name, fixed

    def encode(self, windows: np.ndarray) -> np.ndarray:
        """Run the encoder on mel windows ``[k, 1, 80, 16]``; return rows ``[k, 512]`` float32.

        Windows that other threads (sessions) encode at the same moment go
        through the same call (:attr:`batcher`); each caller gets its own rows.
        """
        if self._backend is None:
            raise FeatureError("the 'ave' feature source was closed; create a new one")
        if len(windows) == 0:
            return np.zeros((0, ROW_SIZE), np.float32)
        return self.batcher(np.ascontiguousarray(windows, dtype=np.dtype(self._input.dtype)))

    def _encode_now(self, windows: np.ndarray) -> np.ndarray:
        if self._backend is None:
            raise FeatureError("the 'ave' feature source was closed; create a new one")
        k = len(windows)
        if k == 0:
            return np.zeros((0, ROW_SIZE), np.float32)
        step = self._fixed_batch or self.batch
        x = np.ascontiguousarray(windows, dtype=np.dtype(self._input.dtype))
        out = []
        for i in range(0, k, step):
            part = x[i : i + step]
            n = len(part)
            if self._fixed_batch and n < self._fixed_batch:  # a model exported with a fixed batch
                part = np.concatenate([part, np.zeros((self._fixed_batch - n, *part.shape[1:]), part.dtype)])
            y = np.asarray(self._backend.run({self._input.name: part})[self._output])
            y = y.reshape(len(part), -1)[:n]
            if y.shape[1] != ROW_SIZE:
                raise FeatureError(
                    f"{self.encoder_path.name} produces {y.shape[1]} values per window, AVE rows have {ROW_SIZE}; "
                    f"{_MAKE_ENCODER}"
                )
            out.append(y.astype(np.float32, copy=False))
        return np.concatenate(out)

    # ------------------------------------------------------------------ streams

    @property
    def lookahead_s(self) -> float:
        """Worst-case audio after frame ``i``'s time needed before its model window is final.

        Window ``i`` needs row ``i + 7`` (rows ``[i-8, i+8)``), row ``r`` needs mel
        rows up to ``int(16 (r-1) / 5) + 15``, mel row ``t`` needs samples up to
        ``200 t + 400``. So frame ``i`` needs ``200 * ((16 i + 96) // 5) + 3400``
        samples, ``640 i + 7240 - 40 ((i + 1) mod 5)``: 442.5 to 452.5 ms after
        ``t_i = i / 25``. This returns the worst case, 7240 / 16000 = 0.4525 s.
        """
        return max(samples_for_row(i + 7) - _SAMPLES_PER_FRAME * i for i in range(5)) / _SR

    def samples_for_frame(self, frame: int) -> int:
        """Samples to push before frame ``frame``'s model window is final (away from the end)."""
        return samples_for_row(frame + self.window_rows - self.window_before - 1)

    def open_stream(self) -> "AveRowStream":
        return AveRowStream(self)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


class AveRowStream(RowStream):
    """Incremental AVE rows; each :meth:`push` makes at most one batched encoder pass."""

    def __init__(self, source: AveSource) -> None:
        self.source = source
        self._mel = MelStream(source.stft_pad)
        self._rows_mel = np.zeros((0, N_MELS), np.float32)  # mel rows from self._mel_base on
        self._mel_base = 0
        self._next = 0  # next row to emit
        self._done = False

    @property
    def pending_samples(self) -> int:
        """Samples the mel stream holds for rows not yet out (under one STFT frame)."""
        return self._mel.pending_samples

    @property
    def kept_mel_rows(self) -> int:
        """Mel rows held for rows not yet out (about one encoder window, however long the stream)."""
        return len(self._rows_mel)

    def _windows(self, starts: np.ndarray) -> np.ndarray:
        """Encoder inputs ``[k, 1, 80, 16]`` for absolute mel start rows (unique ones encoded once)."""
        idx = starts[:, None] - self._mel_base + np.arange(MEL_WINDOW)[None, :]
        return self._rows_mel[idx].transpose(0, 2, 1)[:, None]

    def _emit(self, starts: np.ndarray) -> np.ndarray:
        # starts never decrease; they repeat only for the first two rows and the
        # end's shift-back, so the live case (one new window) skips the de-duplication
        repeats = len(starts) > 1 and bool((starts[1:] == starts[:-1]).any())
        uniq, inverse = np.unique(starts, return_inverse=True) if repeats else (starts, None)
        # windows are materialised a slice at a time: an hour of audio pushed at
        # once would otherwise hold 90,000 x 5 KB of copies
        step = self.source.batch * max(1, _WINDOW_SLICE // self.source.batch)
        parts = [self.source.encode(self._windows(uniq[i : i + step])) for i in range(0, len(uniq), step)]
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return rows if inverse is None else rows[inverse]

    def push(self, pcm: np.ndarray) -> np.ndarray:
        if self._done:
            raise FeatureError("push after finish(); open a new stream for new audio")
        new = self._mel.push(pcm)
        if len(new):
            self._rows_mel = np.concatenate([self._rows_mel, new])
        have = self._mel.n_rows
        last = self._next
        while window_start(last) + MEL_WINDOW <= have:
            last += 1
        if last - self._next < self.source.min_rows:  # (none ready, or fewer than a call takes)
            return np.zeros((0, ROW_SIZE), np.float32)
        starts = np.array([window_start(r) for r in range(self._next, last)])
        rows = self._emit(starts)
        self._next = last
        # keep what later rows can still use: their own windows and, for a
        # shift-back at the end, the last 16 mel rows
        keep = max(0, min(window_start(self._next), have - MEL_WINDOW))
        if keep > self._mel_base:
            self._rows_mel = self._rows_mel[keep - self._mel_base :]
            self._mel_base = keep
        return rows

    def finish(self) -> np.ndarray:
        if self._done:
            return np.zeros((0, ROW_SIZE), np.float32)
        self._done = True
        tail = self._mel.finish()
        if len(tail):
            self._rows_mel = np.concatenate([self._rows_mel, tail])
        total = frame_count(self._mel.n_samples)
        if self._next >= total:
            return np.zeros((0, ROW_SIZE), np.float32)
        t_mel = self._mel.n_rows
        if t_mel < MEL_WINDOW:
            # under 187.5 ms of audio: upstream cannot make a window at all; the
            # missing mel rows are silence (the value silence has after normalising)
            pad = np.full((MEL_WINDOW - t_mel, N_MELS), SILENCE, np.float32)
            self._rows_mel = np.concatenate([self._rows_mel, pad])
            t_mel = MEL_WINDOW
        starts = np.array([min(window_start(r), t_mel - MEL_WINDOW) for r in range(self._next, total)])
        rows = self._emit(starts)
        self._next = total
        return rows


@hookimpl
def register_feature_sources(register) -> None:  # type: ignore[no-untyped-def]
    register(AveSource)
