"""The one user-facing error hierarchy.

Everything the library raises for a condition a user can cause derives from
:class:`AvatarError`; the CLI prints its message on one line and exits non-zero
(``avatar --debug ...`` shows the traceback). Messages say what to do next.
"""

from __future__ import annotations


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised once it is safe to; ``signum`` gives the exit status 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = int(signum)


class AvatarError(Exception):
    """Base class of every error a user can cause or fix."""

    exit_code = 1


def interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM raised like it) that caused ``exc``, if one did.

    A signal that lands while a C extension initialises comes out of the import
    as ``ImportError: initialization failed`` (pybind11: onnxruntime, ...), with
    the interrupt as its cause. Code that catches a failed import (an optional
    plugin) must re-raise the interrupt, not swallow it as a broken plugin.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class ConfigError(AvatarError):
    """An option or argument is invalid or options contradict each other."""

    exit_code = 2


class MissingDependency(AvatarError):
    """An optional package is not installed.

    The message always carries the exact command that installs it.
    """

    def __init__(self, package: str, extra: str | None = None, *, feature: str = "") -> None:
        self.package = package
        self.extra = extra
        self.install = (
            f"pip install 'avatar-sdk[{extra}]'" if extra else f"pip install {package}"
        )
        what = f" for {feature}" if feature else ""
        super().__init__(f"{package} is not installed{what}; install it with `{self.install}`")


class PluginError(AvatarError):
    """A plugin failed to load, registered something invalid, or collided with another."""


class ModelError(AvatarError):
    """A model file is missing, unreadable, or does not match the UNet-328 contract."""


class AudioError(AvatarError):
    """An audio file or stream cannot be decoded or is empty."""


class FeatureError(AvatarError):
    """A feature source cannot produce features (bad model, bad input, mismatch)."""


class AvatarPackageError(AvatarError):
    """An avatar package or an import source is missing parts or inconsistent."""


class BackendError(AvatarError):
    """An inference backend cannot load a model or run it."""


class BackendUnavailable(BackendError):
    """The backend cannot run on this machine (no GPU, no driver, provider fell back)."""


class SinkError(AvatarError):
    """A sink cannot open, write or finalise its output."""


class StreamError(SinkError):
    """A live stream failed (server unreachable, vanished for too long, stalled)."""
