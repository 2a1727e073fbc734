"""avatar.mel: parity with the upstream librosa recipe, and streaming == offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from avatar.errors import ConfigError, FeatureError
from avatar.mel import N_MELS, MelStream, mel_filterbank, melspectrogram


def _speechish(n: int, seed: int = 0) -> np.ndarray:
    """Harmonics with a syllable envelope plus a little noise, in [-0.5, 0.5]."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    env = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (0.25 * env * voiced + 0.01 * rng.standard_normal(n)).astype(np.float32)


def _upstream(wav: np.ndarray, pad_mode: str) -> np.ndarray:
    """SyncTalk_2D utils.melspectrogram, written with librosa/scipy as upstream does, as [T, 80]."""
    librosa = pytest.importorskip("librosa")
    from scipy import signal

    d = librosa.stft(y=signal.lfilter([1, -0.97], [1], wav), n_fft=800, hop_length=200, win_length=800, pad_mode=pad_mode)
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    s = 20 * np.log10(np.maximum(np.exp(-5 * np.log(10)), np.dot(basis, np.abs(d)))) - 20
    return np.clip((2 * 4.0) * ((s + 100) / 100) - 4.0, -4.0, 4.0).T


def _stream(pcm: np.ndarray, sizes: list[int] | int, pad_mode: str = "constant") -> np.ndarray:
    s = MelStream(pad_mode)
    parts, i, k = [], 0, 0
    while i < len(pcm):
        step = sizes if isinstance(sizes, int) else sizes[k % len(sizes)]
        parts.append(s.push(pcm[i : i + step]))
        i, k = i + step, k + 1
    parts.append(s.finish())
    return np.concatenate(parts)


# ----------------------------------------------------------------- parity


def test_filterbank_matches_librosa() -> None:
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    fb = mel_filterbank()
    assert fb.shape == (80, 401) and fb.dtype == np.float32
    assert np.abs(fb - ref).max() <= 1e-6


