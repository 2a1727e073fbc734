"""Pushed audio to the feature source's format: mono float32 at its sample rate.

Any rate and channel count is accepted; rates other than the source's go
through soxr (a maintained resampler, streaming: consecutive pushes are
resampled as one signal). Channels are averaged (as :mod:`avatar.audio`
does); int16 PCM is scaled to [-1, 1). Audio already at the source's rate
passes through bit-exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import AudioError, MissingDependency


class AudioIntake:
    """Converts pushed PCM; keeps one resampler per input rate (its delay line spans pushes)."""

    def __init__(self, rate: int) -> None:
        self.rate = int(rate)
        self._in_rate: int | None = None
        self._stream: Any = None

    def convert(self, pcm: Any, sample_rate: int) -> np.ndarray:
        """Mono float32 at :attr:`rate` for ``pcm`` (``[n]`` or ``[n, channels]``) at ``sample_rate``."""
        try:
            sr = int(sample_rate)
        except (TypeError, ValueError):
            raise AudioError(f"sample_rate must be a whole number of Hz, not {sample_rate!r}") from None
        if sr < 1000 or sr > 384_000:
            raise AudioError(f"sample_rate {sample_rate} Hz is outside 1000..384000")
        a = np.asarray(pcm)
        if a.ndim == 0 or a.ndim > 2:
            raise AudioError(f"audio must be [samples] or [samples, channels], got shape {a.shape}")
        if a.dtype == np.int16:
            a = a.astype(np.float32) / 32768.0
        elif a.dtype.kind == "f":
            a = a.astype(np.float32, copy=False)
        else:
            raise AudioError(f"audio must be float (in [-1, 1]) or int16 PCM, not {a.dtype}")
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise AudioError(f"the audio has {bad} NaN or infinite sample(s); clean the signal before pushing it")
        mono = a if a.ndim == 1 else a.mean(axis=1, dtype=np.float64).astype(np.float32)
        out: list[np.ndarray] = []
        if sr != self._in_rate:
            out.append(self.drain())
            self._in_rate = sr
            self._stream = None if sr == self.rate else _resampler(sr, self.rate)
        if self._stream is None:
            out.append(np.ascontiguousarray(mono))
        else:
            out.append(self._stream.resample_chunk(mono, last=False))
        return np.concatenate(out).astype(np.float32, copy=False) if len(out) > 1 else out[0]

    def drain(self) -> np.ndarray:
        """The resampler's delayed tail (at the end of an utterance, or when the input rate changes)."""
        stream, self._stream, self._in_rate = self._stream, None, None
        if stream is None:
            return np.zeros(0, np.float32)
        return np.asarray(stream.resample_chunk(np.zeros(0, np.float32), last=True), np.float32)

    def reset(self) -> None:
        """Forget buffered input (an interrupt)."""
        self._stream = None
        self._in_rate = None


def _resampler(src: int, dst: int) -> Any:
    try:
        import soxr
    except ImportError as exc:  # a dependency; only a broken install lacks it
        raise MissingDependency("soxr", feature="resampling pushed audio") from exc
    return soxr.ResampleStream(src, dst, 1, dtype="float32", quality="HQ")
