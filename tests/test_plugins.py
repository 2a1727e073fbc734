"""The plugin system through the real plugin manager, real entry points and the real CLI."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from avatar import Availability, PluginError, Sink, SinkReport, hookimpl, hookspecs
from avatar.cli import cli
from avatar.plugins import PluginManager

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = {"ave", "precomputed", "hubert", "wenet", "onnxruntime", "tensorrt", "file", "callback", "rtmp", "torch-reference"}


class _NullSink(Sink):
    name = "null-test"

    def open(self, info):  # type: ignore[no-untyped-def]
        pass

    def write(self, frame):  # type: ignore[no-untyped-def]
        pass

    def close(self, aborted=False):  # type: ignore[no-untyped-def]
        return SinkReport()


class _NeedsPkg(Sink):
    name = "needs-pkg"

    @classmethod
    def availability(cls) -> Availability:
        return Availability.missing("somepkg", "somepkg")

    open = write = _NullSink.open  # type: ignore[assignment]
    close = _NullSink.close  # type: ignore[assignment]


def test_every_hook_is_documented() -> None:
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("register_")]
    assert set(specs) == {"register_feature_sources", "register_backends", "register_sinks", "register_commands"}
    for n in specs:
        doc = getattr(hookspecs, n).__doc__ or ""
        assert "called" in doc.lower() and ":param" in doc, n


def test_register_throwaway_plugin_records_components() -> None:
    pm = PluginManager()

    class Plugin:
        @hookimpl
        def register_sinks(self, register):  # type: ignore[no-untyped-def]
            register(_NullSink)

    rec = pm.register(Plugin(), name="throwaway")
    assert [(r.kind, r.name) for r in rec.registered] == [("sink", "null-test")]
    assert pm.get("sink", "null-test").plugin == "throwaway"
    assert isinstance(pm.sink("null-test"), _NullSink)


def test_name_collision_names_both_plugins() -> None:
    pm = PluginManager()

    class A:
        @hookimpl
        def register_sinks(self, register):  # type: ignore[no-untyped-def]
            register(_NullSink)

    class B(A):
        pass

    pm.register(A(), name="first-plugin")
    with pytest.raises(PluginError) as err:
        pm.register(B(), name="second-plugin")
    assert "first-plugin" in str(err.value) and "second-plugin" in str(err.value) and "null-test" in str(err.value)


def test_registering_a_non_component_is_an_error() -> None:
    pm = PluginManager()

    class Bad:
        @hookimpl
        def register_sinks(self, register):  # type: ignore[no-untyped-def]
            register(object)

    with pytest.raises(PluginError, match="not a subclass of avatar.Sink"):
        pm.register(Bad(), name="bad")


def test_misspelled_hook_fails_loudly() -> None:
    pm = PluginManager()

    class Typo:
        @hookimpl
        def register_sink(self, register):  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(PluginError, match="invalid hook"):
        pm.register(Typo(), name="typo")


def test_unavailable_component_has_install_command() -> None:
    pm = PluginManager()

    class P:
        @hookimpl
        def register_sinks(self, register):  # type: ignore[no-untyped-def]
            register(_NeedsPkg)

    rec = pm.register(P(), name="p")
    d = rec.to_dict()
    assert d["status"] == "unavailable"
    assert d["registered"][0]["install"] == "pip install 'avatar-sdk[somepkg]'"
    from avatar import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="somepkg"):
        pm.sink("needs-pkg")


def test_unknown_component_lists_what_exists() -> None:
    pm = PluginManager()
    with pytest.raises(Exception, match="no sink named 'nope'"):
        pm.sink("nope")


def test_builtins_load_through_entry_points() -> None:
    pm = PluginManager()
    pm.load_entry_points(strict=False)
    assert BUILTIN <= set(pm.records)
    for name in BUILTIN:
        rec = pm.records[name]
        assert rec.distribution == "avatar-sdk", name
        assert rec.status in ("loaded", "unavailable"), (name, rec.error)


def test_env_var_restricts_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATAR_PLUGINS", "file,callback")
    pm = PluginManager()
    pm.load_entry_points()
    assert set(pm.records) == {"file", "callback"}


def _fake_dist(tmp: Path, name: str, module_src: str, ep_name: str) -> Path:
    """A minimal installed distribution (dist-info + module) in ``tmp``."""
    mod = f"{name.replace('-', '_')}_mod"
    (tmp / f"{mod}.py").write_text(textwrap.dedent(module_src))
    info = tmp / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[avatar.plugins]\n{ep_name} = {mod}\n")
    return tmp


def test_failing_third_party_plugin_does_not_break_cli(tmp_path: Path) -> None:
    _fake_dist(tmp_path, "broken-plugin", "raise RuntimeError('boom at import')\n", "broken")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "avatar.cli", "plugins", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    data = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
    assert data["broken"]["status"] == "failed"
    assert "boom at import" in data["broken"]["error"]
    assert data["broken"]["distribution"] == "broken-plugin"
    assert data["file"]["status"] == "loaded"
    # strict mode turns the failure into an error with one clear line
    env["AVATAR_STRICT_PLUGINS"] = "1"
    out = subprocess.run([sys.executable, "-m", "avatar.cli", "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "broken" in out.stderr and "boom at import" in out.stderr
    assert "Traceback" not in out.stderr


def test_plugin_missing_dependency_is_unavailable(tmp_path: Path) -> None:
    src = """
    from avatar import MissingDependency
    raise MissingDependency("frobnicate", "frob")
    """
    _fake_dist(tmp_path, "frob-plugin", src, "frob")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "avatar.cli", "plugins", "--json"], capture_output=True, text=True, env=env, timeout=120)
    data = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
    assert data["frob"]["status"] == "unavailable"
    assert data["frob"]["install"] == "pip install 'avatar-sdk[frob]'"


def test_plugin_commands_are_added_and_collisions_reported(tmp_path: Path) -> None:
    src = """
    import click
    from avatar import hookimpl

    @hookimpl
    def register_commands(cli):
        @cli.command("hello-plugin")
        def hello():
            click.echo("hello from a plugin")

        @cli.command("plugins")
        def clash():
            pass
    """
    _fake_dist(tmp_path, "cmd-plugin", src, "cmds")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "avatar.cli", "plugins", "--json"], capture_output=True, text=True, env=env, timeout=120)
    data = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
    assert data["cmds"]["status"] == "failed" and "plugins" in data["cmds"]["error"]
    # the built-in command still works, the clashing plugin's commands are not added
    out = subprocess.run([sys.executable, "-m", "avatar.cli", "hello-plugin"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0


def test_cli_plugins_table_and_json() -> None:
    r = CliRunner().invoke(cli, ["plugins"])
    assert r.exit_code == 0, r.output
    assert "avatar-sdk" in r.output and "sink:file" in r.output
    r = CliRunner().invoke(cli, ["plugins", "--json"])
    data = json.loads(r.output)
    names = {p["name"] for p in data["plugins"]}
    assert BUILTIN <= names
    comps = {(c["kind"], c["name"]) for p in data["plugins"] for c in p["registered"]}
    assert ("sink", "file") in comps and ("backend", "cpu") in comps and ("feature_source", "ave") in comps


def test_cli_error_edge_one_line_and_debug_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.onnx")
    out = subprocess.run([sys.executable, "-m", "avatar.cli", "inspect", missing], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "model file not found" in out.stderr
    out = subprocess.run([sys.executable, "-m", "avatar.cli", "--debug", "inspect", missing], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" in out.stderr


@pytest.fixture(scope="module")
def example_plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    target = tmp_path_factory.mktemp("example-plugin-site")
    src = tmp_path_factory.mktemp("example-plugin-src") / "example-plugin"
    shutil.copytree(ROOT / "docs" / "example-plugin", src)  # building writes into the source folder
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(src)],
        check=True,
        timeout=300,
    )
    return target


def test_example_plugin_installs_and_lists(example_plugin_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(example_plugin_path)}
    out = subprocess.run([sys.executable, "-m", "avatar.cli", "plugins", "--json"], capture_output=True, text=True, env=env, timeout=120)
    data = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
    rec = data["frame-stats"]
    assert rec["distribution"] == "avatar-example-plugin" and rec["version"] == "0.2.0"
    assert rec["status"] == "loaded"
    assert rec["registered"] == [{"kind": "sink", "name": "frame-stats", "usable": True, "reason": None, "install": None}]


def test_example_plugin_works_through_the_public_api(example_plugin_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed third-party sink, found by entry point, used by avatar.render and by `avatar run`."""
    import importlib

    from avatar.demo import speechlike_audio, synthetic_frames, write_wav
    from avatar.models.synthetic import make_audio_encoder, make_unet
    from avatar.package import write_package
    from avatar.plugins import reset_plugin_manager
    from avatar.render import render

    frames, boxes = synthetic_frames(6, width=320, height=240)
    pkg = write_package(tmp_path / "pkg", iter(frames), boxes, fps=25, name="t")
    unet = make_unet(tmp_path / "u.onnx", tiny=True)
    enc = make_audio_encoder(tmp_path / "e.onnx", tiny=True)
    monkeypatch.syspath_prepend(str(example_plugin_path))
    importlib.invalidate_caches()
    reset_plugin_manager()
    try:
        out = tmp_path / "stats.jsonl"
        report = render(pkg, speechlike_audio(0.4), model=unet, feature_options={"encoder": str(enc)}, backend="cpu",
                        sinks=[("frame-stats", {"path": str(out)})])
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert report.frames == 10 and len(lines) == 11
        assert [x["index"] for x in lines[1:]] == list(range(10))
        assert lines[1]["audio_rms"] > 0 and lines[1]["box_mean"] is not None
    finally:
        reset_plugin_manager()
    wav = tmp_path / "a.wav"
    write_wav(wav, speechlike_audio(0.4))
    env = {**os.environ, "PYTHONPATH": str(example_plugin_path)}
    out2 = tmp_path / "stats2.jsonl"
    r = subprocess.run([sys.executable, "-m", "avatar.cli", "run", "--avatar", str(pkg), "--audio", str(wav), "--model", str(unet),
                        "--ave-encoder", str(enc), "--backend", "cpu", "--sink", "frame-stats", "--sink-opt", f"path={out2}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(out2.read_text().splitlines()) == 11


def test_a_plugin_that_fails_midway_contributes_nothing() -> None:
    pm = PluginManager()

    class Half:
        @hookimpl
        def register_sinks(self, register):  # type: ignore[no-untyped-def]
            register(_NullSink)
            register(object)

    with pytest.raises(PluginError):
        pm.register(Half(), name="half")
    assert "null-test" not in pm.components["sink"]
    assert pm.pm.get_plugin("half") is None


def test_an_entry_point_cannot_shadow_a_builtin(tmp_path: Path) -> None:
    src = """
    from avatar import hookimpl
    """
    _fake_dist(tmp_path, "shadow-plugin", src, "file")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "avatar.cli", "plugins", "--json"], capture_output=True, text=True, env=env, timeout=120)
    data = {p["name"]: p for p in json.loads(out.stdout)["plugins"]}
    assert data["file"]["distribution"] == "avatar-sdk" and data["file"]["status"] == "loaded"
    shadow = data["file (shadow-plugin)"]
    assert shadow["status"] == "failed" and "already used by avatar-sdk" in shadow["error"]
