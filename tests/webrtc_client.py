"""A real aiortc receiving peer for the WebRTC tests: records what arrives and when.

Every decoded frame is kept with its arrival time and its RTP timestamp, and
the sender's RTCP sender reports are noted per track. A receiver syncs audio
and video the way browsers do: each report maps a track's RTP clock to the
sender's wall clock, so :meth:`Received.sent_at` puts a frame of either track
on one time line (the receiver's own jitter buffers, which differ per kind in
aiortc, do not enter).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

CLOCK = {"video": 90000, "audio": 48000}


@dataclass
class Received:
    #: (arrival, BGR image) of every decoded video frame
    video: list[tuple[float, np.ndarray]] = field(default_factory=list)
    #: (arrival, mono float32 samples, sample rate) of every decoded audio frame
    audio: list[tuple[float, np.ndarray, int]] = field(default_factory=list)
    #: RTP timestamps of the frames above, per kind
    rtp: dict[str, list[int]] = field(default_factory=lambda: {"video": [], "audio": []})
    #: (sender wall clock s, RTP timestamp) of each RTCP sender report, per kind
    reports: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: {"video": [], "audio": []})
    #: the first RTP packet's timestamp per kind (aiortc's receiver restarts frame pts at 0 from it)
    first_rtp: dict[str, int] = field(default_factory=dict)

    def sent_at(self, kind: str, i: int) -> float:
        """Frame ``i`` of ``kind`` on the sender's wall clock (from its last sender report)."""
        ntp, rtp0 = self.reports[kind][-1]
        d = (self.first_rtp[kind] + self.rtp[kind][i] - rtp0) & 0xFFFFFFFF
        if d >= 1 << 31:
            d -= 1 << 32
        return ntp + d / CLOCK[kind]


async def receive(offer_to_answer: Callable[[dict[str, str]], Awaitable[dict[str, str]]], seconds: float) -> Received:
    """Offer recvonly video+audio, answer through ``offer_to_answer``, record ``seconds`` of media."""
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    got = Received()
    tasks: list[asyncio.Task[Any]] = []

    async def pull(track: Any) -> None:
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                got.rtp[track.kind].append(int(frame.pts))
                if track.kind == "video":
                    got.video.append((now, frame.to_ndarray(format="bgr24")))
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

    def note_reports(receiver: Any, kind: str) -> None:
        from aiortc.rtp import RtcpSrPacket

        handle, handle_rtp = receiver._handle_rtcp_packet, receiver._handle_rtp_packet

        async def handle_rtcp(packet: Any) -> None:
            if isinstance(packet, RtcpSrPacket):
                ntp = packet.sender_info.ntp_timestamp
                got.reports[kind].append(((ntp >> 32) + (ntp & 0xFFFFFFFF) / 2**32, packet.sender_info.rtp_timestamp))
            await handle(packet)

        async def note_rtp(packet: Any, arrival_time_ms: int) -> None:
            got.first_rtp.setdefault(kind, packet.timestamp)
            await handle_rtp(packet, arrival_time_ms)

        receiver._handle_rtcp_packet = handle_rtcp
        receiver._handle_rtp_packet = note_rtp

    for transceiver in pc.getTransceivers():
        note_reports(transceiver.receiver, transceiver.kind)

    try:
        await pc.setLocalDescription(await pc.createOffer())
        answer = await offer_to_answer({"type": "offer", "sdp": pc.localDescription.sdp})
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(0.05)
    finally:
        await pc.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return got


def onsets(flags: list[bool]) -> list[int]:
    """Indices where ``flags`` switches from False to True."""
    return [i for i, f in enumerate(flags) if f and (i == 0 or not flags[i - 1])]


def av_offsets(got: Received, video_on: list[bool], audio_on: list[bool]) -> list[float]:
    """For each video onset, the nearest audio onset's offset (audio − video), on the sender's clock."""
    a = [got.sent_at("audio", i) for i in onsets(audio_on)]
    # a video onset at the very end may have its audio still in the receiver's jitter buffer
    end = got.sent_at("audio", len(got.audio) - 1) - 0.2
    v = [t for t in (got.sent_at("video", i) for i in onsets(video_on)) if t < end]
    return [min((x - t for x in a), key=abs) for t in v] if a else []
