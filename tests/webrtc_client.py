"""A real aiortc receiving peer for the WebRTC tests: records what arrives and when.

Frames are recorded with their arrival time on the monotonic clock; the tests
compare arrival times of marked video frames and marked audio (what a browser's
lip sync rests on: aiortc's RTCP sender reports map each track's RTP time to the
wall time it was sent).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np


@dataclass
class Received:
    #: (arrival, BGR image) of every decoded video frame
    video: list[tuple[float, np.ndarray]] = field(default_factory=list)
    #: (arrival, mono float32 samples, sample rate) of every decoded audio frame
    audio: list[tuple[float, np.ndarray, int]] = field(default_factory=list)


async def receive(offer_to_answer: Callable[[dict[str, str]], Awaitable[dict[str, str]]], seconds: float,
                  *, keep_every: int = 1, until: Callable[[Received], bool] | None = None) -> Received:
    """Offer recvonly video+audio, answer through ``offer_to_answer``, record ``seconds`` of media."""
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    got = Received()
    tasks: list[asyncio.Task[Any]] = []

    async def pull(track: Any) -> None:
        n = 0
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if track.kind == "video":
                    n += 1
                    got.video.append((now, frame.to_ndarray(format="bgr24") if n % keep_every == 0 else None))
                else:
                    pcm = frame.to_ndarray().astype(np.float32) / 32768.0
                    chans = len(frame.layout.channels)
                    pcm = pcm.reshape(-1, chans).mean(axis=1) if frame.format.is_packed else pcm.mean(axis=0)
                    got.audio.append((now, pcm, frame.sample_rate))
        except MediaStreamError:
            return

    @pc.on("track")
    def on_track(track: Any) -> None:
        tasks.append(asyncio.ensure_future(pull(track)))

    try:
        await pc.setLocalDescription(await pc.createOffer())
        answer = await offer_to_answer({"type": "offer", "sdp": pc.localDescription.sdp})
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(0.05)
            if until is not None and until(got):
                break
    finally:
        await pc.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return got


def onsets(times: list[float], flags: list[bool]) -> list[float]:
    """Arrival times where ``flags`` switches from False to True."""
    out = []
    prev = False
    for t, f in zip(times, flags):
        if f and not prev:
            out.append(t)
        prev = f
    return out
