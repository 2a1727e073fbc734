"""``WS /v1/sessions/{id}/audio``: streaming PCM in, session events out.

Protocol (see docs/serve.md):

* client → server, first text message: ``{"type": "format", "sample_rate": 16000}``
  (PCM16 little-endian mono at that rate from then on);
* binary messages: PCM16 mono samples (an even number of bytes);
* text ``{"type": "flush"}``: the utterance ended, render its tail now;
* text ``{"type": "interrupt"}``: barge-in, answered by ``interrupted`` with the position;
* server → client JSON events: ``ready``, ``speech_started`` (``latency_s``),
  ``speech_ended``, ``interrupted`` (``position_s``), ``stats`` (periodic),
  ``error`` (``message``; the socket stays open), ``ended`` (``reason``).

A message larger than the limit closes the socket with code 1009 (aiohttp's
check, before the payload is read into memory). A socket whose peer stops
answering pings is closed after a heartbeat; the session then ends once no
client is attached for ``client_timeout_s``. Events wait in a bounded
:class:`~.sessions.Outbox`; a client that stops reading them has its socket
closed (1008). Audio is refused (an ``error`` event) once more than
``max_ahead_s`` of it waits to be shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AvatarError

if TYPE_CHECKING:
    from aiohttp import web

    from .config import Limits
    from .sessions import ServerSession

log = logging.getLogger(__name__)

#: how long one event (or the close frame) may take to reach a client
SEND_TIMEOUT_S = 5.0


async def audio_socket(request: "web.Request", s: "ServerSession", limits: "Limits", tasks: set[Any]) -> Any:
    """Serve one audio socket; ``tasks`` holds its handler task while it runs (shutdown waits for it).

    The caller counted the socket in ``s.sockets`` (before the handshake, so two at once cannot pass the
    limit together); it is uncounted here when the socket ends.
    """
    from aiohttp import WSMsgType, web

    from .sessions import Outbox

    ws = web.WebSocketResponse(heartbeat=limits.heartbeat_s, max_msg_size=limits.max_message_bytes)
    try:
        await ws.prepare(request)
    except BaseException:
        s.sockets -= 1
        raise
    task = asyncio.current_task()
    tasks.add(task)
    key = object()
    s.attach(key)
    events = Outbox(limits.max_queued_events)
    s.subscribers.add(events)
    sender = asyncio.create_task(_send_events(ws, events, request, s.id))
    rate: int | None = None
    events.put({"type": "ready", "id": s.id, "fps": float(s.live.fps), "max_message_bytes": limits.max_message_bytes})

    def error(message: str) -> None:
        events.put({"type": "error", "message": message})

    try:
        async for msg in ws:
            s.touch()
            if msg.type == WSMsgType.TEXT:
                try:
                    data = json.loads(msg.data)
                    if not isinstance(data, dict):
                        raise ValueError("not an object")
                except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
                    error('malformed JSON: text messages are JSON objects like {"type": "flush"}')
                    continue
                kind = data.get("type", "format" if "sample_rate" in data else None)
                if kind in ("format", "start"):
                    r = data.get("sample_rate")
                    if type(r) is not int or not limits.min_sample_rate <= r <= limits.max_sample_rate:
                        error(f"sample_rate must be a whole number of Hz from {limits.min_sample_rate} "
                              f"to {limits.max_sample_rate}, not {_short(r)}")
                        continue
                    rate = r
                elif kind == "flush":
                    await _call(s.live.flush, error)
                elif kind == "interrupt":
                    pos = await _call(s.live.interrupt, error)
                    if pos is not None:
                        s.interrupted()
                        s.publish({"type": "interrupted", "position_s": round(float(pos), 4), "t": time.time()})
                else:
                    error(f"unknown message type {_short(kind)}; use format, flush or interrupt")
            elif msg.type == WSMsgType.BINARY:
                if rate is None:
                    error('send the format message first: {"type": "format", "sample_rate": 16000}; audio dropped')
                    continue
                if len(msg.data) % 2:
                    error(f"PCM16 needs an even number of bytes, got {len(msg.data)}; message dropped")
                    continue
                pcm = np.frombuffer(msg.data, dtype="<i2")
                too_much = s.take_audio(len(pcm) / rate, limits.max_ahead_s)
                if too_much:
                    error(too_much)
                    continue
                await _call(lambda pcm=pcm, rate=rate: s.live.push(pcm, rate), error)
            elif msg.type == WSMsgType.ERROR:
                log.info("session %s: audio socket error: %s", s.id, ws.exception())
                break
    finally:
        s.subscribers.discard(events)
        s.detach(key)
        s.sockets -= 1
        if not sender.done():
            # the sender may still be sending ``ended``: give it a moment, then stop it
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(sender), 0.5 if s.ended else 0.0)
            sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
        tasks.discard(task)
    return ws


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


async def _call(fn: Any, error: Any) -> Any:
    """Run a session call; an AvatarError becomes an error event (the session keeps going)."""
    try:
        return fn()
    except AvatarError as exc:
        error(str(exc))
        return None


async def _send_events(ws: Any, events: Any, request: Any, sid: str) -> None:
    """Send the socket's events; close it when the session ended, or when the client stopped reading."""
    while True:
        ev = await events.get()
        if ws.closed:
            return
        if ev is None:
            log.info("session %s: an audio socket fell %d events behind; closing it", sid, events.waiting())
            await _close(ws, request, 1008, b"too many unsent events: the client does not read")
            return
        try:
            await asyncio.wait_for(ws.send_json(ev), SEND_TIMEOUT_S)
        except (ConnectionError, asyncio.TimeoutError, RuntimeError):
            log.info("session %s: an audio socket stopped taking events; closing it", sid)
            await _close(ws, request, 1008, b"the client does not read")
            return
        if ev.get("type") == "ended":
            await _close(ws, request, 1000, b"session ended")
            return


async def _close(ws: Any, request: Any, code: int, message: bytes) -> None:
    """Close the socket; a peer that does not take the close frame in time has its connection cut."""
    try:
        await asyncio.wait_for(ws.close(code=code, message=message), SEND_TIMEOUT_S)
    except (asyncio.TimeoutError, ConnectionError, RuntimeError):
        transport = request.transport
        if transport is not None:
            transport.abort()
