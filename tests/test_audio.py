"""avatar.audio: files the tests encode with PyAV / wave, decoded back and compared with the source."""

from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from avatar.audio import audio_duration, iter_audio_chunks, load_audio
from avatar.errors import AudioError

av = pytest.importorskip("av")


def _signal(rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    """A band-limited, speech-like test signal ``[channels, n]`` in about [-0.6, 0.6]."""
    t = np.arange(int(rate * seconds)) / rate
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    base = env * (0.3 * np.sin(2 * np.pi * 220 * t) + 0.15 * np.sin(2 * np.pi * 1250 * t + 0.3))
    chans = [base * (1.0 if c == 0 else 0.5 + 0.25 * c) + 0.05 * np.sin(2 * np.pi * (500 + 300 * c) * t) for c in range(channels)]
    return np.stack(chans).astype(np.float32)


_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 6: "5.1"}


def _encode(path: Path, sig: np.ndarray, rate: int, codec: str, fmt: str, container: str | None = None) -> Path:
    """Encode ``sig`` ``[channels, n]`` (float in [-1, 1]) with PyAV."""
    channels = sig.shape[0]
    with av.open(str(path), "w", format=container) as out:
        st = out.add_stream(codec, rate=rate, layout=_LAYOUTS[channels])
        st.codec_context.format = fmt
        planar = fmt.endswith("p")
        if fmt.startswith("s16"):
            data = np.round(sig * 32767).astype(np.int16)
        elif fmt.startswith("s32"):
            data = np.round(sig.astype(np.float64) * 2147483647).astype(np.int32)
        else:
            data = sig.astype(np.float32)
        step = 1024
        for i in range(0, sig.shape[1], step):
            part = data[:, i : i + step]
            arr = np.ascontiguousarray(part if planar else part.T.reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(arr, format=fmt, layout=_LAYOUTS[channels])
            frame.sample_rate = rate
            frame.pts = i
            frame.time_base = Fraction(1, rate)
            for pkt in st.encode(frame):
                out.mux(pkt)
        for pkt in st.encode(None):
            out.mux(pkt)
    return path


def _write_wav16(path: Path, samples: np.ndarray, rate: int = 16000, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


def _aligned_corr(ref: np.ndarray, got: np.ndarray, max_lag: int = 3000) -> tuple[float, int]:
    """Best normalised correlation of ``got`` against ``ref`` over lags in [-max_lag, max_lag]."""
    best, best_lag = -1.0, 0
    core = ref[max_lag : len(ref) - max_lag]
    for lag in range(-max_lag, max_lag + 1, 1):
        seg = got[max_lag + lag : max_lag + lag + len(core)]
        if len(seg) < len(core):
            continue
        c = float(np.dot(core, seg) / (np.linalg.norm(core) * np.linalg.norm(seg) + 1e-12))
        if c > best:
            best, best_lag = c, lag
    return best, best_lag


# ----------------------------------------------------------------- exact PCM


def test_pcm16_16k_mono_is_bit_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ints = rng.integers(-32768, 32767, 16000 * 2 + 123, dtype=np.int16)
    pcm = load_audio(_write_wav16(tmp_path / "a.wav", ints))
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    np.testing.assert_array_equal(pcm, ints.astype(np.float32) / 32768.0)


@pytest.mark.parametrize(("codec", "fmt"), [("pcm_s24le", "s32"), ("pcm_s32le", "s32"), ("pcm_f32le", "flt")])
def test_wav_24_32_float_at_16k(tmp_path: Path, codec: str, fmt: str) -> None:
    sig = _signal(16000, 1.5)
    pcm = load_audio(_encode(tmp_path / f"{codec}.wav", sig, 16000, codec, fmt))
    assert len(pcm) == sig.shape[1]
    assert np.abs(pcm - sig[0]).max() <= 1 / 32768


def test_flac_is_lossless(tmp_path: Path) -> None:
    sig = _signal(16000, 1.0)
    pcm = load_audio(_encode(tmp_path / "a.flac", sig, 16000, "flac", "s16"))
    assert len(pcm) == sig.shape[1]
    assert np.abs(pcm - sig[0]).max() <= 1 / 32768


# ----------------------------------------------------------------- resampling and channels


def test_44k_stereo_is_resampled_and_averaged(tmp_path: Path) -> None:
    rate, secs = 44100, 2.0
    sig = _signal(rate, secs, channels=2)
    ints = np.round(sig * 32767).astype(np.int16)
    path = _write_wav16(tmp_path / "st.wav", ints.T.reshape(-1), rate=rate, channels=2)
    pcm = load_audio(path)
    assert abs(len(pcm) - 32000) <= 2
    want = _signal(16000, secs, channels=2).mean(axis=0)  # the same analytic signal sampled at 16 kHz
    n = min(len(pcm), len(want))
    inner = slice(400, n - 400)  # the resampling filter's edges
    assert np.abs(pcm[inner] - want[inner]).max() < 0.01
    # averaged like librosa, not FFmpeg's +3 dB rematrix
    assert np.sqrt(np.mean(pcm[inner] ** 2)) == pytest.approx(np.sqrt(np.mean(want[inner] ** 2)), rel=0.01)


def test_left_only_stereo_gives_half_amplitude(tmp_path: Path) -> None:
    sig = _signal(16000, 1.0)[0]
    both = np.stack([sig, np.zeros_like(sig)])
    pcm = load_audio(_encode(tmp_path / "left.wav", both, 16000, "pcm_f32le", "flt"))
    np.testing.assert_allclose(pcm, sig / 2, atol=1e-6)


def test_three_channel_22k_float(tmp_path: Path) -> None:
    sig = _signal(22050, 1.0, channels=3)
    pcm = load_audio(_encode(tmp_path / "three.wav", sig, 22050, "pcm_f32le", "flt"))
    want = _signal(16000, 1.0, channels=3).mean(axis=0)
    inner = slice(400, min(len(pcm), len(want)) - 400)
    assert abs(len(pcm) - 16000) <= 2
    assert np.abs(pcm[inner] - want[inner]).max() < 0.01


def test_sample_rate_argument(tmp_path: Path) -> None:
    sig = _signal(16000, 1.0)
    path = _encode(tmp_path / "a.wav", sig, 16000, "pcm_f32le", "flt")
    assert abs(len(load_audio(path, sample_rate=8000)) - 8000) <= 2
    assert abs(len(load_audio(path, sample_rate=24000)) - 24000) <= 2


# ----------------------------------------------------------------- lossy codecs


@pytest.mark.parametrize(
    ("name", "codec", "fmt", "rate", "channels", "container"),
    [
        ("a.mp3", "libmp3lame", "fltp", 44100, 2, None),
        ("a.m4a", "aac", "fltp", 48000, 1, "mp4"),
        ("a.ogg", "libopus", "flt", 48000, 2, "ogg"),
    ],
)
def test_lossy_codecs(tmp_path: Path, name: str, codec: str, fmt: str, rate: int, channels: int, container: str | None) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} encoder not in this PyAV build")
    secs = 1.5
    sig = _signal(rate, secs, channels)
    try:
        path = _encode(tmp_path / name, sig, rate, codec, fmt, container)
    except av.FFmpegError as exc:  # an encoder that refuses this format on some builds
        pytest.skip(f"cannot encode {codec}: {exc}")
    pcm = load_audio(path)
    want = _signal(16000, secs, channels).mean(axis=0)
    assert abs(len(pcm) - len(want)) < 0.1 * 16000  # codecs pad to whole frames
    corr, lag = _aligned_corr(want, pcm, max_lag=1200)
    assert corr > 0.98, (corr, lag)
    assert abs(lag) < 1200


# ----------------------------------------------------------------- chunks and duration


@pytest.mark.parametrize("chunk", [1, 160, 320, 10240, 100000])
def test_chunks_concatenate_to_whole(tmp_path: Path, chunk: int) -> None:
    rate = 22050 if chunk != 1 else 16000
    sig = _signal(rate, 1.3 if chunk != 1 else 0.1, channels=2)
    path = _encode(tmp_path / "c.wav", sig, rate, "pcm_f32le", "flt")
    whole = load_audio(path)
    chunks = list(iter_audio_chunks(path, chunk))
    assert all(len(c) == chunk for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= chunk
    np.testing.assert_array_equal(np.concatenate(chunks), whole)


def test_chunks_argument_checked(tmp_path: Path) -> None:
    path = _write_wav16(tmp_path / "a.wav", np.zeros(100, np.int16))
    with pytest.raises(AudioError, match="chunk_samples"):
        next(iter_audio_chunks(path, 0))


def test_duration() -> None:
    assert audio_duration(np.zeros(24000, np.float32)) == 1.5
    assert audio_duration(np.zeros(4410), 44100) == pytest.approx(0.1)
    with pytest.raises(AudioError):
        audio_duration(np.zeros(10), 0)


def test_real_speech_file(talk_wav: Path) -> None:
    pcm = load_audio(talk_wav)
    assert audio_duration(pcm) == pytest.approx(44.9, abs=0.1)
    assert 0.01 < float(np.abs(pcm).max()) <= 1.0


# ----------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="not found.*nope.wav"):
        load_audio(tmp_path / "nope.wav")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(AudioError, match="noise.wav"):
        load_audio(path)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not audio\n" * 50)
    with pytest.raises(AudioError, match="notes.txt"):
        load_audio(path)


def test_empty_wav(tmp_path: Path) -> None:
    path = _write_wav16(tmp_path / "empty.wav", np.zeros(0, np.int16))
    with pytest.raises(AudioError, match="empty.wav.*no samples"):
        load_audio(path)
    with pytest.raises(AudioError, match="no samples"):
        list(iter_audio_chunks(path, 160))


def test_video_without_audio(tmp_path: Path) -> None:
    path = tmp_path / "silent.mp4"
    with av.open(str(path), "w") as out:
        st = out.add_stream("mpeg4", rate=25)
        st.width, st.height, st.pix_fmt = 64, 64, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 40, np.uint8), format="rgb24")
            for pkt in st.encode(frame):
                out.mux(pkt)
        for pkt in st.encode(None):
            out.mux(pkt)
    with pytest.raises(AudioError, match="silent.mp4.*no audio stream"):
        load_audio(path)


