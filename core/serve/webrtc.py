"""``POST /v1/sessions/{id}/webrtc``: answer a browser's offer with the session's video and audio tracks.

The peer is configured with exactly the ICE servers the operator gave
(``--ice-server``); with none, an explicit empty list, so the peer gathers host
candidates only and contacts no outside server (aiortc's default would be a
public STUN server). An offer is checked in full before it takes the session's
tracks, so a bad offer never disturbs the peer that is playing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .sessions import ServerSession

log = logging.getLogger(__name__)


def rtc_configuration(ice: list[dict[str, str]]) -> Any:
    """aiortc's configuration with exactly ``ice`` (never its default public STUN server)."""
    from aiortc import RTCConfiguration, RTCIceServer

    return RTCConfiguration(iceServers=[RTCIceServer(**d) for d in ice])


async def answer(s: ServerSession, sdp: str, ice: list[dict[str, str]]) -> dict[str, str]:
    """Make a peer connection with the session's two tracks and answer the offer (raises a 400 when it is bad)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from .app import HttpError, _one_line

    pc = RTCPeerConnection(rtc_configuration(ice))
    key = object()
    s.peers.add(pc)

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        state = pc.connectionState
        if state == "connected":
            s.attach(key)
        elif state in ("failed", "closed", "disconnected"):
            s.detach(key)
            if state != "disconnected":
                s.peers.discard(pc)
                await pc.close()

    try:
        # the whole offer is parsed and applied before anything of the session is touched
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        kinds = {t.kind for t in pc.getTransceivers()}
        if not {"audio", "video"} <= kinds:
            raise ValueError(f"it must offer to receive one video and one audio track (it has {sorted(kinds) or 'none'})")
        video, audio = s.webrtc.attach(asyncio.get_running_loop())
        pc.addTrack(video)
        pc.addTrack(audio)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:  # aiortc's parser raises ValueError, IndexError, KeyError, TypeError ... on bad SDP
        s.peers.discard(pc)
        with contextlib.suppress(Exception):
            await pc.close()
        pc.remove_all_listeners()
        log.info("session %s: refused an SDP offer: %s: %s", s.id, type(exc).__name__, exc)
        if isinstance(exc, HttpError):
            raise
        raise HttpError(400, "bad_offer", f"the SDP offer was not accepted: {_one_line(exc) or type(exc).__name__}") from None
    return {"type": pc.localDescription.type, "sdp": pc.localDescription.sdp}
