"""Reading a user's video: probing, and frames resampled to a constant frame rate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import AvatarPackageError


@dataclass
class VideoInfo:
    path: Path
    width: int
    height: int
    duration_s: float
    source_fps: float | None
    has_audio: bool
    codec: str


def probe(path: str | Path) -> VideoInfo:
    """What the container says, read without decoding frames; one clear error when unreadable."""
    import av

    path = Path(path)
    if not path.is_file():
        raise AvatarPackageError(f"video not found: {path}")
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise AvatarPackageError(f"{path.name} has no video stream; pass a video file (MP4, MOV, MKV, WebM, ...)")
            st = c.streams.video[0]
            duration = None
            if st.duration is not None and st.time_base is not None:
                duration = float(st.duration * st.time_base)
            elif c.duration is not None:
                duration = c.duration / 1_000_000
            rate = st.average_rate or st.guessed_rate
            w, h = st.codec_context.width, st.codec_context.height
            codec = st.codec_context.name
            has_audio = bool(c.streams.audio)
            if duration is None:  # raw streams: count by demuxing
                n = sum(1 for p in c.demux(st) if p.pts is not None)
                duration = n / float(rate) if rate else 0.0
    except AvatarPackageError:
        raise
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError, IndexError) as exc:
        raise AvatarPackageError(f"cannot read {path.name} as a video ({type(exc).__name__}: {exc}); "
                                 "pass a video FFmpeg can decode") from None
    if not w or not h:
        raise AvatarPackageError(f"cannot read {path.name} as a video: no frame size in its stream")
    return VideoInfo(path, w, h, duration, float(rate) if rate else None, has_audio, codec)


def frames_at(path: str | Path, fps: float | Fraction, *, times: list[float] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, BGR frame)`` at a constant ``fps`` whatever the source's timing.

    Output frame k shows the source frame on screen at time ``k / fps`` (the
    latest one whose timestamp is not after it): a variable or different frame
    rate is resampled by repeating or dropping frames, as FFmpeg's ``fps``
    filter does. With ``times`` (seconds, ascending) only the frames at those
    times are produced (index = position in ``times``).
    """
    import av

    period = 1 / float(fps)
    try:
        with av.open(str(path)) as c:
            st = c.streams.video[0]
            st.thread_type = "AUTO"
            start = float(st.start_time * st.time_base) if st.start_time is not None else 0.0
            rate = st.average_rate or st.guessed_rate
            last = 1 / float(rate) if rate else period  # how long the last source frame stays on screen
            k = 0
            held: np.ndarray | None = None
            held_t = -math.inf

            def target(k: int) -> float | None:
                if times is None:
                    return k * period
                return times[k] if k < len(times) else None

            for frame in c.decode(st):
                t = (float(frame.pts * st.time_base) - start) if frame.pts is not None else held_t + period
                while held is not None and (tk := target(k)) is not None and tk < t - 1e-6:
                    yield k, held
                    k += 1
                if target(k) is None:
                    return
                held, held_t = frame.to_ndarray(format="bgr24"), t
            while held is not None and (tk := target(k)) is not None and tk < held_t + last - 1e-6:
                yield k, held
                k += 1
    except (av.FFmpegError, ValueError) as exc:
        raise AvatarPackageError(f"{Path(path).name}: the video is damaged and cannot be decoded ({exc})") from None


def frame_count(duration_s: float, fps: float | Fraction) -> int:
    return max(1, int(math.floor(duration_s * float(fps) + 1e-6)))
