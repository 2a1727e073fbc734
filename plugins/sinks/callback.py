"""The ``callback`` sink: hands every frame to user code.

From Python, ``CallbackSink(fn)`` (or ``CallbackSink(fn, with_face=True)`` to
also get the 320x320 model output and its box in the full frame) is usable
directly. The frame object is passed as is: ``frame.image`` may be reused by
the engine after ``fn`` returns, so copy what you keep.

An exception in ``fn`` stops the run: it propagates as a :class:`SinkError`
whose ``__cause__`` is the original exception.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from avatar.errors import ConfigError, SinkError
from avatar.hookspecs import hookimpl
from avatar.interfaces import Sink, SinkReport, StreamInfo, VideoFrame

from ._options import as_bool

log = logging.getLogger(__name__)


class CallbackSink(Sink):
    """Calls ``fn(frame)`` for each frame, in index order."""

    name = "callback"
    description = "calls a Python function with each frame (optionally the 320 face and its box)"

    def __init__(
        self,
        fn: Callable[[VideoFrame], Any] | None = None,
        *,
        with_face: bool = False,
        on_open: Callable[[StreamInfo], Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(fn=fn, with_face=with_face, on_open=on_open, **options)
        if options:
            raise ConfigError(
                f"unknown option(s) for the callback sink: {', '.join(sorted(options))}; "
                "known: fn, with_face, on_open"
            )
        if fn is None or not callable(fn):
            raise ConfigError(
                "the callback sink needs fn, a callable taking a VideoFrame "
                "(Python API only: CallbackSink(fn) or sink('callback', fn=...))"
            )
        if on_open is not None and not callable(on_open):
            raise ConfigError("on_open must be a callable taking a StreamInfo")
        self.fn = fn
        self.on_open = on_open
        # The base class declares wants_face as a ClassVar; the engine reads it
        # from the instance, so a per-instance value is the switch.
        self.wants_face = as_bool(with_face, "with_face")  # type: ignore[misc]
        self.info: StreamInfo | None = None
        self._frames = 0
        self._closed = False

    def open(self, info: StreamInfo) -> None:
        self.info = info
        if self.on_open is not None:
            self._call(self.on_open, info, "on_open")

    def write(self, frame: VideoFrame) -> None:
        self._call(self.fn, frame, "callback")
        self._frames += 1

    def _call(self, fn: Callable[[Any], Any], arg: Any, what: str) -> None:
        try:
            fn(arg)
        except Exception as exc:
            name = getattr(fn, "__qualname__", None) or repr(fn)
            where = f" at frame {arg.index}" if isinstance(arg, VideoFrame) else ""
            raise SinkError(f"the {what} {name} raised {exc.__class__.__name__}{where}: {exc}") from exc

    def close(self, aborted: bool = False) -> SinkReport:
        self._closed = True
        return SinkReport(frames=self._frames, details={"aborted": aborted})


@hookimpl
def register_sinks(register):  # type: ignore[no-untyped-def]
    register(CallbackSink)
