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
client is attached for ``client_timeout_s``.
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


async def audio_socket(request: "web.Request", s: "ServerSession", limits: "Limits") -> Any:
    from aiohttp import WSMsgType, web

    ws = web.WebSocketResponse(heartbeat=limits.heartbeat_s, max_msg_size=limits.max_message_bytes)
    await ws.prepare(request)
    key = object()
    s.attach(key)
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    s.subscribers.add(events)
    sender = asyncio.create_task(_send_events(ws, events))
    rate: int | None = None
    await events.put({"type": "ready", "id": s.id, "fps": float(s.live.fps),
                      "max_message_bytes": limits.max_message_bytes})

    def error(message: str) -> None:
        events.put_nowait({"type": "error", "message": message})

    try:
        async for msg in ws:
            s.touch()
            if msg.type == WSMsgType.TEXT:
                try:
                    data = json.loads(msg.data)
                    if not isinstance(data, dict):
                        raise ValueError("not an object")
                except ValueError:
                    error('malformed JSON: text messages are JSON objects like {"type": "flush"}')
                    continue
                kind = data.get("type", "format" if "sample_rate" in data else None)
                if kind in ("format", "start"):
                    r = data.get("sample_rate")
                    if not isinstance(r, int) or not limits.min_sample_rate <= r <= limits.max_sample_rate:
                        error(f"sample_rate must be a whole number of Hz from {limits.min_sample_rate} "
                              f"to {limits.max_sample_rate}, not {r!r}")
                        continue
                    rate = r
                elif kind == "flush":
                    await _call(s.live.flush, error)
                elif kind == "interrupt":
                    pos = await _call(s.live.interrupt, error)
                    if pos is not None:
                        s.publish({"type": "interrupted", "position_s": round(float(pos), 4), "t": time.time()})
                else:
                    error(f"unknown message type {kind!r}; use format, flush or interrupt")
            elif msg.type == WSMsgType.BINARY:
                if rate is None:
                    error('send the format message first: {"type": "format", "sample_rate": 16000}; audio dropped')
                    continue
                if len(msg.data) % 2:
                    error(f"PCM16 needs an even number of bytes, got {len(msg.data)}; message dropped")
                    continue
                pcm = np.frombuffer(msg.data, dtype="<i2")
                if not check_pace(s, len(pcm) / rate, limits, error):
                    continue
                await _call(lambda pcm=pcm, rate=rate: s.live.push(pcm, rate), error)
            elif msg.type == WSMsgType.ERROR:
                log.info("session %s: audio socket error: %s", s.id, ws.exception())
                break
    finally:
        s.subscribers.discard(events)
        s.detach(key)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
    return ws


def check_pace(s: "ServerSession", seconds: float, limits: "Limits", error: Any) -> bool:
    """Refuse audio that runs more than ``max_ahead_s`` ahead of real time."""
    now = time.monotonic()
    if s.first_push is None:
        s.first_push = now
    ahead = s.pushed_s + seconds - (now - s.first_push)
    if ahead > limits.max_ahead_s:
        error(f"audio arrives too fast: it would run {ahead:.0f} s ahead of real time "
              f"(limit {limits.max_ahead_s:g} s); audio dropped")
        return False
    s.pushed_s += seconds
    return True


async def _call(fn: Any, error: Any) -> Any:
    """Run a session call; an AvatarError becomes an error event (the session keeps going)."""
    try:
        return fn()
    except AvatarError as exc:
        error(str(exc))
        return None


async def _send_events(ws: Any, events: asyncio.Queue[dict[str, Any]]) -> None:
    while True:
        ev = await events.get()
        if ws.closed:
            return
        try:
            await asyncio.wait_for(ws.send_json(ev), 5.0)
        except (ConnectionError, asyncio.TimeoutError, RuntimeError):
            return
        if ev.get("type") == "ended":
            await ws.close(code=1000, message=b"session ended")
            return
