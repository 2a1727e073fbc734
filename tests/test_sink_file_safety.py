"""The file sink never destroys an earlier output, refuses a second writer, and is
not cut in half by a signal: real renders, real processes, real files."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from avatar import SinkError
from avatar.interfaces import StreamInfo, VideoFrame
from avatar_plugins.sinks.file import FileSink

from test_sink_file import decode


@pytest.fixture
def job(tiny_job: dict[str, Path]) -> dict[str, Path]:
    return tiny_job


def _cli(job: dict[str, Path], out: Path, audio: str, *extra: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{prelude}\nfrom avatar.cli import main\nmain(sys.argv[1:])"
    args = ["run", "--avatar", str(job["pkg"]), "--audio", str(job[audio]), "--model", str(job["unet"]),
            "--ave-encoder", str(job["enc"]), "--backend", "cpu", "--no-progress", "-o", str(out), *extra]
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_render_that_fills_the_disk_keeps_the_earlier_file(job: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    first = _cli(job, out, "short")  # also builds the package's face cache before the limit applies
    assert first.returncode == 0, first.stderr
    earlier = out.read_bytes()
    # a full disk: no file of this process may grow past 64 KiB (lossless frames need far more)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))"
    r = _cli(job, out, "long", "--sink-opt", "crf=0", prelude=limit)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "free disk space" in lines[0], r.stderr
    assert out.read_bytes() == earlier
    assert _leftovers(tmp_path) == []  # no partial file, no lock file
    assert len(decode(out)["images"]) == 10


def test_a_second_render_to_the_same_path_is_refused(job: dict[str, Path], tmp_path: Path) -> None:
    """Render A (in this process, live audio) is writing out.mp4 when render B (`avatar run`) starts."""
    from avatar.demo import speechlike_audio
    from avatar.render import render

    out = tmp_path / "out.mp4"
    second: list[subprocess.CompletedProcess] = []

    def live_audio():  # type: ignore[no-untyped-def]
        pcm = speechlike_audio(0.8)
        yield pcm[:3200]
        second.append(_cli(job, out, "short"))  # A's sink is open now
        yield pcm[3200:]

    report = render(job["pkg"], live_audio(), model=job["unet"], feature_options={"encoder": str(job["enc"])},
                    backend="cpu", sinks=[("file", {"path": str(out)})])
    r = second[0]
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert "another render is writing" in r.stderr and str(out) in r.stderr
    assert report.frames == 20 and len(decode(out)["images"]) == 20  # A's output is whole
    assert _leftovers(tmp_path) == []
    # the path is free again
    again = _cli(job, out, "short")
    assert again.returncode == 0, again.stderr and len(decode(out)["images"]) == 10


def test_two_sinks_in_one_process_cannot_share_a_path(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4"
    a = FileSink(path=str(out), preset="ultrafast")
    a.open(StreamInfo(64, 48, Fraction(25), 16000))
    with pytest.raises(SinkError, match="another render is writing"):
        FileSink(path=str(out))
    with pytest.raises(SinkError, match="another render is writing"):
        FileSink(path=str(tmp_path / "." / "o.mp4"))  # the same file by another spelling
    a.write(VideoFrame(0, Fraction(0), np.zeros((48, 64, 3), np.uint8), np.zeros(640, np.float32)))
    a.close()
    FileSink(path=str(out))  # free again
    assert len(decode(out)["images"]) == 1


def test_a_dead_writers_partial_file_is_removed_by_the_next(tmp_path: Path) -> None:
    out = tmp_path / "o.mp4"
    out.write_bytes(b"an older render")
    stale = tmp_path / ".o.mp4.999999-deadbeef.partial.mp4"  # what SIGKILL leaves
    stale.write_bytes(b"half a file")
    sink = FileSink(path=str(out), preset="ultrafast")
    sink.open(StreamInfo(64, 48, Fraction(25), 16000))
    assert not stale.exists() and out.read_bytes() == b"an older render"  # replaced only at close
    sink.write(VideoFrame(0, Fraction(0), np.zeros((48, 64, 3), np.uint8), np.zeros(640, np.float32)))
    sink.close()
    assert len(decode(out)["images"]) == 1 and _leftovers(tmp_path) == []


SIGNAL_INSIDE_MUX = textwrap.dedent(
    """
    import os, signal, sys
    from fractions import Fraction
    import numpy as np
    from avatar.interfaces import StreamInfo, VideoFrame
    from avatar_plugins.sinks import _encode
    from avatar_plugins.sinks.file import FileSink

    signal.signal(signal.SIGINT, signal.default_int_handler)
    armed = {"frame": None}
    real_mux = _encode.AVEncoder._mux

    def mux(self, packets):
        packets = list(packets)
        if armed["frame"] is not None and any(p.stream.type == "video" for p in packets):
            armed["frame"] = None
            os.kill(os.getpid(), signal.SIGINT)  # lands here, with this frame's packets not yet muxed
        real_mux(self, packets)

    _encode.AVEncoder._mux = mux
    sink = FileSink(path=sys.argv[1], preset="ultrafast")
    sink.open(StreamInfo(96, 64, Fraction(25), 16000))
    i = 0
    try:
        while i < 200:
            if i == 10:
                armed["frame"] = i
            img = np.full((64, 96, 3), (i * 5) % 256, np.uint8)
            sink.write(VideoFrame(i, Fraction(i, 25), img, np.zeros(640, np.float32)))
            i += 1
    except KeyboardInterrupt:
        print("interrupted after", i, flush=True)
    finally:
        print("closed", sink.close(aborted=True).frames, flush=True)
    """
)


def test_a_signal_inside_a_mux_waits_for_the_frame(tmp_path: Path) -> None:
    script = tmp_path / "mux.py"
    script.write_text(SIGNAL_INSIDE_MUX)
    out = tmp_path / "m.mp4"
    r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "interrupted after" in r.stdout, r.stdout
    reported = int(r.stdout.split("closed")[1].split()[0])
    frames = decode(out)["images"]
    # the frame being muxed when the signal came is whole: in the file and counted
    assert reported == len(frames)
    assert reported > 10
    # and every frame decodes to what was written (a lost packet would corrupt the ones after it)
    for i, img in enumerate(frames):
        assert abs(float(img.mean()) - (i * 5) % 256) < 3, i


def test_signal_handlers_are_restored_after_each_frame(tmp_path: Path) -> None:
    sentinel = signal.getsignal(signal.SIGTERM)
    sink = FileSink(path=str(tmp_path / "h.mp4"), preset="ultrafast")
    sink.open(StreamInfo(64, 48, Fraction(25), 16000))
    sink.write(VideoFrame(0, Fraction(0), np.zeros((48, 64, 3), np.uint8), np.zeros(640, np.float32)))
    sink.close()
    assert signal.getsignal(signal.SIGTERM) is sentinel and signal.getsignal(signal.SIGINT) is signal.default_int_handler
