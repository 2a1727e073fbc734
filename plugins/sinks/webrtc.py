"""The ``webrtc`` sink: a live session's frames as one WebRTC video and one audio track.

The sink itself knows nothing about signalling: a server (``avatar serve``)
creates it with the session, and when a browser sends its SDP offer the server
calls :meth:`WebRtcSink.attach` on its event loop to get the two aiortc tracks
and adds them to an ``RTCPeerConnection``.

* **One clock.** Both tracks are stamped from the frame index, which the
  engine derives from the audio sample counter: video ``pts = (i - base) *
  90000 / fps`` and audio ``pts = start_sample(i) - start_sample(base)`` with
  the same ``base`` (the first frame after the peer attached). Sound and
  picture therefore cannot drift apart however long the session runs.
* **Never blocks the engine.** :meth:`write` copies the frame and hands it to
  the event loop with ``call_soon_threadsafe``; each track has a small queue
  that drops its oldest entry when the peer reads too slowly (counted).
  Before a peer attaches, frames are counted and discarded.
* aiortc is imported only in :meth:`attach` (the ``[serve]`` extra).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from fractions import Fraction
from typing import Any

import numpy as np
from avatar.errors import ConfigError, MissingDependency, SinkError
from avatar.hookspecs import hookimpl
from avatar.interfaces import Availability, Sink, SinkReport, StreamInfo, VideoFrame

log = logging.getLogger(__name__)


class WebRtcSink(Sink):
    """Feeds an aiortc video track and audio track from the session's frames."""

    name = "webrtc"
    description = "live WebRTC video + audio tracks (aiortc) for a browser peer; used by `avatar serve`"

    def __init__(self, *, queue_frames: int = 8, **options: Any) -> None:
        super().__init__(queue_frames=queue_frames, **options)
        if options:
            raise ConfigError(f"unknown option(s) for the webrtc sink: {', '.join(sorted(options))}; known: queue_frames")
        try:
            self.queue_frames = int(queue_frames)
        except (TypeError, ValueError):
            raise ConfigError(f"queue_frames must be a whole number, not {queue_frames!r}") from None
        if self.queue_frames < 1:
            raise ConfigError("queue_frames must be at least 1")
        self.info: StreamInfo | None = None
        self._lock = threading.Lock()
        self._tracks: Any = None  # the attached _webrtc_tracks.TrackPair, if any
        self._loop: asyncio.AbstractEventLoop | None = None
        self._base: int | None = None
        self.frames_in = 0
        self.frames_unattached = 0
        self._closed = False

    @classmethod
    def availability(cls) -> Availability:
        import importlib.util

        if importlib.util.find_spec("aiortc") is None:
            return Availability.missing("aiortc", "serve")
        return Availability.ok()

    # ------------------------------------------------------------------ engine side

    def open(self, info: StreamInfo) -> None:
        if info.audio_channels != 1:
            raise SinkError(f"the webrtc sink takes mono audio shares, got {info.audio_channels} channels")
        self.info = info

    def write(self, frame: VideoFrame) -> None:
        if self.info is None:
            raise SinkError("write() before open(): call open(StreamInfo) first")
        self.frames_in += 1
        with self._lock:
            tracks, loop = self._tracks, self._loop
            if tracks is None or loop is None:
                self.frames_unattached += 1
                return
            if self._base is None:
                self._base = frame.index
            base = self._base
        fps = Fraction(self.info.fps)
        rate = self.info.sample_rate
        video_pts = int(round((frame.index - base) * 90000 / fps))
        audio_pts = _sample_start(frame.index, rate, fps) - _sample_start(base, rate, fps)
        # the engine may reuse its buffers after write() returns: copy
        image = np.ascontiguousarray(frame.image).copy()
        pcm = (np.clip(np.asarray(frame.audio, dtype=np.float32), -1.0, 1.0) * 32767.0).astype(np.int16)
        try:
            loop.call_soon_threadsafe(tracks.deliver, image, video_pts, pcm, audio_pts)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.frames_unattached += 1

    def close(self, aborted: bool = False) -> SinkReport:
        self._closed = True
        with self._lock:
            tracks, loop = self._tracks, self._loop
            self._tracks = None
        if tracks is not None and loop is not None:
            try:
                loop.call_soon_threadsafe(tracks.end)
            except RuntimeError:
                pass
        stats = tracks.stats() if tracks is not None else {}
        return SinkReport(
            frames=self.frames_in,
            dropped=int(stats.get("video_dropped", 0)),
            details={"aborted": aborted, "unattached": self.frames_unattached, **stats},
        )

    # ------------------------------------------------------------------ server side

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> tuple[Any, Any]:
        """(video track, audio track) for a new peer; call it on the event loop.

        A second call replaces the first pair (the old tracks end), so a page
        reload gets a fresh stream whose timestamps restart at zero.
        """
        try:
            from ._webrtc_tracks import TrackPair
        except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
            raise MissingDependency(exc.name or "aiortc", "serve", feature="WebRTC output") from exc
        if self._closed:
            raise SinkError("the webrtc sink is closed")
        if self.info is None:
            raise SinkError("the session has not started its output yet; try again in a moment")
        loop = loop or asyncio.get_running_loop()
        pair = TrackPair(self.info, self.queue_frames)
        with self._lock:
            old = self._tracks
            self._tracks, self._loop, self._base = pair, loop, None
        if old is not None:
            old.end()
        return pair.video, pair.audio

    def detach(self) -> None:
        """Stop feeding the peer (its connection closed); frames are discarded again."""
        with self._lock:
            old, self._tracks = self._tracks, None
        if old is not None:
            old.end()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            tracks = self._tracks
        out: dict[str, Any] = {"frames_in": self.frames_in, "unattached": self.frames_unattached,
                               "attached": tracks is not None}
        if tracks is not None:
            out.update(tracks.stats())
        return out


def _sample_start(index: int, rate: int, fps: Fraction) -> int:
    """First audio sample of frame ``index`` (the engine's audio clock rounding)."""
    return int(round(index * Fraction(rate) / fps))


@hookimpl
def register_sinks(register):  # type: ignore[no-untyped-def]
    register(WebRtcSink)
