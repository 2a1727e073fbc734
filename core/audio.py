"""Audio input: any common file decoded to 16 kHz mono float32 with PyAV.

Every feature source consumes 16 kHz mono float32 PCM, nominally in [-1, 1].
This module turns WAV (PCM 16/24/32 bit, float), MP3, FLAC, M4A/AAC, Ogg ... at
any sample rate and channel count into exactly that, offline
(:func:`load_audio`) or as a stream of fixed-size chunks
(:func:`iter_audio_chunks`) so a long file never has to sit in memory twice.
:func:`scan_audio` checks a whole file in one streaming pass and returns an
:class:`AudioFile` (its length, its peak) that decodes again chunk by chunk:
what an offline render uses, so its memory does not grow with the file.

Value range: integer PCM lands in [-1, 1). Floating-point sources (float WAV,
and lossy codecs that decode to float) are **passed through unscaled and
unclipped**, so a float file that peaks above 1.0 gives samples above 1.0
(resampling can also overshoot slightly). :func:`load_audio` logs a warning
when the peak exceeds 1.0; normalise the file if that is not intended.
Non-finite samples (NaN, infinity) are an error: one of them would poison every
feature window it falls into and break the AAC encoder of the file sinks.

Channels are averaged after resampling (what ``librosa.load(mono=True)`` does,
which the upstream SyncTalk_2D preprocessing uses). FFmpeg's own stereo-to-mono
rematrix is avoided on purpose: it sums the channels at 1/sqrt(2) each, so a
centred voice would come out 3 dB louder than the source. 16-bit PCM at 16 kHz
comes back bit-exact (``sample / 32768``).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import AudioError

log = logging.getLogger(__name__)

DEFAULT_RATE = 16000
#: samples decoded per internal block before resampling; only bounds memory
_BLOCK = 1 << 16


def audio_duration(pcm: np.ndarray, sample_rate: int = DEFAULT_RATE) -> float:
    """Seconds of audio in ``pcm`` (its first axis is time)."""
    if sample_rate <= 0:
        raise AudioError(f"sample rate must be positive, got {sample_rate}")
    return len(pcm) / float(sample_rate)


def load_audio(path: str | Path, sample_rate: int = DEFAULT_RATE) -> np.ndarray:
    """Decode a whole audio (or video) file to mono float32 at ``sample_rate``.

    Samples are nominally in [-1, 1]; float sources are not clipped (see the
    module docstring), and a peak above 1.0 is logged as a warning.
    Raises :class:`avatar.errors.AudioError` when the file is missing, cannot be
    decoded, has no audio stream, holds no samples, or holds NaN or infinite
    samples (the message says how many).
    """
    parts = list(_decode(Path(path), sample_rate))
    pcm = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if len(pcm) == 0:
        raise AudioError(f"{Path(path).name}: the audio stream holds no samples; use a file that contains sound")
    _check_finite(pcm, Path(path), sample_rate)
    _warn_peak(Path(path), float(np.max(np.abs(pcm))))
    return pcm


def _warn_peak(path: Path, peak: float) -> None:
    if peak > 1.0:
        log.warning("%s: samples reach %.3f, beyond the nominal [-1, 1] range (passed through unclipped); "
                    "normalise the file if this is not intended", path.name, peak)


@dataclass(frozen=True)
class AudioFile:
    """An audio file checked by :func:`scan_audio`: its length is known, its samples are decoded on demand.

    :meth:`chunks` decodes the file again, chunk by chunk; their concatenation
    equals :func:`load_audio` (the same decoder and resampler, run the same way),
    so a render of an ``AudioFile`` equals a render of the loaded array while
    holding a few chunks instead of the whole signal (230 MB per hour).
    """

    path: Path
    sample_rate: int
    #: samples at :attr:`sample_rate`
    samples: int
    #: the largest absolute sample
    peak: float

    @property
    def duration_s(self) -> float:
        return self.samples / float(self.sample_rate)

    def chunks(self, chunk_samples: int) -> Iterator[np.ndarray]:
        """Mono float32 chunks of ``chunk_samples`` (the last may be shorter), decoded as they are taken."""
        return _chunks(self.path, chunk_samples, self.sample_rate, warn=False)


def scan_audio(path: str | Path, sample_rate: int = DEFAULT_RATE) -> AudioFile:
    """Decode a file once, streaming, to check it and learn its length; keep none of its samples.

    Raises what :func:`load_audio` raises, with the same messages (a missing,
    undecodable, empty file; NaN or infinite samples, counted over the whole
    file), and logs the same warnings (a truncated WAV, a peak above 1.0).
    """
    p = Path(path)
    total = bad = 0
    first = -1
    peak = 0.0
    for block in _decode(p, sample_rate):
        finite = np.isfinite(block)
        if not finite.all():
            if first < 0:
                first = total + int(np.argmin(finite))
            bad += int(block.size - np.count_nonzero(finite))
        elif len(block):
            peak = max(peak, float(np.max(np.abs(block))))
        total += len(block)
    if total == 0:
        raise AudioError(f"{p.name}: the audio stream holds no samples; use a file that contains sound")
    if bad:
        raise AudioError(_non_finite_message(p, bad, first, sample_rate, f"of {total}"))
    _warn_peak(p, peak)
    return AudioFile(p, int(sample_rate), total, peak)


def _check_finite(pcm: np.ndarray, path: Path, sample_rate: int, offset: int = 0, partial: bool = False) -> None:
    """Raise :class:`AudioError` when ``pcm`` (starting at sample ``offset``) holds NaN or infinity."""
    finite = np.isfinite(pcm)
    if finite.all():
        return
    bad = int(pcm.size - np.count_nonzero(finite))
    first = offset + int(np.argmin(finite))
    where = "in the part decoded so far" if partial else f"of {pcm.size}"
    raise AudioError(_non_finite_message(path, bad, first, sample_rate, where))


def _non_finite_message(path: Path, bad: int, first: int, sample_rate: int, where: str) -> str:
    return (
        f"{path.name}: {bad} sample(s) {where} (decoded at {sample_rate} Hz) are NaN or infinite, the first at "
        f"{first / sample_rate:.3f} s; the file is corrupt or was written from bad data — fix the source and "
        "re-export it (e.g. as 16-bit PCM WAV)"
    )


def iter_audio_chunks(
    path: str | Path, chunk_samples: int, sample_rate: int = DEFAULT_RATE
) -> Iterator[np.ndarray]:
    """Decode a file incrementally; yield mono float32 chunks of ``chunk_samples``.

    Every chunk but the last has exactly ``chunk_samples`` samples; their
    concatenation equals :func:`load_audio` (NaN or infinite samples raise
    :class:`AudioError` before the chunk holding them is yielded). Errors are raised as
    :class:`AudioError` when the generator is first advanced (or later, if the
    file breaks half-way).
    """
    return _chunks(Path(path), chunk_samples, sample_rate, warn=True)


def _chunks(path: Path, chunk_samples: int, sample_rate: int, *, warn: bool) -> Iterator[np.ndarray]:
    if chunk_samples <= 0:
        raise AudioError(f"chunk_samples must be positive, got {chunk_samples}")
    pending: list[np.ndarray] = []
    have = 0
    total = 0
    for block in _decode(Path(path), sample_rate, warn=warn):
        pending.append(block)
        have += len(block)
        if have < chunk_samples:
            continue
        buf = np.concatenate(pending)
        _check_finite(buf, Path(path), sample_rate, offset=total, partial=True)
        n_full = len(buf) // chunk_samples * chunk_samples
        for start in range(0, n_full, chunk_samples):
            yield buf[start : start + chunk_samples]
        total += n_full
        rest = buf[n_full:]
        pending, have = ([rest] if len(rest) else []), len(rest)
    if have:
        buf = np.concatenate(pending)
        _check_finite(buf, Path(path), sample_rate, offset=total, partial=True)
        total += have
        yield buf
    if total == 0:
        raise AudioError(f"{Path(path).name}: the audio stream holds no samples; use a file that contains sound")


def check_one_frame(pcm: np.ndarray | int, sample_rate: int, fps: float, name: str = "the audio") -> None:
    """Refuse audio (samples, or their count) that holds some sound but less than one video frame's share.

    Such a render makes one frame whose few samples the AAC encoder turns into
    no packet at all: an MP4 without an audio stream. Empty audio is left to
    the caller's own "no frames" error.
    """
    need = sample_rate / float(fps)
    n = int(pcm) if isinstance(pcm, (int, np.integer)) else len(pcm)
    if 0 < n < need:
        raise AudioError(
            f"{name} holds {n} sample(s) ({1000.0 * n / sample_rate:.2f} ms at {sample_rate} Hz); "
            f"one video frame at {float(fps):g} fps needs {1000.0 / float(fps):.0f} ms of sound — use a longer recording"
        )


def _wav_declared_seconds(path: Path) -> float | None:
    """Seconds of audio a RIFF/WAVE header announces (its ``data`` size / byte rate).

    FFmpeg trusts the file size over the header, so a truncated WAV decodes to
    what is there without a word; the header is the only record of what was
    meant to be there. ``None`` for other files and for the size placeholders
    (0, 0xFFFFFFFF) that streaming writers leave.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            byte_rate = 0
            for _ in range(64):  # a WAV has a handful of chunks; never loop on garbage
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"fmt ":
                    fmt = f.read(size + (size & 1))
                    byte_rate = struct.unpack("<I", fmt[8:12])[0] if len(fmt) >= 12 else 0
                elif cid == b"data":
                    return size / byte_rate if byte_rate and size not in (0, 0xFFFFFFFF) else None
                else:
                    f.seek(size + (size & 1), 1)
    except OSError:
        return None
    return None


