"""The ``avatar`` console command's first module: Ctrl-C is handled before anything heavy loads.

A console script imports its entry point before calling it. Were that
``avatar.cli``, a Ctrl-C during the first fraction of a second (importing
NumPy, ONNX and the plugin system) would print a ``KeyboardInterrupt``
traceback. This module imports only the standard library and imports the real
command line inside :func:`main`, where an interrupt becomes one line and the
shell's exit status for SIGINT, 130.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Console-script entry point (``avatar``)."""
    try:
        from avatar.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
