"""The webrtc sink through a real aiortc peer connection on loopback (no server)."""

from __future__ import annotations

import asyncio
import threading
import time
from fractions import Fraction

import numpy as np
import pytest

pytest.importorskip("aiortc")

from avatar.errors import ConfigError, SinkError
from avatar.interfaces import StreamInfo, VideoFrame
from avatar_plugins.sinks.webrtc import WebRtcSink
from webrtc_client import av_offsets, receive

FPS = 25
RATE = 16000
W, H = 160, 120


def _frame(i: int, marked: bool) -> VideoFrame:
    image = np.full((H, W, 3), 230 if marked else 30, np.uint8)
    n = RATE // FPS
    t = (np.arange(n) + i * n) / RATE
    audio = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32) if marked else np.zeros(n, np.float32)
    return VideoFrame(index=i, pts=Fraction(i, FPS), image=image, audio=audio)


def _feed(sink: WebRtcSink, frames: int, stop: threading.Event, marked=lambda i: i % 25 < 5) -> None:
    """Write frames in real time on a thread, like a live session's pacer."""
    t0 = time.monotonic()
    for i in range(frames):
        if stop.is_set():
            return
        delay = t0 + i / FPS - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sink.write(_frame(i, marked(i)))


def _run(seconds: float) -> tuple[WebRtcSink, object]:
    async def main():  # type: ignore[no-untyped-def]
        sink = WebRtcSink()
        sink.open(StreamInfo(width=W, height=H, fps=Fraction(FPS), sample_rate=RATE))
        from aiortc import RTCPeerConnection, RTCSessionDescription

        sender = RTCPeerConnection()

        async def answer(offer):  # type: ignore[no-untyped-def]
            video, audio = sink.attach()
            sender.addTrack(video)
            sender.addTrack(audio)
            await sender.setRemoteDescription(RTCSessionDescription(**offer))
            await sender.setLocalDescription(await sender.createAnswer())
            return {"type": sender.localDescription.type, "sdp": sender.localDescription.sdp}

        stop = threading.Event()
        feeder = threading.Thread(target=_feed, args=(sink, int(seconds * FPS) + 50, stop), daemon=True)
        feeder.start()
        try:
            got = await receive(answer, seconds)
        finally:
            stop.set()
            feeder.join()
            sink.close()
            await sender.close()
        return sink, got

    return asyncio.run(main())


@pytest.mark.slow
def test_tracks_arrive_at_the_frame_rate_with_audio_in_sync() -> None:
    sink, got = _run(6.0)
    video = got.video
    assert len(video) > 50, f"only {len(video)} video frames arrived"
    # steady state: the last 3 s of arrivals
    times = [t for t, _ in video]
    tail = [t for t in times if t > times[-1] - 3.0]
    fps = (len(tail) - 1) / (tail[-1] - tail[0])
    assert 20 <= fps <= 30, f"video arrived at {fps:.1f} fps, expected about {FPS}"
    audio_s = sum(len(p) / r for _, p, r in got.audio)
    span = got.audio[-1][0] - got.audio[0][0]
    assert audio_s > 0.8 * span, f"{audio_s:.2f} s of audio in {span:.2f} s"
    # the marked frames are bright and carry a tone: their onsets are sent together
    offsets = av_offsets(got, [img.mean() > 128 for _, img in video],
                         [float(np.sqrt(np.mean(p**2))) > 0.1 for _, p, _ in got.audio])
    assert len(offsets) >= 3, offsets
    worst = max(offsets, key=abs)
    assert abs(worst) < 0.040, f"A/V offsets {[round(1000 * o) for o in offsets]} ms"
    assert sink.frames_in > 0


def test_frames_before_a_peer_are_discarded_and_counted() -> None:
    sink = WebRtcSink()
    sink.open(StreamInfo(width=W, height=H, fps=Fraction(FPS), sample_rate=RATE))
    for i in range(3):
        sink.write(_frame(i, False))
    report = sink.close()
    assert report.frames == 3 and report.details["unattached"] == 3


def test_options_and_misuse_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="queue_frames"):
        WebRtcSink(queue_frames=0)
    with pytest.raises(ConfigError, match="unknown option"):
        WebRtcSink(url="x")
    sink = WebRtcSink()
    with pytest.raises(SinkError, match="before open"):
        sink.write(_frame(0, False))


def test_queue_frames_bounds_what_a_slow_peer_holds() -> None:
    """With no one reading the tracks, each keeps at most queue_frames frames (oldest dropped)."""

    async def main() -> dict[str, int]:
        sink = WebRtcSink(queue_frames=3)
        sink.open(StreamInfo(width=W, height=H, fps=Fraction(FPS), sample_rate=RATE))
        sink.attach()
        for i in range(10):
            sink.write(_frame(i, False))
        await asyncio.sleep(0.1)  # let the loop run the deliveries
        stats = sink.stats()
        sink.close()
        return stats

    stats = asyncio.run(main())
    assert stats["video_dropped"] == 7 and stats["audio_dropped"] == 0


def test_a_full_track_queue_stays_bounded_and_still_ends() -> None:
    """put() keeps at most ``size`` frames (oldest dropped); the end marker gets in even when the queue is full."""
    import asyncio

    from aiortc.mediastreams import MediaStreamError

    from avatar_plugins.sinks._webrtc_tracks import _QueueTrack

    async def main() -> tuple[list[int], int, int]:
        track = _QueueTrack("video", 2)
        for i in range(5):
            track.put(i)
        track.finish()
        track.finish()  # twice, on a full queue: still bounded
        got: list[int] = []
        with pytest.raises(MediaStreamError):
            while True:
                got.append(await track.recv())
        return got, track.dropped, track._q.maxsize

    got, dropped, maxsize = asyncio.run(main())
    assert got == [4] and dropped == 4 and maxsize == 3
