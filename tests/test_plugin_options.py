"""Plugin authors' surface: CLI options for feature sources and backends, ``auto``'s
priority, built-ins winning name clashes, and plugin commands through pluggy.

Throwaway plugin objects are registered with the real (process-wide) plugin manager,
and renders run through the real CLI with tiny real models.
"""

from __future__ import annotations

import dataclasses
import logging
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import click
import numpy as np
import pytest
from click.testing import CliRunner

from avatar import Availability, BackendUnavailable, FeatureSource, PluginError, RowStream, hookimpl
from avatar.cli import cli
from avatar.plugins import PluginManager, get_plugin_manager, reset_plugin_manager
from avatar.render import open_backend
from avatar_plugins.backends.ort import CpuBackend

SEEN: dict[str, list[dict[str, Any]]] = {"backend": [], "features": []}


class _RecordingBackend(CpuBackend):
    """The real CPU backend under another name; records the options it was given."""

    name = "test-recording"
    priority = None

    def __init__(self, model_path, options=None):  # type: ignore[no-untyped-def]
        SEEN["backend"].append(dict(options.extra))
        extra = {k: v for k, v in options.extra.items() if k != "marker"}
        super().__init__(model_path, dataclasses.replace(options, extra=extra))


class _ConstStream(RowStream):
    def __init__(self, level: float) -> None:
        self.level, self.samples, self.rows = level, 0, 0

    def _rows(self, n: int) -> np.ndarray:
        self.rows += n
        return np.full((n, 512), self.level, np.float32)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        self.samples += len(pcm)
        return self._rows(self.samples // 640 - self.rows)

    def finish(self) -> np.ndarray:
        return self._rows(-(-self.samples // 640) - self.rows)


class _ConstSource(FeatureSource):
    """A third-party feature source with its own option (``level``)."""

    name = "test-const"
    row_shape: ClassVar[tuple[int, ...]] = (512,)
    window_shape: ClassVar[tuple[int, ...]] = (32, 16, 16)

    def __init__(self, *, level: float = 0.0, padding: str | None = None) -> None:
        super().__init__(padding=padding)
        self.level = float(level)
        SEEN["features"].append({"level": level, "padding": padding})

    def open_stream(self) -> RowStream:
        return _ConstStream(self.level)


class _ThirdParty:
    @hookimpl
    def register_backends(self, register):  # type: ignore[no-untyped-def]
        register(_RecordingBackend)

    @hookimpl
    def register_feature_sources(self, register):  # type: ignore[no-untyped-def]
        register(_ConstSource)


@pytest.fixture
def global_pm():  # type: ignore[no-untyped-def]
    """The process-wide manager, fresh, forgotten again afterwards (throwaway plugins go with it)."""
    reset_plugin_manager()
    SEEN["backend"].clear()
    SEEN["features"].clear()
    yield get_plugin_manager()
    reset_plugin_manager()


@pytest.fixture
def job(tiny_job: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    return {**{k: str(v) for k, v in tiny_job.items()}, "wav": str(tiny_job["short"]), "tmp": str(tmp_path)}


def _run(job: dict[str, str], *args: str, out: str = "o.mp4") -> Any:
    base = ["run", "--avatar", job["pkg"], "--audio", job["wav"], "--model", job["unet"], "--ave-encoder", job["enc"],
            "--no-progress", "-o", str(Path(job["tmp"]) / out)]
    return CliRunner().invoke(cli, base + list(args))


# --------------------------------------------------------------------------- --backend-opt / --feature-opt


def test_backend_and_feature_options_reach_third_party_plugins(global_pm, job) -> None:  # type: ignore[no-untyped-def]
    global_pm.register(_ThirdParty(), name="third-party")
    r = _run(job, "--backend", "test-recording", "--features", "test-const",
             "--backend-opt", "marker=7", "--backend-opt", "optimization=basic", "--feature-opt", "level=0.25")
    assert r.exit_code == 0, r.output
    # (+ the thread budget's spin=0: avatar run's budget gives it to a backend that takes ONNX Runtime's options)
    assert SEEN["backend"] == [{"marker": 7, "optimization": "basic", "spin": "0"}]
    assert SEEN["features"] == [{"level": 0.25, "padding": None}]


def test_backend_and_feature_options_reach_builtins(global_pm, job) -> None:  # type: ignore[no-untyped-def]
    # a built-in backend checks its options: an unknown one is one clear line
    r = _run(job, "--backend", "cpu", "--backend-opt", "no_such_option=1")
    assert r.exit_code != 0 and "cpu: unknown option(s) no_such_option" in r.output
    r = _run(job, "--backend", "cpu", "--feature-opt", "batch=0")
    assert r.exit_code != 0 and "batch must be a positive integer" in r.output
    r = _run(job, "--backend", "cpu", "--backend-opt", "nonsense")
    assert r.exit_code != 0 and "--backend-opt expects KEY=VALUE" in r.output
    r = _run(job, "--backend", "cpu", "--backend-opt", "optimization=basic", "--feature-opt", "batch=2")
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------- auto by priority


def _backend(name: str, priority: int | None, *, usable: bool = True, fails: bool = False) -> type:
    class B(CpuBackend):
        @classmethod
        def availability(cls) -> Availability:
            return Availability.ok() if usable else Availability(False, f"{name} needs hardware that is not here")

        def __init__(self, model_path, options=None):  # type: ignore[no-untyped-def]
            if fails:
                raise BackendUnavailable(f"{name} cannot load this model")
            super().__init__(model_path, options)

    B.name, B.priority = name, priority
    return B


def _register_backends(pm: PluginManager, *classes: type) -> None:
    class P:
        @hookimpl
        def register_backends(self, register):  # type: ignore[no-untyped-def]
            for c in classes:
                register(c)

    pm.register(P(), name="prio-test")


def test_auto_picks_the_usable_backend_of_highest_priority(global_pm, job, caplog) -> None:  # type: ignore[no-untyped-def]
    _register_backends(
        global_pm,
        _backend("test-never", None),  # usable, but not for auto
        _backend("test-absent", 1000, usable=False),
        _backend("test-broken", 900, fails=True),
        _backend("test-mid", 50),
    )
    order = [r.name for r in global_pm.auto_backends()]
    assert order.index("test-absent") < order.index("test-broken") < order.index("onnx-cuda") < order.index("test-mid")
    assert order[-1] == "cpu" and "test-never" not in order and "tensorrt" not in order
    with caplog.at_level(logging.INFO, logger="avatar.compose"):
        be, used = open_backend("auto", job["unet"])
    be.close()
    best_builtin = "onnx-cuda" if global_pm.get("backend", "onnx-cuda").availability().usable else None
    assert used == (best_builtin or "test-mid")
    line = next(r.getMessage() for r in caplog.records if "backend auto: chose" in r.getMessage())
    assert f"chose {used}" in line
    assert "test-absent (priority 1000): test-absent needs hardware" in line
    assert "test-broken (priority 900): test-broken cannot load this model" in line


def test_auto_without_any_usable_backend_says_why(job) -> None:  # type: ignore[no-untyped-def]
    pm = PluginManager()  # only throwaway backends: none usable
    _register_backends(pm, _backend("test-absent", 5, usable=False))
    import avatar.compose as compose_mod  # (the composition root render() and the service share)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compose_mod, "get_plugin_manager", lambda: pm)
        with pytest.raises(BackendUnavailable, match=r"test-absent \(priority 5\): test-absent needs hardware"):
            open_backend("auto", job["unet"])


# --------------------------------------------------------------------------- built-ins win name clashes


def test_a_third_party_cannot_knock_out_a_builtin_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the entry point sorts before the built-in 'onnxruntime' plugin and registers 'cpu'
    (tmp_path / "aaa_clash_mod.py").write_text(textwrap.dedent("""
        from avatar import Backend, hookimpl

        class Impostor(Backend):
            name = "cpu"
            inputs = outputs = ()

            def _run(self, feeds):
                return {}

        @hookimpl
        def register_backends(register):
            register(Impostor)
    """))
    info = tmp_path / "aaa_clash-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: aaa-clash\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[avatar.plugins]\naaa = aaa_clash_mod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = PluginManager()
    pm.load_entry_points(strict=False)
    assert pm.records["onnxruntime"].status == "loaded", pm.records["onnxruntime"].error
    assert pm.get("backend", "cpu").distribution == "avatar-sdk"
    assert "onnx-cuda" in pm.components["backend"]
    bad = pm.records["aaa"]
    assert bad.status == "failed" and not bad.registered
    for part in ("'aaa' (aaa-clash)", "backend 'cpu'", "built-in plugin 'onnxruntime' (avatar-sdk)"):
        assert part in bad.error, bad.error
    with pytest.raises(PluginError, match="built-in plugin 'onnxruntime'"):
        PluginManager().load_entry_points(strict=True)


# --------------------------------------------------------------------------- commands through pluggy


def test_plugin_commands_go_through_pluggy() -> None:
    pm = PluginManager()

    class Named:
        # pluggy's specname: the function need not be called register_commands
        @hookimpl(specname="register_commands")
        def add_hello(self, cli):  # type: ignore[no-untyped-def]
            @cli.command("hello-specname")
            def hello() -> None:
                click.echo("hello")

    class Unmarked:
        def register_commands(self, cli):  # type: ignore[no-untyped-def]
            raise AssertionError("not a hook implementation: must not be called")

    pm.register(Named(), name="named")
    pm.register(Unmarked(), name="unmarked")
    calls: list[str] = []
    pm.pm.add_hookcall_monitoring(lambda hook, impls, kw: calls.append(hook), lambda *a: None)
    group = click.Group()
    pm.add_commands(group)
    assert "hello-specname" in group.commands
    assert pm.records["named"].commands == ["hello-specname"]
    assert pm.records["unmarked"].status == "loaded" and pm.records["unmarked"].error is None
    assert calls == ["register_commands"]
