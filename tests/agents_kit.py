"""Shared by the agent adapter tests: a tiny avatar, TTS-like speech, and checks on the frames that come back."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def speech(seconds: float, rate: int, seed: int = 3) -> np.ndarray:
    """Speech-like int16 PCM at ``rate`` (a TTS engine's output rate)."""
    import soxr

    from avatar.demo import speechlike_audio

    pcm16k = speechlike_audio(seconds, seed=seed)
    a = soxr.resample(pcm16k, 16000, rate) if rate != 16000 else pcm16k
    return np.clip(a * 32767, -32768, 32767).astype(np.int16)


def idle_images(kit: dict[str, Path], size: tuple[int, int], fmt: str) -> list[np.ndarray]:
    """The avatar's own frames as the adapter shows them while idle (resized, converted)."""
    from avatar.agents.bridge import _convert
    from avatar.package import AvatarPackage

    with AvatarPackage.open(kit["pkg"]) as pkg:
        return [_convert(pkg.frame(i), size, fmt) for i in range(pkg.frame_count)]


def is_idle(image: np.ndarray, idle: list[np.ndarray]) -> bool:
    return any(image.shape == ref.shape and np.array_equal(image, ref) for ref in idle)


def lag_samples(sent: np.ndarray, got: np.ndarray, max_lag: int = 800) -> int:
    """How many samples ``got`` is delayed against ``sent`` (the peak of their cross-correlation)."""
    n = min(len(sent), len(got))
    a, b = sent[:n].astype(np.float64), got[:n].astype(np.float64)
    size = 1 << (2 * n).bit_length()
    c = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size)
    lags = np.r_[0:max_lag + 1, -max_lag:0]
    return int(lags[np.argmax(np.r_[c[:max_lag + 1], c[-max_lag:]])])
