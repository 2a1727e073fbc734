"""The command line under failure: reports on failed runs, signals at start-up, library noise, odd audio.

Every test runs the real ``avatar`` command in a subprocess and reads what the
user would see: its exit status, its stderr and the files it leaves.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _outputs import bytes_written

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000


def avatar_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return subprocess.run([sys.executable, "-m", "avatar", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def setup(small_render_kit: dict[str, Path]) -> dict[str, Path]:
    return small_render_kit


def run_args(setup: dict[str, Path], audio: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--avatar", str(setup["avatar"]), "--audio", str(audio), "--model", str(setup["unet"]),
            "--ave-encoder", str(setup["encoder"]), "--backend", "cpu", "-o", str(out), "--no-progress", *extra]  # fmt: skip


# --------------------------------------------------------------------------- --report on failure (15.5)


def test_report_is_written_when_the_run_fails(setup: dict[str, Path], tmp_path: Path) -> None:
    """A full disk (a file-size limit) fails the render: the report says how far it got and why."""
    limit = 12_000  # bytes: less than this video, far more than the report

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    report = tmp_path / "report.json"
    r = avatar_cli(*run_args(setup, setup["wav"], tmp_path / "out.mp4", "--report", str(report)), preexec_fn=small_disk)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    d = json.loads(report.read_text())
    # the frames made before the disk filled (here the video fits until the file is finalised)
    assert "SinkError" in d["error"] and "File too large" in d["error"] and d["interrupted"] is False
    assert d["frames"] > 0 and d["wall_s"] > 0


def test_report_records_no_error_on_success(setup: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    r = avatar_cli(*run_args(setup, setup["wav"], tmp_path / "out.mp4", "--report", str(report), "--frames", "5"))
    assert r.returncode == 0, r.stderr
    d = json.loads(report.read_text())
    assert d["error"] is None and d["frames"] == 5


def test_report_of_an_interrupted_run(setup: dict[str, Path], tmp_path: Path) -> None:
    from avatar.demo import speechlike_audio, write_wav

    wav, out, report = tmp_path / "long.wav", tmp_path / "out.mp4", tmp_path / "report.json"
    write_wav(wav, speechlike_audio(60.0, seed=2))
    proc = subprocess.Popen([sys.executable, "-m", "avatar", *run_args(setup, wav, out, "--report", str(report))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and bytes_written(out) < 2000:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    d = json.loads(report.read_text())
    assert d["interrupted"] is True and d["error"] is None and 0 < d["frames"] < 1500


# --------------------------------------------------------------------------- odd audio (15.11)


def _wav_header(data_bytes: int, riff_bytes: int | None = None) -> bytes:
    riff = 36 + data_bytes if riff_bytes is None else riff_bytes
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, RATE, RATE * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + fmt + b"data" + struct.pack("<I", data_bytes)


def _pcm16(seconds: float) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()


def test_a_one_sample_wav_is_a_clear_error(setup: dict[str, Path], tmp_path: Path) -> None:
    wav = tmp_path / "one.wav"
    wav.write_bytes(_wav_header(2) + struct.pack("<h", 1000))
    r = avatar_cli(*run_args(setup, wav, tmp_path / "out.mp4"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: one.wav holds 1 sample(s) (0.06 ms at 16000 Hz); one video frame at 25 fps needs 40 ms of sound "
        "— use a longer recording"
    ]


def test_a_wav_whose_header_claims_more_than_it_holds_warns(setup: dict[str, Path], tmp_path: Path) -> None:
    liar = tmp_path / "liar.wav"
    liar.write_bytes(_wav_header(6 * 3600 * RATE * 2) + _pcm16(1.0))  # says 6 hours, holds 1 s
    out = tmp_path / "out.mp4"
    r = avatar_cli(*run_args(setup, liar, out))
    assert r.returncode == 0, r.stderr
    assert ("WARNING avatar.audio: liar.wav: the WAV header announces 6 h 00 min 00 s of audio but the file holds "
            "only 1.00 s — it is truncated") in r.stderr  # fmt: skip
    assert "rendered 25 frames" in r.stderr


def test_truncation_warning_only_for_truncated_wavs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from avatar.audio import iter_audio_chunks, load_audio

    cases = {
        "liar.wav": (_wav_header(90 * RATE * 2) + _pcm16(1.0), "announces 1 min 30 s of audio but the file holds only 1.00 s"),
        # streaming writers leave 0 or 0xFFFFFFFF as the sizes: nothing was promised
        "stream.wav": (_wav_header(0xFFFFFFFF, 0xFFFFFFFF) + _pcm16(1.0), None),
        "zero.wav": (_wav_header(0, 0) + _pcm16(1.0), None),
        "honest.wav": (_wav_header(RATE * 2) + _pcm16(1.0), None),
    }
    for name, (data, warning) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for load in (lambda p: load_audio(p), lambda p: np.concatenate(list(iter_audio_chunks(p, 4000)))):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="avatar.audio"):
                assert len(load(path)) == RATE
            texts = [r.getMessage() for r in caplog.records]
            if warning:
                assert len(texts) == 1 and warning in texts[0], texts
            else:
                assert texts == [], texts


# --------------------------------------------------------------------------- start-up signal and noise (15.13)


def _console_script() -> Path:
    script = Path(sys.executable).with_name("avatar")
    if not script.is_file():
        pytest.skip("the avatar console script is not installed next to this Python")
    return script


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the imports start")
def test_ctrl_c_during_start_up_is_one_line_and_exit_130() -> None:
    """SIGINT while NumPy is being imported (the first fraction of a second) — the probe saw a traceback."""
    script = _console_script()
    interrupted = 0
    for delay in (0.0, 0.05, 0.2):  # just as NumPy loads, and deeper into the imports
        p = subprocess.Popen([str(script), "plugins"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until the imports are under way, then interrupt
            try:
                if "_multiarray_umath" in Path(f"/proc/{p.pid}/maps").read_text():
                    break
            except OSError:
                break
            time.sleep(0.0005)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        if p.returncode == 0:  # a fast machine finished the command first: the signal is then ignored (the launcher)
            assert err == "" and "distribution" in out, (out, err)
        else:
            assert (p.returncode, err) == (130, "interrupted\n"), err
            interrupted += 1
    assert interrupted, "no SIGINT landed while the command started up"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_between_the_launchers_import_and_main_is_one_line(sig: int) -> None:
    """The console script imports the launcher, then calls main(): a signal from the import on is held.

    The reliability probe's repeat saw a Ctrl-C 35 ms in (while the launcher imported ``typing``) print a
    traceback, and a SIGTERM in the first half second kill the command silently (-15).
    """
    code = f"import os, avatar_launcher; os.kill(os.getpid(), {int(sig)}); avatar_launcher.main()"
    r = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (128 + sig, "interrupted\n"), r.stderr


SIGTERM_IN_THE_COMMAND = """
import os, signal, avatar_launcher, avatar.cli