def test_truncated_mp3_still_decodes_what_is_there(tmp_path: Path) -> None:
    if "libmp3lame" not in av.codecs_available:
        pytest.skip("no mp3 encoder")
    sig = _signal(16000, 2.0)
    path = _encode(tmp_path / "cut.mp3", sig, 16000, "libmp3lame", "fltp")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    pcm = load_audio(path)
    assert 0.5 * 16000 < len(pcm) < 1.6 * 16000


def test_non_finite_samples_are_an_audio_error(tmp_path: Path) -> None:
    sig = _signal(16000, 1.0)
    sig[0, 1600] = np.nan
    sig[0, 8000] = np.inf
    sig[0, 8001] = -np.inf
    path = _encode(tmp_path / "nan.wav", sig, 16000, "pcm_f32le", "flt")
    with pytest.raises(AudioError, match=r"nan\.wav: 3 sample\(s\) of 16000 .*NaN or infinite, the first at 0\.100 s"):
        load_audio(path)
    with pytest.raises(AudioError, match=r"nan\.wav: .*NaN or infinite"):
        list(iter_audio_chunks(path, 640))
    # resampled: the NaN spreads through the filter, still an error
    path44 = _encode(tmp_path / "nan44.wav", np.resize(sig, (1, 44100)), 44100, "pcm_f32le", "flt")
    with pytest.raises(AudioError, match=r"nan44\.wav: \d+ sample\(s\)"):
        load_audio(path44)


def test_float_samples_beyond_one_pass_through_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sig = _signal(16000, 0.5) * 3.0  # peaks about 1.8
    path = _encode(tmp_path / "loud.wav", sig, 16000, "pcm_f32le", "flt")
    with caplog.at_level("WARNING", logger="avatar.audio"):
        pcm = load_audio(path)
    np.testing.assert_array_equal(pcm, sig[0])  # not clipped, not rescaled
    assert pcm.max() > 1.2
    assert any("loud.wav" in r.getMessage() and "unclipped" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="avatar.audio"):
        load_audio(_encode(tmp_path / "ok.wav", _signal(16000, 0.5), 16000, "pcm_f32le", "flt"))
    assert not caplog.records
