"""The ``file`` sink: an MP4 (or MOV/M4V/MKV/FLV/AVI/TS) file with H.264 video and AAC audio.

Constant frame rate: frame ``i`` has pts ``i`` in a ``1/fps`` time base, and
the audio is muxed from each frame's PCM share, so the AAC stream is as long as
the audio given (to within one 1024-sample AAC frame) and cannot drift.

The sink writes a hidden partial file beside the target and renames it over
the target when it is finalised (see :mod:`._outfile`): a failed render (a
full disk, an encoder error) never destroys an earlier file at that path, and
a second writer to the same path is refused while the first runs.

An interrupted render still leaves a playable file: ``close(aborted=True)``
drains both encoders, writes the trailer (the ``moov`` atom) and renames,
exactly like a normal close. ``+faststart`` (moov moved to the front when the
trailer is written) is on by default; it needs the trailer either way, so it
does not make interrupted files worse. A signal that arrives while a frame is
encoded or the file finalised is held until that step is complete (see
:mod:`._signals`). A process killed with SIGKILL never reaches ``close``: it
leaves the earlier file (if any) untouched and a partial file that the next
render to that path removes. A sink closed before its first frame (an
interrupt during start-up) leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from avatar.errors import ConfigError, SinkError
from avatar.hookspecs import hookimpl
from avatar.interfaces import Sink, SinkReport, StreamInfo, VideoFrame

from . import _signals
from ._options import PRESETS, as_bool, parse_bitrate
from ._outfile import OutputLock, partial_path, remove_stale_partials

log = logging.getLogger(__name__)

#: containers that take H.264 + AAC (checked with PyAV's muxers); others (.webm, .wav, ...) are refused
CONTAINERS = (".mp4", ".mov", ".m4v", ".mkv", ".flv", ".avi", ".ts")
#: containers whose muxer takes ``movflags`` (``+faststart``)
_MOV_FAMILY = (".mp4", ".mov", ".m4v")


class FileSink(Sink):
    """Writes an H.264 + AAC file with PyAV (libx264 and FFmpeg's AAC encoder)."""

    name = "file"
    description = "H.264 + AAC file (MP4) via PyAV; playable even after an interrupt"

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        preset: str = "veryfast",
        crf: int | float = 20,
        audio_bitrate: int | str = "128k",
        audio_rate: int = 48000,
        audio_layout: str = "mono",
        pix_fmt: str = "yuv420p",
        faststart: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(path=path, preset=preset, crf=crf, audio_bitrate=audio_bitrate,
                         audio_rate=audio_rate, pix_fmt=pix_fmt, faststart=faststart, **options)
        if options:
            raise ConfigError(
                f"unknown option(s) for the file sink: {', '.join(sorted(options))}; "
                "known: path, preset, crf, audio_bitrate, audio_rate, audio_layout, pix_fmt, faststart"
            )
        if not path:
            raise ConfigError("the file sink needs a path (FileSink(path='out.mp4'); on the command line -o out.mp4)")
        self.path = Path(path)
        if self.path.suffix.lower() not in CONTAINERS:
            raise ConfigError(
                f"the file sink cannot write {str(self.path)!r}: the suffix picks the container, and H.264 + AAC "
                f"goes into {' '.join(CONTAINERS)} (got {self.path.suffix or 'no suffix'!r}); use e.g. out.mp4"
            )
        if self.path.is_dir():
            raise ConfigError(f"{str(self.path)!r} is a directory; the file sink needs a file path such as out.mp4")
        if not self.path.parent.is_dir():
            raise ConfigError(
                f"the output directory {str(self.path.parent)!r} does not exist; create it first "
                f"(mkdir -p {self.path.parent}) or choose another path"
            )
        # a second writer to this path fails here, before a model is loaded
        OutputLock(Path(os.path.realpath(self.path))).check()
        if preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
        try:
            crf_value = float(crf)
        except (TypeError, ValueError):
            raise ConfigError(f"crf must be a number 0-51, not {crf!r}") from None
        if not 0 <= crf_value <= 51:
            raise ConfigError(f"crf must be between 0 (lossless) and 51 (worst), not {crf!r}")
        if pix_fmt != "yuv420p":
            raise ConfigError(f"pix_fmt must be yuv420p (the widely playable H.264 format), not {pix_fmt!r}")
        if int(audio_rate) not in (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000):
            raise ConfigError(f"audio_rate {audio_rate!r} is not an AAC sample rate; use 44100 or 48000")
        if audio_layout not in ("mono", "stereo"):
            raise ConfigError(f"audio_layout must be 'mono' or 'stereo', not {audio_layout!r}")
        self.preset = preset
        self.crf = crf_value
        self.audio_bitrate = parse_bitrate(audio_bitrate, "audio_bitrate")
        self.audio_rate = int(audio_rate)
        self.audio_layout = audio_layout
        self.pix_fmt = pix_fmt
        self.faststart = as_bool(faststart, "faststart")
        self._container: Any = None
        self._enc: Any = None
        self._info: StreamInfo | None = None
        self._closed = False
        self._frames = 0
        self._failed = False  # a write failed: the partial file is not worth keeping
        self._partial: Path | None = None

    def open(self, info: StreamInfo) -> None:
        with _signals.deferred():
            self._open(info)

    def _open(self, info: StreamInfo) -> None:
        import av

        from ._encode import AVEncoder

        if info.audio_channels != 1:
            raise SinkError(f"the file sink takes mono audio shares, got {info.audio_channels} channels")
        if self._container is not None or self._closed:
            raise SinkError("open() on a file sink that was already opened or closed; make a new sink per file")
        opts = {"movflags": "+faststart"} if self.faststart and self.path.suffix.lower() in _MOV_FAMILY else {}
        self._lock = OutputLock(Path(os.path.realpath(self.path)))
        self._lock.acquire()
        remove_stale_partials(self._lock.target)
        self._partial = partial_path(self._lock.target)
        try:
            self._container = av.open(str(self._partial), "w", options=opts)
        except (OSError, ValueError, av.FFmpegError) as exc:
            self._remove_partial()
            self._lock.release()
            raise SinkError(f"cannot create {self.path}: {exc}; check the path and its permissions") from exc
        if info.title:
            self._container.metadata["title"] = info.title
        try:
            self._enc = AVEncoder(
                self._container,
                width=info.width,
                height=info.height,
                fps=info.fps,
                sample_rate=info.sample_rate,
                audio_rate=self.audio_rate,
                audio_bitrate=self.audio_bitrate,
                audio_layout=self.audio_layout,
                video_options={"preset": self.preset, "crf": f"{self.crf:g}"},
                pix_fmt=self.pix_fmt,
            )
        except Exception as exc:
            self._discard()
            if isinstance(exc, SinkError):
                raise
            raise SinkError(
                f"cannot set up H.264 + AAC encoding for {self.path} ({info.width}x{info.height} @ {info.fps} fps, "
                f"audio {info.sample_rate} Hz -> {self.audio_rate} Hz {self.audio_layout}): {exc}"
            ) from exc
        self._info = info
        log.info("writing %s (%dx%d @ %s fps, preset %s, crf %g)", self.path, self._enc.width,
                 self._enc.height, info.fps, self.preset, self.crf)

    def _discard(self) -> None:
        """Close the container and drop the partial file: the target is left as it was."""
        try:
            self._container.close()
        except Exception as exc:  # the file is removed below anyway
            log.debug("closing %s without keeping it: %s", self._partial, exc)
        self._container = None
        self._remove_partial()
        self._lock.release()

    def _remove_partial(self) -> None:
        if self._partial is None:
            return
        try:
            self._partial.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove the partial file %s: %s", self._partial, exc)

    def write(self, frame: VideoFrame) -> None:
        if self._closed:
            raise SinkError(f"write() after close(): {self.path} is finished; make a new sink for another file")
        if self._enc is None:
            raise SinkError("write() before open(): call open(StreamInfo) first")
        import av

        audio = np.asarray(frame.audio)
        if audio.size and not np.isfinite(audio).all():
            raise SinkError(
                f"frame {frame.index}: its audio share holds NaN or infinite samples; "
                "the AAC encoder cannot take them — check the audio source"
            )
        start = Fraction(frame.pts) if self._frames == 0 else None
        try:
            with _signals.deferred():  # the frame is muxed and counted whole, or not at all
                self._enc.encode_audio(audio, start=start)
                self._enc.encode_video(frame.image, frame.index)
                self._frames += 1
        except SinkError:
            raise
        except (av.FFmpegError, OSError, ValueError) as exc:
            self._failed = True
            raise SinkError(
                f"encoding frame {frame.index} into {self.path} failed: {exc}; check the frame size "
                f"({frame.image.shape[1]}x{frame.image.shape[0]}; libx264 takes at most 16384 px a side), "
                f"the encoder options and free disk space ({self.path} is left as it was)"
            ) from exc

    def close(self, aborted: bool = False) -> SinkReport:
        with _signals.deferred():
            return self._close(aborted)

    def _close(self, aborted: bool) -> SinkReport:
        report = SinkReport(frames=self._frames, details={"path": str(self.path), "aborted": aborted})
        if self._closed or self._container is None:
            self._closed = True
            return report
        self._closed = True
        if self._frames == 0 or self._failed:
            # nothing (or nothing sound) was written: the target stays as it was
            self._discard()
            if self._failed:
                log.info("%s was not written (the render failed); an earlier file there is unchanged", self.path)
            else:
                log.info("%s: no frame was written (%s); no file left", self.path, "interrupted" if aborted else "empty")
            report.details.update(audio_s=0.0, video_s=0.0, bytes=0)
            return report
        failure: str | None = None
        try:
            self._enc.flush()
        except Exception as exc:
            failure = f"flushing the encoders failed: {exc}"
        try:
            self._container.close()  # writes the trailer: the file is playable
        except Exception as exc:
            failure = f"writing the trailer failed: {exc}"
        self._container = None
        if failure is None:
            try:
                os.replace(self._partial, self._lock.target)  # type: ignore[arg-type]
            except OSError as exc:
                failure = f"renaming {self._partial} to it failed: {exc}"
        if failure is not None:
            self._remove_partial()
            self._lock.release()
            message = f"cannot finalise {self.path}: {failure}; an earlier file there is unchanged (check free disk space)"
            if not aborted:
                raise SinkError(message)
            log.warning("%s", message)
            report.details.update(audio_s=0.0, video_s=0.0, bytes=0)
            return report
        self._lock.release()
        report.details["audio_s"] = self._enc.audio_seconds
        report.details["video_s"] = float(self._frames / self._info.fps) if self._info else 0.0
        report.details["bytes"] = self.path.stat().st_size if self.path.exists() else 0
        log.info("%s %s: %d frames, %.2f s of audio", "interrupted" if aborted else "wrote",
                 self.path, self._frames, self._enc.audio_seconds)
        return report


@hookimpl
def register_sinks(register):  # type: ignore[no-untyped-def]
    register(FileSink)