def main():  # the command line has loaded; no command has installed its own SIGTERM handling yet
    os.kill(os.getpid(), signal.SIGTERM)
    print("not reached")

avatar.cli.main = main
avatar_launcher.main()
"""


def test_sigterm_before_a_command_handles_it_is_one_line_and_exit_143() -> None:
    """The probe: SIGTERM 0.2-0.35 s into `avatar run` (commands loading) killed it silently, -15."""
    r = subprocess.run([sys.executable, "-c", SIGTERM_IN_THE_COMMAND], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (143, "", "interrupted\n"), r.stderr


SIGNAL_DURING_AN_IMPORT = """
import os, sys, time, avatar_launcher, avatar.cli

def main():  # a command importing a module lazily, with the signal arriving while that module initialises
    sys.path.insert(0, sys.argv[1])
    import initialises_slowly
    print("imported", flush=True)
    time.sleep(10)  # the signal, sent again after the import, ends the command here
    print("not reached")

avatar.cli.main = main
avatar_launcher.main()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_an_import_is_raised_after_it(sig: int, tmp_path: Path) -> None:
    """Raised inside a C extension's initialisation, an interrupt crashed `import onnx` (SIGABRT, SIGSEGV) and
    made ONNX Runtime's an ImportError traceback (the reliability probe, 0.29-0.4 s into `avatar run`)."""
    (tmp_path / "initialises_slowly.py").write_text(
        f"import os\nos.kill(os.getpid(), {int(sig)})\nfor _ in range(200000):\n    pass\nDONE = True\n")
    r = subprocess.run([sys.executable, "-c", SIGNAL_DURING_AN_IMPORT, str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (128 + sig, "imported\n", "interrupted\n"), r.stderr


AFTER_THE_COMMAND = """
import atexit, os, sys, time, avatar_launcher, avatar.cli

def main():
    def late():  # the interpreter shutting down (threads joined, atexit) when the signal comes
        os.kill(os.getpid(), int(sys.argv[1]))
        time.sleep(0.2)
    atexit.register(late)
    print("done", flush=True)

avatar.cli.main = main
avatar_launcher.main()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_after_the_command_finished_leaves_its_exit_status(sig: int) -> None:
    """The probe: Ctrl-C just after a complete render turned its exit 0 into a kill (-2)."""
    r = subprocess.run([sys.executable, "-c", AFTER_THE_COMMAND, str(int(sig))], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "done\n", ""), r.stderr


INTERRUPTED_IMPORT_COMMAND = """
import sys
from avatar.cli import cli

@cli.command("load")
def load():
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as exc:  # what pybind11 makes of a Ctrl-C inside an extension's initialisation
        raise ImportError("initialization failed") from exc

cli.main(sys.argv[1:], prog_name="avatar")
"""


def test_an_import_failed_by_ctrl_c_is_an_interrupt_not_a_traceback() -> None:
    env = {k: v for k, v in os.environ.items() if k != "AVATAR_DEBUG"}
    r = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT_COMMAND, "load"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert (r.returncode, r.stderr) == (130, "interrupted\n"), r.stderr


def test_the_console_script_enters_through_a_stdlib_only_module() -> None:
    """Nothing heavy may load before the launcher's Ctrl-C handling is in place."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["avatar"] == "avatar_launcher:main"
    code = "import sys, avatar_launcher; print(sorted(m for m in ('avatar', 'numpy', 'click') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stderr


def _reshape_failing_model(path: Path) -> Path:
    """A UNet by its contract whose Reshape fails at run time: ONNX Runtime logs an error line and raises."""
    import onnx
    from onnx import TensorProto

    from avatar.models.onnx_builder import GraphBuilder, make_model

    g = GraphBuilder({})
    y = g.node("Reshape", ["input", g.const(np.array([1, 3, 320, 640], np.int64), "shape")])
    model = make_model(
        g, [("input", TensorProto.FLOAT, ["B", 6, 320, 320]), ("audio", TensorProto.FLOAT, ["B", 32, 16, 16])],
        [("output", y, ["B", 3, 320, 320])], opset=17,
    )  # fmt: skip
    onnx.save(model, str(path))
    return path


def test_onnxruntime_log_lines_show_only_with_debug(setup: dict[str, Path], tmp_path: Path) -> None:
    model = _reshape_failing_model(tmp_path / "fails.onnx")
    args = run_args(setup, setup["wav"], tmp_path / "out.mp4", "--model", str(model))
    env = {k: v for k, v in os.environ.items() if k != "AVATAR_DEBUG"}
    r = avatar_cli(*args, env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cpu: inference failed:"), r.stderr
    r = avatar_cli("--debug", *args, env=env)
    assert r.returncode == 1 and "[E:onnxruntime" in r.stderr and "Traceback" in r.stderr


WARNING_COMMAND = """
import sys
import click
import numpy as np
from avatar.cli import cli

@cli.command("overflow")
def overflow():
    np.float32(3e38) * np.float32(10)  # NumPy: RuntimeWarning: overflow encountered
    click.echo("done")

cli.main(sys.argv[1:], prog_name="avatar")
"""


@pytest.mark.parametrize("flags, shown", [((), False), (("--debug",), True), (("-vv",), True)])
def test_python_warnings_go_through_logging(flags: tuple[str, ...], shown: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AVATAR_DEBUG"}
    r = subprocess.run([sys.executable, "-c", WARNING_COMMAND, *flags, "overflow"], capture_output=True, text=True,
                       env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0 and r.stdout == "done\n", r.stderr
    if shown:
        assert "WARNING py.warnings:" in r.stderr and "RuntimeWarning: overflow" in r.stderr
    else:
        assert r.stderr == ""


# --------------------------------------------------------------------------- bench without matplotlib (14.16)


HIDE_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; from avatar.cli import main; main(sys.argv[1:])"


def test_bench_without_matplotlib_measures_and_skips_the_chart(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-c", HIDE_MATPLOTLIB, "bench", "--mode", "model", "--backends", "cpu", "--batch-sizes", "1",
         "--repeats", "1", "--warmup", "0", "--cell-seconds", "0", "--tiny", "--no-isolate",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--name", "nochart"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["nochart.json", "nochart.md"]
    assert json.loads((out / "nochart.json").read_text())["model_only"][0]["batch"] == 1
    assert "png:" not in r.stdout and "json:" in r.stdout
    notes = [line for line in r.stderr.splitlines() if "chart" in line]
    assert len(notes) == 1 and "pip install 'avatar-sdk[bench]'" in notes[0], r.stderr


# --------------------------------------------------------------------------- a signal while the render sets up


def test_a_signal_while_the_render_sets_up_is_not_lost(setup: dict[str, Path], tmp_path: Path) -> None:
    """SIGTERM that lands while the audio decodes or the model loads stops the render.

    C extensions (PyAV's Cython, ONNX Runtime) can drop an exception a Python signal
    handler raises inside them; the probe saw a SIGTERM 0.2 s into `avatar run` ignored
    and the render finish with exit 0. Here a feature source drops it the same way.
    """
    from avatar.errors import Interrupted
    from avatar.render import render
    from avatar_plugins.features.ave import AveSource

    class DropsTheSignal(AveSource):
        sent = False

        @property
        def window_shape(self) -> tuple[int, ...]:  # type: ignore[override]
            if not DropsTheSignal.sent:
                DropsTheSignal.sent = True
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.2)
                except KeyboardInterrupt:
                    pass  # what C code that checks for errors late does with it
            return (32, 16, 16)

    def like_the_launcher(signum: int, frame: object) -> None:
        raise KeyboardInterrupt()

    previous = signal.signal(signal.SIGTERM, like_the_launcher)
    out = tmp_path / "out.mp4"
    try:
        with pytest.raises(Interrupted) as info:
            render(setup["avatar"], setup["wav"], sinks=[("file", {"path": str(out)})], model=setup["unet"],
                   features=DropsTheSignal(encoder=str(setup["encoder"])), backend="cpu")  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.signum == signal.SIGTERM
    assert not out.exists() and not list(tmp_path.iterdir())
