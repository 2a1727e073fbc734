"""The ``avatar`` console command's first module: Ctrl-C is handled before anything heavy loads.

A console script imports its entry point before calling it. Were that
``avatar.cli``, a Ctrl-C during the first fraction of a second (importing
NumPy, ONNX and the plugin system) would print a ``KeyboardInterrupt``
traceback, or worse an ``ImportError``: an interrupt that lands inside a C
extension's initialisation comes out as a failed import. This module imports
only the standard library, holds a Ctrl-C (or a SIGTERM) back while the real
command line is imported (a second one interrupts at once), and turns it into
one line and the shell's exit status for the signal (130 for SIGINT, 143 for
SIGTERM). From then on a SIGTERM is raised like Ctrl-C's KeyboardInterrupt
(its default would kill the command silently, mid-write, before the command's
own handling is in place), and neither is raised inside an import (see
:func:`_interrupt`).

The holding handler is installed as this module is imported, before anything
else loads (``typing`` alone takes milliseconds), so a signal between the
console script's import of this module and its call of :func:`main` is held
too. What remains is the interpreter's own start-up, before any of our code
runs, which no Python program can cover.
"""

from __future__ import annotations

import os
import signal
import sys
import time

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing here would widen the unguarded start
if TYPE_CHECKING:
    from typing import Any, NoReturn

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_pending: list[int] = []


def _hold(signum: int, frame: Any) -> None:
    if _pending:  # a second signal: the user means it
        raise KeyboardInterrupt
    _pending.append(signum)


def _install() -> dict[int, Any]:
    return {sig: signal.signal(sig, _hold) for sig in _SIGNALS}


# installed on import: the console script imports this module, then calls main()
_previous = _install()


class Terminated(KeyboardInterrupt):
    """SIGTERM raised as Ctrl-C's KeyboardInterrupt is, so every command cleans up and reports it the same way."""

    signum = signal.SIGTERM


_redelivery: list[int] = []  # a signal put off while an import ran, waiting to be sent again


def _importing(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _send_again(signum: int) -> None:
    time.sleep(0.02)
    _redelivery.clear()
    os.kill(os.getpid(), signum)


def _interrupt(signum: int, frame: Any) -> None:
    """Raise Ctrl-C's KeyboardInterrupt (or :class:`Terminated`), but never inside an import.

    The commands import NumPy, ONNX, ONNX Runtime and OpenVINO lazily. An
    exception raised while a C extension initialises crashes some of them
    (``import onnx``: ``terminate called after throwing an instance of
    'nanobind::python_error'``, SIGABRT; also SIGSEGV) and turns others into
    ``ImportError: initialization failed`` that an optional-plugin check then
    takes for a broken install. So a signal that lands inside an import is sent
    again a moment later, until it lands outside one.
    """
    if _importing(frame):
        if not _redelivery:
            import threading

            _redelivery.append(signum)
            threading.Thread(target=_send_again, args=(signum,), daemon=True).start()
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _interrupted(signum: int | None = None) -> NoReturn:
    sys.stderr.write("interrupted\n")
    sys.exit(128 + int(signum or (_pending[0] if _pending else signal.SIGINT)))


def main() -> None:
    """Console-script entry point (``avatar``)."""
    global _previous
    if signal.getsignal(signal.SIGINT) is not _hold:  # main() called again in one process (tests, embedding)
        _pending.clear()
        _previous = _install()
    try:
        from avatar.cli import main as cli_main
    except BaseException:
        if _pending:
            _interrupted()
        raise
    finally:
        for sig, previous in _previous.items():
            # Python's Ctrl-C handler, and SIGTERM's default (which would kill the command silently,
            # mid-write, until it installs its own handler), become _interrupt. An inherited SIG_IGN stays.
            ours = previous in (signal.SIG_DFL, signal.default_int_handler)
            signal.signal(sig, _interrupt if ours else previous)
    if _pending:
        _interrupted()
    try:
        cli_main()
    except KeyboardInterrupt as exc:  # a command's SIGTERM comes as a KeyboardInterrupt that names its signal
        _interrupted(getattr(exc, "signum", None))
    finally:
        # The command is over, its outputs written or removed: a signal now (threads being joined, atexit)
        # would only turn its exit status into a kill or a traceback while the interpreter shuts down.
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":  # pragma: no cover
    main()
