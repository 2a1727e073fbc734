"""The AVE mel spectrogram in numpy, offline and streaming.

Reproduces the ``melspectrogram`` of the upstream SyncTalk_2D ``utils.py`` (the
Wav2Lip ``audio.py`` recipe) without librosa or scipy at run time:

1. pre-emphasis ``y[n] = x[n] - 0.97 x[n-1]`` (``lfilter([1, -0.97], [1])``,
   zero initial state, so ``y[0] = x[0]``);
2. centred STFT, n_fft 800, hop 200, periodic Hann window of 800: the signal is
   padded by 400 samples on each side, frame ``t`` covers padded samples
   ``[200 t, 200 t + 800)``, i.e. original samples ``[200 t - 400, 200 t + 400)``;
   ``1 + n // 200`` frames for ``n`` samples;
3. magnitude, 80 Slaney mel bands 55-7600 Hz (``librosa.filters.mel``);
4. ``20 log10(max(1e-5, x)) - 20`` and ``clip(8 (S + 100) / 100 - 4, -4, 4)``.

The centre padding is the one detail that depends on the librosa version:
``librosa.stft`` padded with ``"reflect"`` up to 0.9 and pads with zeros
(``"constant"``) from 0.10 on. SyncTalk_2D installs an unpinned librosa on
Python 3.10 with numpy 1.26, i.e. 0.10.x, so ``"constant"`` is the default
here; ``"reflect"`` reproduces Wav2Lip-era features. Only the first and last
two mel frames differ between the two.

Orientation: :func:`melspectrogram` returns ``[T, 80]`` (time first, the
transpose of librosa's ``[80, T]``), the layout the upstream ``AudDataset``
works in after its ``.T``. Values are float32 in [-4, 4].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 800
HOP = 200
N_MELS = 80
FMIN = 55.0
FMAX = 7600.0
PREEMPHASIS = 0.97
PAD_MODES = ("constant", "reflect")
#: value of a silent mel bin after normalisation
SILENCE = -4.0

_HALF = N_FFT // 2
_BLOCK_FRAMES = 2048


# ----------------------------------------------------------------- filterbank


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = hz / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = hz >= min_log_hz
    mels = np.where(log_t, min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep, mels)
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_t = mels >= min_log_mel
    return np.where(log_t, min_log_hz * np.exp(logstep * (mels - min_log_mel)), freqs)


@lru_cache(maxsize=8)
def _filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    mel_pts = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    # Slaney normalisation: each triangle has unit area on the Hz axis
    weights *= (2.0 / (mel_pts[2:] - mel_pts[:-2]))[:, None]
    # librosa builds the bank in float32; the product below is float64 as upstream's
    out = weights.astype(np.float32)
    out.setflags(write=False)
    return out


def mel_filterbank(
    sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS, fmin: float = FMIN, fmax: float = FMAX
) -> np.ndarray:
    """Slaney-normalised triangular mel filters ``[n_mels, 1 + n_fft // 2]`` float32 (read-only).

    Equal to ``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)``.
    """
    return _filterbank(int(sr), int(n_fft), int(n_mels), float(fmin), float(fmax))


@lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    # periodic Hann (scipy.signal.get_window('hann', N, fftbins=True)), as librosa uses
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)


# ----------------------------------------------------------------- offline


@lru_cache(maxsize=1)
def _basis() -> np.ndarray:
    # the filterbank as the float64 right-hand side of the product, made once
    # (the layout of ``mel_filterbank().T.astype(float64)``: the same sums)
    out = mel_filterbank().T.astype(np.float64)
    out.setflags(write=False)
    return out


def _frames_to_mel(padded: np.ndarray, n_frames: int) -> np.ndarray:
    """Normalised mel rows ``[n_frames, 80]`` of frames starting at ``padded[200 t]``.

    A live stream calls this for one or two frames at a time, so the fixed
    cost per call matters as much as the arithmetic: the basis is cached, the
    frames are a strided view and the scaling runs in place (the same float64
    operations in the same order as the expression in the module notes).
    """
    out = np.empty((max(n_frames, 0), N_MELS), np.float32)
    basis, hann = _basis(), _hann()
    # blocks bound the float64 frame matrix (an hour of audio would need 1.8 GB at once)
    for b0 in range(0, n_frames, _BLOCK_FRAMES):
        b1 = min(n_frames, b0 + _BLOCK_FRAMES)
        seg = padded[b0 * HOP : (b1 - 1) * HOP + N_FFT]
        step = seg.strides[0]
        frames = np.lib.stride_tricks.as_strided(seg, (b1 - b0, N_FFT), (HOP * step, step), writeable=False)
        mel = np.abs(np.fft.rfft(frames * hann, axis=1)) @ basis
        np.maximum(mel, 1e-5, out=mel)
        np.log10(mel, out=mel)
        mel *= 20.0  # dB less the reference level: 20 log10(x) - 20
        mel -= 20.0
        mel += 100.0  # normalised: 8 (dB + 100) / 100 - 4, clipped to [-4, 4]
        mel *= 8.0
        mel /= 100.0
        mel -= 4.0
        np.clip(mel, -4.0, 4.0, out=out[b0:b1])
    return out


def _preemphasis(x: np.ndarray, prev: float = 0.0) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    y = x.copy()
    if len(x):
        y[0] -= PREEMPHASIS * prev
        y[1:] -= PREEMPHASIS * x[:-1]
    return y


def _check_pad(pad_mode: str) -> None:
    if pad_mode not in PAD_MODES:
        from .errors import ConfigError

        raise ConfigError(f"STFT pad mode must be one of {', '.join(PAD_MODES)}, not {pad_mode!r}")


def melspectrogram(pcm: np.ndarray, pad_mode: str = "constant") -> np.ndarray:
    """Normalised mel spectrogram ``[T, 80]`` float32 of 16 kHz mono ``pcm``.

    ``T = 1 + len(pcm) // 200`` (80 frames per second); row ``t`` is centred on
    sample ``200 t``. ``pad_mode`` is the STFT centre padding (see module notes).
    """
    _check_pad(pad_mode)
    y = _preemphasis(np.asarray(pcm).reshape(-1))
    padded = np.pad(y, _HALF, mode=pad_mode) if len(y) or pad_mode == "constant" else np.zeros(N_FFT)
    return _frames_to_mel(padded, 1 + len(y) // HOP)


# ----------------------------------------------------------------- streaming


class MelStream:
    """Incremental :func:`melspectrogram`: push PCM chunks, get mel rows once final.

    Row ``t`` needs original samples up to ``200 t + 400`` (the STFT centring),
    so after ``n`` samples rows ``t <= (n - 400) / 200`` are out; the rows that
    overlap the end padding come from :meth:`finish`. For any chunking the rows
    equal the offline result (same float64 arithmetic per frame).
    Memory stays bounded: only the samples of frames not yet computed are kept.
    """

    def __init__(self, pad_mode: str = "constant") -> None:
        _check_pad(pad_mode)
        self.pad_mode = pad_mode
        self.n_samples = 0  # raw samples pushed
        self.n_rows = 0  # mel rows emitted
        self._prev = 0.0  # last raw sample, the pre-emphasis state
        # pre-emphasised, padded signal from padded index 200 * n_rows on
        self._buf = np.zeros(_HALF) if pad_mode == "constant" else np.zeros(0)
        self._started = pad_mode == "constant"  # reflect waits for 401 samples
        self._tail = np.zeros(0)  # last 401 pre-emphasised samples (reflect end pad)
        self._finished = False

    @property
    def pending_samples(self) -> int:
        """Samples held for rows not yet out (under one STFT frame plus the last push's)."""
        return len(self._buf)

    @staticmethod
    def rows_final_after(n_samples: int) -> int:
        """How many rows are final once ``n_samples`` samples were pushed (before finish).

        Exact for ``"constant"`` padding; ``"reflect"`` also waits for sample 401
        (its left padding mirrors samples 1..400), which only matters before row 0.
        """
        return max(0, (n_samples - _HALF) // HOP + 1) if n_samples >= _HALF else 0

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Add 16 kHz mono samples; return the mel rows ``[k, 80]`` now final."""
        if self._finished:
            from .errors import FeatureError

            raise FeatureError("MelStream.push after finish(); open a new stream for new audio")
        x = np.asarray(pcm, dtype=np.float64).reshape(-1)
        if not len(x):
            return np.zeros((0, N_MELS), np.float32)
        y = _preemphasis(x, self._prev)
        self._prev = float(x[-1])
        self.n_samples += len(x)
        if self.pad_mode == "reflect":
            self._tail = np.concatenate([self._tail, y])[-(_HALF + 1) :]
        self._buf = np.concatenate([self._buf, y])
        if not self._started:
            if len(self._buf) <= _HALF:
                return np.zeros((0, N_MELS), np.float32)
            self._buf = np.concatenate([self._buf[_HALF:0:-1], self._buf])
            self._started = True
        return self._drain()

    def _drain(self) -> np.ndarray:
        k = (len(self._buf) - N_FFT) // HOP + 1 if len(self._buf) >= N_FFT else 0
        out = _frames_to_mel(self._buf, k)
        self._buf = self._buf[k * HOP :]
        self.n_rows += k
        return out

    def finish(self) -> np.ndarray:
        """End of audio: return the remaining rows (they depend on the end padding)."""
        if self._finished:
            return np.zeros((0, N_MELS), np.float32)
        self._finished = True
        total = 1 + self.n_samples // HOP
        if self.pad_mode == "reflect":
            if not self._started:  # fewer than 401 samples: do it like the offline path
                y = self._buf
                padded = np.pad(y, _HALF, mode="reflect") if len(y) else np.zeros(N_FFT)
                self.n_rows = total
                return _frames_to_mel(padded, total)
            right = np.pad(self._tail, (0, _HALF), mode="reflect")[len(self._tail) :]
        else:
            right = np.zeros(_HALF)
        self._buf = np.concatenate([self._buf, right])
        out = self._drain()
        if self.n_rows != total:  # would be a bug in the bookkeeping, never a user error
            raise RuntimeError(f"MelStream produced {self.n_rows} rows, expected {total}")
        return out
