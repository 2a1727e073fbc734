"""Hook specifications: the whole plugin surface of avatar-sdk.

A plugin is a module (or object) exposed through the ``avatar.plugins``
entry-point group whose functions are marked with :data:`hookimpl` and named
like the specifications below. Hooks *register* things; they do not do things.
The host passes a ``register`` callable, owns name collisions and type checks,
and records which distribution provided each registration.
"""

from __future__ import annotations

from typing import Any, Callable

import click
import pluggy

PROJECT = "avatar"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[Any], None]


@hookspec
def register_feature_sources(register: Register) -> None:
    """Register audio feature sources (called once, when plugins load).

    :param register: call ``register(cls)`` once per class; ``cls`` subclasses
        :class:`avatar.FeatureSource` and has a unique ``name``.
    Returns nothing.
    """


@hookspec
def register_backends(register: Register) -> None:
    """Register inference backends (called once, when plugins load).

    :param register: call ``register(cls)`` once per class; ``cls`` subclasses
        :class:`avatar.Backend` and has a unique ``name``.
    Returns nothing.
    """


@hookspec
def register_sinks(register: Register) -> None:
    """Register output sinks (called once, when plugins load).

    :param register: call ``register(cls)`` once per class; ``cls`` subclasses
        :class:`avatar.Sink` and has a unique ``name``.
    Returns nothing.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``avatar`` command line (called when the CLI starts).

    Called through pluggy once per plugin (so ``specname`` and hook-call monitoring
    work), each time with a fresh group whose commands are then added to the CLI.

    :param cli: a :class:`click.Group`; use ``@cli.command()`` or
        ``cli.add_command(...)``. A name already taken is a collision error.
    Returns nothing.
    """
