"""Hold SIGINT/SIGTERM off while a frame is encoded and muxed.

A Python signal handler runs in the main thread between two bytecodes, so an
application whose handler raises (Python's default KeyboardInterrupt, or a
SIGTERM handler that raises it) can otherwise interrupt a sink between PyAV's
steps: after the encoder has consumed a frame but before its packets are muxed
(those packets are lost, and every later frame that refers to them decodes
wrongly), or in the middle of writing the trailer. :func:`deferred` swaps in a
handler that only notes the signal, and delivers it to the application's own
handler as soon as the block ends, so the interrupt lands between frames. A
second signal of the same kind inside the block is delivered at once (an escape
hatch, as with the engine's own handler).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    # Handlers run only in the main thread; a sink used from another thread is
    # never interrupted by them, and signal.signal() is refused there anyway.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if signum in held:  # the second one: hand it over now
            held.remove(signum)
            signal.signal(signum, previous[signum])
            signal.raise_signal(signum)
            return
        held.append(signum)

    for sig in _SIGNALS:
        current = signal.getsignal(sig)
        # an ignored signal stays ignored; a handler set outside Python (None) cannot be restored
        if current is None or current == signal.SIG_IGN:
            continue
        previous[sig] = current
        signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in held:
            signal.raise_signal(sig)
