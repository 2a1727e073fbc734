"""Plugin loading, the component registry and provenance.

Every plugin, built-in or third-party, comes through the ``avatar.plugins``
entry-point group. Each is loaded under a guard: a plugin that fails to import
is recorded with its error and the rest load (``strict=True`` or
``AVATAR_STRICT_PLUGINS=1`` makes that fatal). ``AVATAR_PLUGINS=a,b`` restricts
which entry points load (built-ins included).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import ConfigError, MissingDependency, PluginError, interrupt_behind
from .interfaces import Availability, Backend, Component, FeatureSource, Sink

ENTRY_POINT_GROUP = "avatar.plugins"
#: the distribution whose entry points are the built-in plugins
BUILTIN_DISTRIBUTION = "avatar-sdk"
KINDS: dict[str, type[Component]] = {
    "feature_source": FeatureSource,
    "backend": Backend,
    "sink": Sink,
}


@dataclass
class Registration:
    """One registered component and where it came from."""

    kind: str
    name: str
    obj: type[Component]
    plugin: str
    distribution: str | None
    version: str | None

    def availability(self) -> Availability:
        try:
            return self.obj.availability()
        except Exception as exc:  # a broken check must not break listing
            _reraise_interrupt(exc)
            return Availability(False, f"availability check failed: {exc}")


def _reraise_interrupt(exc: Exception) -> None:
    """A plugin "failing" because Ctrl-C/SIGTERM landed in its imports is an interrupt, not a broken plugin."""
    interrupt = interrupt_behind(exc)
    if interrupt is not None:
        raise interrupt


@dataclass
class PluginRecord:
    """A plugin (one entry point or one object registered by code)."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    status: str = "loaded"  # loaded | failed | unavailable
    error: str | None = None
    install: str | None = None
    registered: list[Registration] = field(default_factory=list)
    #: CLI commands the plugin added (known once the CLI has started)
    commands: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        comps = []
        for r in self.registered:
            a = r.availability()
            comps.append(
                {
                    "kind": r.kind,
                    "name": r.name,
                    "usable": a.usable,
                    "reason": a.reason or None,
                    "install": a.install,
                }
            )
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.effective_status(),
            "error": self.error,
            "install": self.install,
            "registered": comps,
            "commands": list(self.commands),
        }

    def effective_status(self) -> str:
        if self.status != "loaded" or not self.registered:
            return self.status
        avail = [r.availability() for r in self.registered]
        if not any(a.usable for a in avail):
            if self.install is None:
                self.install = next((a.install for a in avail if a.install), None)
            return "unavailable"
        return "loaded"


