"""aiortc tracks of the ``webrtc`` sink (imported only when a peer attaches).

Everything here runs on the server's event loop: :meth:`TrackPair.deliver` is
scheduled there by the sink's ``write`` (an engine thread), and aiortc's RTP
senders await the tracks' ``recv``.
"""

from __future__ import annotations

import asyncio
from fractions import Fraction
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from avatar.interfaces import StreamInfo

VIDEO_CLOCK = 90000  # the RTP clock of every video codec


class _QueueTrack(MediaStreamTrack):
    """A track whose ``recv`` returns what was queued; drops the oldest when full."""

    def __init__(self, kind: str, size: int) -> None:
        super().__init__()
        self.kind = kind
        # ``size`` frames and the end marker; put() drops the oldest frames to make room
        self._q: asyncio.Queue[Any] = asyncio.Queue(maxsize=size + 1)
        self._size = size
        self.sent = 0
        self.dropped = 0

    def put(self, frame: Any) -> None:
        while self._q.qsize() >= self._size:
            self._q.get_nowait()
            self.dropped += 1
        self._q.put_nowait(frame)

    def finish(self) -> None:
        if self._q.full():  # the end marker always gets in: the oldest frame makes room
            self._q.get_nowait()
            self.dropped += 1
        self._q.put_nowait(None)

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._q.get()
        if frame is None:
            self.stop()
            raise MediaStreamError
        self.sent += 1
        return frame


class TrackPair:
    """One video and one audio track stamped from the same frame counter."""

    def __init__(self, info: StreamInfo, queue_frames: int) -> None:
        self.info = info
        self.video = _QueueTrack("video", queue_frames)
        # audio pieces are small; a deeper queue keeps the sound continuous when
        # the video encoder hiccups
        self.audio = _QueueTrack("audio", queue_frames * 8)
        self._video_tb = Fraction(1, VIDEO_CLOCK)
        self._audio_tb = Fraction(1, info.sample_rate)
        # aiortc's Opus path sends one RTP packet per 20 ms and stamps every
        # packet of one input frame alike, so audio leaves in 20 ms pieces
        self._chunk = max(1, info.sample_rate // 50)
        self._pending = np.zeros(0, np.int16)
        self._pending_pts = 0

    def deliver(self, image: np.ndarray, video_pts: int, pcm: np.ndarray, audio_pts: int) -> None:
        if self.video.readyState != "live":
            return
        vf = av.VideoFrame.from_ndarray(image, format="bgr24")
        vf.pts, vf.time_base = video_pts, self._video_tb
        self.video.put(vf)
        if audio_pts != self._pending_pts + len(self._pending):  # a gap (first frame): restart the piece
            self._pending, self._pending_pts = np.zeros(0, np.int16), audio_pts
        self._pending = np.concatenate([self._pending, pcm])
        n = self._chunk
        while len(self._pending) >= n:
            af = av.AudioFrame.from_ndarray(self._pending[:n].reshape(1, -1), format="s16", layout="mono")
            af.sample_rate = self.info.sample_rate
            af.pts, af.time_base = self._pending_pts, self._audio_tb
            self.audio.put(af)
            self._pending, self._pending_pts = self._pending[n:], self._pending_pts + n

    def end(self) -> None:
        self.video.finish()
        self.audio.finish()

    def stats(self) -> dict[str, int]:
        return {
            "video_sent": self.video.sent,
            "video_dropped": self.video.dropped,
            "audio_sent": self.audio.sent,
            "audio_dropped": self.audio.dropped,
        }