def _hms(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f} s"
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h} h {rest // 60:02d} min {rest % 60:02d} s" if h else f"{rest // 60} min {rest % 60:02d} s"


def _warn_if_truncated(path: Path, decoded: int, sample_rate: int) -> None:
    declared = _wav_declared_seconds(path)
    got = decoded / sample_rate
    if declared is not None and declared - got > 0.1:
        log.warning(
            "%s: the WAV header announces %s of audio but the file holds only %s — it is truncated "
            "(an interrupted recording or copy?); rendering the %s that are there",
            path.name, _hms(declared), _hms(got), _hms(got),
        )  # fmt: skip


def _decode(path: Path, sample_rate: int, warn: bool = True) -> Iterator[np.ndarray]:
    """Yield resampled mono float32 blocks of the file's first audio stream (``warn``: about a truncated WAV)."""
    import av  # lazily: importing PyAV loads all of FFmpeg

    if sample_rate <= 0:
        raise AudioError(f"sample rate must be positive, got {sample_rate}")
    if not path.exists():
        raise AudioError(f"audio file not found: {path}")
    if path.is_dir():
        raise AudioError(f"{path} is a directory, not an audio file")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise AudioError(
            f"{path.name}: cannot be read as audio ({_short(exc)}); use a WAV, MP3, FLAC or M4A file"
        ) from exc
    try:
        if not container.streams.audio:
            raise AudioError(f"{path.name}: the file has no audio stream; pass a file with sound in it")
        stream = container.streams.audio[0]
        # format conversion and rate change only; channels are averaged below
        resampler = av.AudioResampler(format="fltp", rate=sample_rate)
        decoded = 0
        try:
            for frame in container.decode(stream):
                frame.pts = None  # sloppy timestamps must not make swresample insert silence
                for out in resampler.resample(frame):
                    decoded += out.samples
                    yield _mono(out)
            for out in resampler.resample(None):  # flush the filter's delay line
                decoded += out.samples
                yield _mono(out)
            if warn:
                _warn_if_truncated(path, decoded, sample_rate)
        except AudioError:
            raise
        except (av.FFmpegError, ValueError) as exc:
            raise AudioError(f"{path.name}: the audio is damaged and cannot be decoded ({_short(exc)})") from exc
    finally:
        container.close()


def _mono(frame: object) -> np.ndarray:
    data = frame.to_ndarray()  # type: ignore[attr-defined]  # fltp: [channels, samples]
    data = data.reshape(-1, frame.samples)  # type: ignore[attr-defined]
    if data.shape[0] == 1:
        return np.ascontiguousarray(data[0], dtype=np.float32)
    return data.mean(axis=0, dtype=np.float64).astype(np.float32)


def _short(exc: BaseException) -> str:
    # FFmpeg errors carry a readable strerror; str() adds an errno and the path
    text = (getattr(exc, "strerror", None) or str(exc)).strip() or exc.__class__.__name__
    return text if len(text) < 160 else text[:157] + "..."
