"""The ``avatar`` command line: one module per command, plus plugin commands.

The edge here turns :class:`avatar.AvatarError` into one line on stderr and a
non-zero exit; ``--debug`` (or ``AVATAR_DEBUG=1``) shows the traceback.

Libraries' own chatter stays off the user's terminal unless asked for: Python
warnings (NumPy's RuntimeWarnings, ...) go through logging and show with
``--debug`` or ``-vv``; ONNX Runtime's log lines (printed by its C++ core, not
through Python) are held back by the backends on the same switch (see
``ort_log_severity`` in the built-in backends).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from typing import Any

import click

from ..errors import AvatarError, interrupt_behind

# (module, command attribute) of the core's own commands; imported lazily so
# `avatar --help` stays fast and heavy packages load only for the command used.
CORE_COMMANDS = [
    ("plugins_cmd", "plugins"),
    ("inspect_cmd", "inspect"),
    ("models_cmd", "make_test_model"),
    ("import_cmd", "import_"),
    ("prepare_cmd", "prepare"),
    ("run_cmd", "run"),
    ("demo_cmd", "demo"),
    ("convert_cmd", "convert"),
    ("bench_cmd", "bench"),
    ("serve_cmd", "serve"),
    ("batch_cmd", "run_batch"),
]


class AvatarCLI(click.Group):
    """A group that loads core commands lazily and adds plugin commands."""

    _loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        import importlib

        for mod_name, attr in CORE_COMMANDS:
            try:
                mod = importlib.import_module(f"{__name__}.{mod_name}")
            except ModuleNotFoundError as exc:
                if exc.name == f"{__name__}.{mod_name}":
                    continue  # command not built yet in this checkout
                raise
            self.add_command(getattr(mod, attr))
        from ..plugins import get_plugin_manager

        get_plugin_manager().add_commands(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AvatarError as exc:
            if _debug(ctx):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            _interrupted(ctx, exc)
        except Exception as exc:
            # a signal inside a C extension's initialisation: "ImportError: initialization failed"
            interrupt = interrupt_behind(exc)
            if interrupt is None or _debug(ctx):
                raise
            _interrupted(ctx, interrupt)


def _interrupted(ctx: click.Context, exc: KeyboardInterrupt) -> None:
    click.echo("interrupted", err=True)
    # 128 + the signal, the shell's convention: 130 for Ctrl-C, 143 for SIGTERM (a command's Terminated)
    ctx.exit(128 + int(getattr(exc, "signum", signal.SIGINT)))


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool((root.obj or {}).get("debug")) or os.environ.get("AVATAR_DEBUG", "") not in ("", "0")


@click.group(cls=AvatarCLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug logs).")
@click.version_option(package_name="avatar-sdk")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """avatar-sdk: speech in, a lip-synced talking-head video out."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    if debug:
        # the library and the worker processes it starts read the switch from here
        os.environ["AVATAR_DEBUG"] = "1"
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    show = _debug(ctx) or verbose >= 2
    logging.getLogger("py.warnings").setLevel(logging.NOTSET if show else logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Run the command line (the console script enters through ``avatar_launcher``)."""
    cli.main(args=argv, prog_name="avatar")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
