"""The ``avatar`` console command's first module: Ctrl-C is handled before anything heavy loads.

A console script imports its entry point before calling it. Were that
``avatar.cli``, a Ctrl-C during the first fraction of a second (importing
NumPy, ONNX and the plugin system) would print a ``KeyboardInterrupt``
traceback, or worse an ``ImportError``: an interrupt that lands inside a C
extension's initialisation comes out as a failed import. This module imports
only the standard library, holds a Ctrl-C back while the real command line is
imported (a second one interrupts at once), and turns an interrupt into one
line and the shell's exit status for SIGINT, 130.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn


def _interrupted() -> NoReturn:
    sys.stderr.write("interrupted\n")
    sys.exit(130)


def main() -> None:
    """Console-script entry point (``avatar``)."""
    pending: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if pending:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        pending.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        from avatar.cli import main as cli_main
    except BaseException:
        if pending:
            _interrupted()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        _interrupted()
    try:
        cli_main()
    except KeyboardInterrupt:
        _interrupted()


if __name__ == "__main__":  # pragma: no cover
    main()
