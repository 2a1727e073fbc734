"""Session events: what a subscriber hears, and an async iterator over them for asyncio servers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .session import Session


@dataclass(frozen=True)
class SessionEvent:
    """Something a subscriber hears about. ``kind`` is one of:

    ``speech_started`` (``latency_s``: first push of the utterance → its first
    frame at the sinks; ``inherent_s``: the part the model's and the feature
    source's look-ahead make unavoidable), ``speech_ended`` and ``interrupted``
    (``position_s``: seconds of the utterance shown), ``stats`` (periodic:
    ``stats``), ``error`` (``error``: the message; the session has ended) and
    ``closed``.
    """

    kind: str
    session: str
    frame: int
    time: float
    latency_s: float | None = None
    inherent_s: float | None = None
    position_s: float | None = None
    #: speech_started: what the session added — from the push that completed the first frame's audio window to the frame
    added_s: float | None = None
    #: speech_started: the walk position of the utterance's first frame
    walk_position: int | None = None
    skipped: int = 0
    lag_s: float = 0.0
    error: str | None = None
    stats: dict[str, Any] | None = None



class EventStream:
    """An async iterator over a session's events (see :meth:`Session.events`)."""

    def __init__(self, session: Session, maxsize: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._q: asyncio.Queue[SessionEvent] = asyncio.Queue(maxsize)
        self._done = False
        self._unsubscribe = session.subscribe(self._put)
        if session.closed:
            self._done = True

    def _put(self, ev: SessionEvent) -> None:
        def add() -> None:
            if self._q.full():
                self._q.get_nowait()
            self._q.put_nowait(ev)

        self._loop.call_soon_threadsafe(add)

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> SessionEvent:
        if self._done:
            self._unsubscribe()
            raise StopAsyncIteration
        ev = await self._q.get()
        if ev.kind == "closed":
            self._done = True
        return ev

    def close(self) -> None:
        """Stop listening."""
        self._done = True
        self._unsubscribe()