def test_filterbank_other_parameters_match_librosa() -> None:
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=40, fmin=0, fmax=8000)
    assert np.abs(mel_filterbank(22050, 1024, 40, 0, 8000) - ref).max() <= 1e-6


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_mel_matches_upstream_on_synthetic(pad_mode: str) -> None:
    wav = _speechish(16000 * 3 + 77)
    ours = melspectrogram(wav, pad_mode)
    ref = _upstream(wav, pad_mode)
    assert ours.shape == ref.shape == (1 + len(wav) // 200, 80)
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # audioread's imports, inside librosa
@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_mel_matches_upstream_on_real_speech(talk_wav: Path, pad_mode: str) -> None:
    librosa = pytest.importorskip("librosa")
    wav = librosa.load(str(talk_wav), sr=16000)[0]  # upstream's own loader
    ours = melspectrogram(wav, pad_mode)
    ref = _upstream(wav, pad_mode)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-3


def test_pad_modes_differ_only_at_the_edges() -> None:
    wav = _speechish(16000 + 333, seed=3)
    a, b = melspectrogram(wav, "constant"), melspectrogram(wav, "reflect")
    assert np.abs(a[2:-2] - b[2:-2]).max() == 0
    assert np.abs(a[:2] - b[:2]).max() > 0.1
    assert np.abs(a[-2:] - b[-2:]).max() > 0.1


# ----------------------------------------------------------------- shape, range, sensitivity


@pytest.mark.parametrize("n", [0, 1, 199, 200, 399, 401, 3000, 16000, 16199])
def test_frame_count_and_orientation(n: int) -> None:
    mel = melspectrogram(_speechish(n) if n else np.zeros(0, np.float32))
    assert mel.shape == (1 + n // 200, N_MELS)
    assert mel.dtype == np.float32
    assert mel.min() >= -4 and mel.max() <= 4


def test_silence_is_minus_four() -> None:
    assert np.all(melspectrogram(np.zeros(8000, np.float32)) == -4.0)


def test_time_axis_first() -> None:
    """A tone that starts half-way lights up the later rows, not the later columns."""
    t = np.arange(16000) / 16000
    wav = np.where(t >= 0.5, 0.5 * np.sin(2 * np.pi * 1000 * t), 0.0).astype(np.float32)
    mel = melspectrogram(wav)
    assert mel[:30].max() == -4.0
    assert mel[50:].max() > 0
    band = int(np.argmax(mel[60]))
    fb = mel_filterbank()
    assert abs(np.argmax(fb[band]) * 20 - 1000) < 150  # 20 Hz per FFT bin


def test_input_changes_output() -> None:
    a = melspectrogram(_speechish(16000, seed=1))
    b = melspectrogram(_speechish(16000, seed=1) * 0.5)
    c = melspectrogram(_speechish(16000, seed=2))
    assert np.abs(a - b).mean() > 0.1
    assert np.abs(a - c).max() > 0.01


def test_bad_pad_mode() -> None:
    with pytest.raises(ConfigError, match="pad mode"):
        melspectrogram(np.zeros(100, np.float32), "edge")
    with pytest.raises(ConfigError):
        MelStream("wrap")


# ----------------------------------------------------------------- streaming


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
@pytest.mark.parametrize("sizes", [160, 320, 10240, [1, 7, 399, 2, 1000, 13]], ids=["10ms", "20ms", "640ms", "odd"])
def test_stream_equals_offline(pad_mode: str, sizes: list[int] | int) -> None:
    wav = _speechish(16000 * 2 + 123, seed=4)
    off = melspectrogram(wav, pad_mode)
    on = _stream(wav, sizes, pad_mode)
    assert on.shape == off.shape
    assert np.abs(on - off).max() <= 1e-5


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_stream_random_chunks_and_short_signals(pad_mode: str) -> None:
    rng = np.random.default_rng(5)
    for n in [0, 1, 150, 400, 401, 402, 799, 800, 1201, 5003]:
        wav = _speechish(n, seed=n)
        sizes = [int(s) for s in rng.integers(1, 700, 50)]
        off = melspectrogram(wav, pad_mode)
        on = _stream(wav, sizes, pad_mode)
        assert on.shape == off.shape, n
        assert np.abs(on - off).max() <= 1e-5, n


def test_streamed_mel_is_bit_identical_to_one_push_for_any_chunking() -> None:
    """The per-frame mel arithmetic does not depend on how many frames one call makes."""
    pcm = _speechish(16000 * 5 + 77, seed=22)
    for pad in ("constant", "reflect"):
        once = melspectrogram(pcm, pad)
        for size in (1, 160, 320, 333, 10240):
            s = MelStream(pad)
            parts = [s.push(pcm[i : i + size]) for i in range(0, len(pcm), size)]
            np.testing.assert_array_equal(np.concatenate([*parts, s.finish()]), once)


def test_stream_releases_rows_as_soon_as_final() -> None:
    """Row t needs samples up to 200 t + 400: after n samples, (n - 400) // 200 + 1 rows are out."""
    wav = _speechish(4000, seed=6)
    s = MelStream()
    got = 0
    for n in range(1, len(wav) + 1):
        got += len(s.push(wav[n - 1 : n]))
        assert got == s.rows_final_after(n) == (0 if n < 400 else (n - 400) // 200 + 1)
    assert got + len(s.finish()) == 1 + len(wav) // 200


def test_stream_prefix_does_not_depend_on_future() -> None:
    """Rows released early are the same whatever audio follows."""
    a, b = _speechish(8000, seed=7), _speechish(8000, seed=8)
    s1, s2 = MelStream(), MelStream()
    r1 = s1.push(np.concatenate([a, b]))
    r2 = s2.push(np.concatenate([a, -b]))
    k = MelStream.rows_final_after(len(a))
    np.testing.assert_array_equal(r1[:k], r2[:k])
    assert not np.array_equal(r1[k:], r2[k:])


def test_push_after_finish() -> None:
    s = MelStream()
    s.push(np.zeros(1000, np.float32))
    s.finish()
    assert len(s.finish()) == 0
    with pytest.raises(FeatureError, match="new stream"):
        s.push(np.zeros(10, np.float32))