class PluginManager:
    """Loads plugins and owns the registry of feature sources, backends and sinks."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.components: dict[str, dict[str, Registration]] = {k: {} for k in KINDS}
        self._commands_added = False

    # ------------------------------------------------------------------ loading

    def load_entry_points(self, *, strict: bool | None = None, only: Iterable[str] | None = None) -> None:
        """Load every plugin of the entry-point group under a guard."""
        if strict is None:
            strict = os.environ.get("AVATAR_STRICT_PLUGINS", "") not in ("", "0", "false")
        if only is None and os.environ.get("AVATAR_PLUGINS"):
            only = [n.strip() for n in os.environ["AVATAR_PLUGINS"].split(",") if n.strip()]
        wanted = set(only) if only is not None else None
        def dist_name(ep: md.EntryPoint) -> str:
            dist = getattr(ep, "dist", None)
            return dist.metadata["Name"] if dist is not None else ""

        # Every built-in loads before any third-party plugin, whatever the names: a third
        # party that registers a built-in component name (or reuses an entry-point name)
        # then fails on its own, instead of knocking out the built-in plugin that came later.
        eps = sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (dist_name(e) != BUILTIN_DISTRIBUTION, e.name))
        seen: dict[str, str] = {}
        for ep in eps:
            if wanted is not None and ep.name not in wanted:
                continue
            dist = getattr(ep, "dist", None)
            rec = PluginRecord(
                ep.name,
                ep.value,
                dist.metadata["Name"] if dist is not None else None,
                dist.version if dist is not None else None,
            )
            if ep.name in seen:
                if seen[ep.name] == (rec.distribution or ""):
                    continue  # the same distribution seen twice on sys.path
                rec.status = "failed"
                rec.error = (
                    f"entry point name '{ep.name}' is already used by {seen[ep.name] or 'another plugin'}; "
                    f"{rec.distribution or 'this plugin'} must use another name"
                )
                rec.name = f"{ep.name} ({rec.distribution})"
                self.records[rec.name] = rec
                if strict:
                    raise PluginError(rec.error)
                continue
            seen[ep.name] = rec.distribution or ""
            self.records[ep.name] = rec
            try:
                plugin = ep.load()
                self.register(plugin, name=ep.name, record=rec)
            except MissingDependency as exc:
                rec.status, rec.error, rec.install = "unavailable", str(exc), exc.install
                if strict:
                    raise PluginError(f"plugin '{ep.name}' ({ep.value}) is unavailable: {exc}") from exc
            except PluginError as exc:
                rec.status, rec.error = "failed", str(exc)
                if strict:
                    raise
            except Exception as exc:
                _reraise_interrupt(exc)
                rec.status, rec.error = "failed", f"{exc.__class__.__name__}: {exc}"
                if strict:
                    raise PluginError(f"plugin '{ep.name}' ({ep.value}) failed to load: {rec.error}") from exc
        if strict:
            self.pm.check_pending()

    def register(self, plugin: object, *, name: str | None = None, record: PluginRecord | None = None) -> PluginRecord:
        """Register a plugin object or module and collect what its hooks register.

        Tests and applications can register throwaway plugin objects this way.
        """
        if name is None:
            name = getattr(plugin, "__name__", None) or plugin.__class__.__name__
        if record is None:
            record = PluginRecord(name, getattr(plugin, "__name__", repr(plugin)))
            if isinstance(plugin, types.ModuleType):
                record.distribution, record.version = _distribution_of(plugin.__name__)
            self.records[name] = record
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name) if self.pm.get_plugin(name) is not None else None
            raise PluginError(f"plugin '{name}' has an invalid hook: {exc}") from exc
        except ValueError as exc:
            raise PluginError(f"plugin '{name}' is already registered ({exc})") from exc
        try:
            for kind, hook in (
                ("feature_source", "register_feature_sources"),
                ("backend", "register_backends"),
                ("sink", "register_sinks"),
            ):
                self._call_one(plugin, hook, register=self._registrar(kind, record))
        except BaseException:
            self._rollback(name, record)  # a failed plugin contributes nothing
            raise
        return record

    def _call_one(self, plugin: object, hook: str, **kwargs: Any) -> None:
        """Call ``hook`` through pluggy for ``plugin`` alone (so a failure is that plugin's)."""
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        self.pm.subset_hook_caller(hook, remove_plugins=others)(**kwargs)

    def _rollback(self, name: str, record: PluginRecord) -> None:
        for reg in record.registered:
            if self.components[reg.kind].get(reg.name) is reg:
                del self.components[reg.kind][reg.name]
        record.registered.clear()
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)

    def _registrar(self, kind: str, record: PluginRecord):  # type: ignore[no-untyped-def]
        base = KINDS[kind]

        def register(obj: Any) -> None:
            if not (isinstance(obj, type) and issubclass(obj, base)):
                raise PluginError(
                    f"plugin '{record.name}' registered {obj!r} as a {kind.replace('_', ' ')}, "
                    f"but it is not a subclass of avatar.{base.__name__}"
                )
            cname = getattr(obj, "name", None)
            if not isinstance(cname, str) or not cname:
                raise PluginError(f"plugin '{record.name}' registered {obj.__name__} without a 'name'")
            existing = self.components[kind].get(cname)
            if existing is not None and existing.distribution == BUILTIN_DISTRIBUTION:
                raise PluginError(
                    f"plugin '{record.name}' ({record.distribution or 'no distribution'}) registers "
                    f"{kind.replace('_', ' ')} '{cname}', a name of the built-in plugin '{existing.plugin}' "
                    f"({BUILTIN_DISTRIBUTION}); built-in names cannot be replaced: rename the component "
                    f"in '{record.name}'"
                )
            if existing is not None:
                raise PluginError(
                    f"{kind.replace('_', ' ')} name '{cname}' is registered by both plugin "
                    f"'{existing.plugin}' ({existing.distribution or 'no distribution'}) and plugin "
                    f"'{record.name}' ({record.distribution or 'no distribution'})"
                )
            reg = Registration(kind, cname, obj, record.name, record.distribution, record.version)
            self.components[kind][cname] = reg
            record.registered.append(reg)

        return register

    def add_commands(self, cli: Any) -> None:
        """Let plugins add CLI commands; a plugin that fails here is recorded, not fatal."""
        if self._commands_added:
            return
        self._commands_added = True
        import click

        implementers = {id(impl.plugin) for impl in self.pm.hook.register_commands.get_hookimpls()}
        for name, plugin in self.pm.list_name_plugin():
            if id(plugin) not in implementers:
                continue
            before = set(cli.commands)
            try:
                # a throwaway group catches collisions before touching the real CLI; the call
                # goes through pluggy (specname, hook-call monitoring) for this plugin alone
                probe = click.Group()
                self._call_one(plugin, "register_commands", cli=probe)
                clash = sorted(set(probe.commands) & before)
                if clash:
                    raise PluginError(
                        f"plugin '{name}' adds command(s) {', '.join(clash)} that already exist"
                    )
                for cmd_name, cmd in probe.commands.items():
                    cli.add_command(cmd, cmd_name)
                rec = self.records.get(name)
                if rec is not None:
                    rec.commands.extend(sorted(probe.commands))
            except Exception as exc:
                _reraise_interrupt(exc)
                rec = self.records.get(name)
                if rec is not None:
                    rec.status = "failed"
                    rec.error = f"register_commands: {exc}"
                    self._rollback(name, rec)

    # ------------------------------------------------------------------ lookup

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> Registration:
        """The registration of ``name``; a clear error lists what exists."""
        reg = self.components[kind].get(name)
        if reg is None:
            failed = [r for r in self.records.values() if r.status != "loaded" and name in r.name]
            hint = f"; plugin '{failed[0].name}' did not load: {failed[0].error}" if failed else ""
            raise ConfigError(
                f"no {kind.replace('_', ' ')} named '{name}' (available: {', '.join(self.names(kind)) or 'none'}){hint}"
            )
        return reg

    def require(self, kind: str, name: str) -> type[Component]:
        """The class of ``name``, checked usable here."""
        reg = self.get(kind, name)
        a = reg.availability()
        if not a.usable:
            from .errors import BackendUnavailable

            fix = f"; install it with `{a.install}`" if a.install else ""
            raise BackendUnavailable(f"{kind.replace('_', ' ')} '{name}' is unavailable: {a.reason}{fix}")
        return reg.obj

    def feature_source(self, name: str, **options: Any) -> FeatureSource:
        return self.require("feature_source", name)(**options)  # type: ignore[return-value]

    def auto_backends(self) -> list[Registration]:
        """Backends ``auto`` may choose, best first: by declared ``priority``, then by name.

        A backend whose ``priority`` is None (the default) is never chosen by ``auto``.
        """
        regs = [r for r in self.components["backend"].values() if _priority(r) is not None]
        return sorted(regs, key=lambda r: (-_priority(r), r.name))  # type: ignore[operator]

    def backend_class(self, name: str) -> type[Backend]:
        return self.require("backend", name)  # type: ignore[return-value]

    def sink(self, name: str, **options: Any) -> Sink:
        return self.require("sink", name)(**options)  # type: ignore[return-value]


def _priority(reg: Registration) -> int | None:
    value = getattr(reg.obj, "priority", None)
    # a bool is an int to Python but not a declared priority
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _distribution_of(module: str) -> tuple[str | None, str | None]:
    top = module.split(".")[0]
    for dist_name in md.packages_distributions().get(top, []):
        try:
            return dist_name, md.version(dist_name)
        except md.PackageNotFoundError:
            continue
    return None, None


_default: PluginManager | None = None
_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loading entry points on first use."""
    global _default
    with _lock:
        if _default is None:
            pm = PluginManager()
            pm.load_entry_points()
            _default = pm
        return _default


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests, or after installing a plugin)."""
    global _default
    with _lock:
        _default = None
