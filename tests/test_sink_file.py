"""The file sink: real H.264 + AAC files written with PyAV and decoded back."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from avatar import ConfigError, SinkError, get_plugin_manager
from avatar.interfaces import StreamInfo, VideoFrame
from avatar_plugins.sinks.file import FileSink

FPS = 25
SR = 16000


def smooth_image(i: int, w: int = 160, h: int = 120) -> np.ndarray:
    """A smooth, moving colour gradient (easy to code well: PSNR is meaningful)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    b = 128 + 100 * np.sin((x + 3 * i) / 23.0)
    g = 128 + 100 * np.cos((y - 2 * i) / 17.0)
    r = 128 + 80 * np.sin((x + y + i) / 31.0)
    return np.clip(np.stack([b, g, r], axis=-1), 0, 255).astype(np.uint8)


def tone(i: int, freq: float = 440.0, n: int = SR // FPS) -> np.ndarray:
    t = (np.arange(n) + i * n) / SR
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_file(path: Path, frames: int = 50, w: int = 160, h: int = 120, freq: float = 440.0,
               image=smooth_image, **opts) -> tuple[FileSink, object]:
    sink = FileSink(path=str(path), **opts)
    sink.open(StreamInfo(w, h, Fraction(FPS), SR))
    for i in range(frames):
        sink.write(VideoFrame(i, Fraction(i, FPS), image(i, w, h), tone(i, freq)))
    return sink, sink.close()


def decode(path: Path) -> dict:
    import av

    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        info = {
            "vcodec": v.codec_context.name,
            "acodec": a.codec_context.name,
            "rate": a.codec_context.sample_rate,
            "channels": a.codec_context.channels,
            "width": v.codec_context.width,
            "height": v.codec_context.height,
            "vduration": float(v.duration * v.time_base) if v.duration else None,
        }
    with av.open(str(path)) as c:
        info["images"] = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        frames = list(c.decode(audio=0))
        info["audio_start"] = float(frames[0].pts * frames[0].time_base) if frames else 0.0
        info["audio"] = np.concatenate([f.to_ndarray()[0] for f in frames]) if frames else np.zeros(0)
    return info


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_frames_duration_codecs_and_report(tmp_path: Path) -> None:
    sink, report = write_file(tmp_path / "out.mp4", frames=50)
    d = decode(tmp_path / "out.mp4")
    assert (d["vcodec"], d["acodec"]) == ("h264", "aac")
    assert len(d["images"]) == 50
    assert d["vduration"] == pytest.approx(50 / FPS, abs=1e-6)
    assert report.frames == 50
    assert report.details["audio_s"] == pytest.approx(2.0)


def test_pixels_close_to_input(tmp_path: Path) -> None:
    write_file(tmp_path / "out.mp4", frames=30)
    images = decode(tmp_path / "out.mp4")["images"]
    values = [psnr(images[i], smooth_image(i)) for i in range(30)]
    assert min(values) >= 35.0, values
    # the content really is the input: frame 0 does not match frame 20
    assert psnr(images[0], smooth_image(20)) < min(values) - 5


def test_audio_length_and_content_match_the_pcm(tmp_path: Path) -> None:
    write_file(tmp_path / "a.mp4", frames=50, freq=440.0)
    write_file(tmp_path / "b.mp4", frames=50, freq=1000.0)
    for name, freq in (("a.mp4", 440.0), ("b.mp4", 1000.0)):
        d = decode(tmp_path / name)
        rate = d["rate"]
        assert rate == 48000
        # the AAC stream is as long as the audio given, within one AAC frame
        assert abs(len(d["audio"]) - 2.0 * rate) <= 1024, len(d["audio"])
        assert abs(d["audio_start"]) <= 1024 / rate
        t = np.arange(len(d["audio"])) / rate + d["audio_start"]
        mid = slice(rate // 10, len(t) - rate // 10)  # skip codec edges
        expected = 0.4 * np.sin(2 * np.pi * freq * t)
        corr = np.corrcoef(d["audio"][mid], expected[mid])[0, 1]
        assert corr > 0.95, (name, corr)
        other = 0.4 * np.sin(2 * np.pi * (1000.0 if freq == 440.0 else 440.0) * t)
        assert abs(np.corrcoef(d["audio"][mid], other[mid])[0, 1]) < 0.2


def test_odd_size_is_padded_to_even(tmp_path: Path) -> None:
    write_file(tmp_path / "odd.mp4", frames=5, w=161, h=121)
    d = decode(tmp_path / "odd.mp4")
    assert (d["width"], d["height"]) == (162, 122)
    assert psnr(d["images"][2][:121, :161], smooth_image(2, 161, 121)) >= 35.0


def test_crf_changes_size(tmp_path: Path) -> None:
    _, lo = write_file(tmp_path / "lo.mp4", frames=25, crf=12, audio_bitrate="16k")
    _, hi = write_file(tmp_path / "hi.mp4", frames=25, crf=40, audio_bitrate="16k")
    assert lo.details["bytes"] > 1.5 * hi.details["bytes"]


def test_preset_changes_size(tmp_path: Path) -> None:
    noisy = lambda i, w, h: np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    _, fast = write_file(tmp_path / "u.mp4", frames=10, image=noisy, preset="ultrafast")
    _, slow = write_file(tmp_path / "s.mp4", frames=10, image=noisy, preset="slow")
    assert fast.details["bytes"] != slow.details["bytes"]


def test_audio_rate_and_layout_options(tmp_path: Path) -> None:
    write_file(tmp_path / "r.mp4", frames=10, audio_rate=44100, audio_layout="stereo")
    d = decode(tmp_path / "r.mp4")
    assert d["rate"] == 44100 and d["channels"] == 2


def test_audio_bitrate_changes_size(tmp_path: Path) -> None:
    noise = lambda i, w, h: np.zeros((h, w, 3), np.uint8)  # noqa: E731
    _, lo = write_file(tmp_path / "lo.mp4", frames=50, image=noise, audio_bitrate="32k")
    _, hi = write_file(tmp_path / "hi.mp4", frames=50, image=noise, audio_bitrate="256k")
    assert hi.details["bytes"] > lo.details["bytes"]


def test_faststart_puts_moov_first(tmp_path: Path) -> None:
    write_file(tmp_path / "fs.mp4", frames=5)
    write_file(tmp_path / "nofs.mp4", frames=5, faststart=False)
    fs, nofs = (tmp_path / "fs.mp4").read_bytes(), (tmp_path / "nofs.mp4").read_bytes()
    assert fs.find(b"moov") < fs.find(b"mdat")
    assert nofs.find(b"moov") > nofs.find(b"mdat")


def test_aborted_close_leaves_a_playable_file(tmp_path: Path) -> None:
    path = tmp_path / "half.mp4"
    sink = FileSink(path=str(path))
    sink.open(StreamInfo(160, 120, Fraction(FPS), SR, frame_count=100))
    for i in range(50):
        sink.write(VideoFrame(i, Fraction(i, FPS), smooth_image(i), tone(i)))
    report = sink.close(aborted=True)
    assert report.frames == 50 and report.details["aborted"] is True
    d = decode(path)
    assert len(d["images"]) == 50
    assert sink.close(aborted=True).frames == 50  # a second close is harmless


SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from fractions import Fraction
    import numpy as np
    from avatar.interfaces import StreamInfo, VideoFrame
    from avatar_plugins.sinks.file import FileSink

    # both signals become KeyboardInterrupt (set explicitly: a process started as a
    # background job inherits SIGINT ignored, and Python then installs no handler),
    # and the sink is closed with aborted=True on the way out
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    sink = FileSink(path=sys.argv[1], preset="ultrafast")
    sink.open(StreamInfo(96, 64, Fraction(25), 16000))
    i = 0
    try:
        while True:
            img = np.full((64, 96, 3), (i * 5) % 256, np.uint8)
            sink.write(VideoFrame(i, Fraction(i, 25), img, np.zeros(640, np.float32)))
            i += 1
            if i == 20:
                print("ready", flush=True)
            time.sleep(0.002)
    except KeyboardInterrupt:
        pass
    finally:
        report = sink.close(aborted=True)
        print("closed", report.frames, flush=True)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_process_leaves_a_playable_file(tmp_path: Path, sig: int) -> None:
    script = tmp_path / "forever.py"
    script.write_text(SCRIPT)
    out = tmp_path / "forever.mp4"
    # started as a shell starts a background job (SIGINT ignored), as a suite run with `&` does
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline and "ready" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "ready" in line, "the writer script did not start"
        proc.send_signal(sig)
        stdout, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0
    written = int(stdout.split("closed")[1].split()[0])
    d = decode(out)
    # a signal is held while a frame is encoded and muxed: the count is exact
    assert written >= 20 and len(d["images"]) == written


def test_options_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        FileSink(path=str(tmp_path / "missing" / "out.mp4"))
    with pytest.raises(ConfigError, match="needs a path"):
        FileSink()
    with pytest.raises(ConfigError, match="preset"):
        FileSink(path=str(tmp_path / "o.mp4"), preset="warp")
    with pytest.raises(ConfigError, match="crf"):
        FileSink(path=str(tmp_path / "o.mp4"), crf=80)
    with pytest.raises(ConfigError, match="audio_rate"):
        FileSink(path=str(tmp_path / "o.mp4"), audio_rate=12345)
    with pytest.raises(ConfigError, match="unknown option"):
        FileSink(path=str(tmp_path / "o.mp4"), bogus=1)


def test_bad_frames_raise_sink_errors(tmp_path: Path) -> None:
    sink = FileSink(path=str(tmp_path / "o.mp4"))
    with pytest.raises(SinkError, match="before open"):
        sink.write(VideoFrame(0, Fraction(0), smooth_image(0), tone(0)))
    sink.open(StreamInfo(160, 120, Fraction(FPS), SR))
    with pytest.raises(SinkError, match="does not match"):
        sink.write(VideoFrame(0, Fraction(0), smooth_image(0, 320, 240), tone(0)))
    with pytest.raises(SinkError, match="uint8"):
        sink.write(VideoFrame(0, Fraction(0), smooth_image(0).astype(np.float32), tone(0)))
    sink.close(aborted=True)


def test_registered_as_plugin(tmp_path: Path) -> None:
    sink = get_plugin_manager().sink("file", path=str(tmp_path / "p.mp4"))
    assert isinstance(sink, FileSink) and not sink.realtime


def test_unsupported_containers_are_a_config_error(tmp_path: Path) -> None:
    for name in ("x.webm", "x.wav", "x.gif", "noext"):
        with pytest.raises(ConfigError, match=r"\.mp4 \.mov \.m4v \.mkv \.flv \.avi \.ts"):
            FileSink(path=str(tmp_path / name))
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        FileSink(path=str(tmp_path / "d.mp4"))


@pytest.mark.parametrize("suffix", [".mp4", ".MOV", ".m4v", ".mkv", ".flv", ".avi", ".ts"])
def test_every_accepted_container_writes_a_playable_file(tmp_path: Path, suffix: str) -> None:
    write_file(tmp_path / f"c{suffix}", frames=4, preset="ultrafast")
    d = decode(tmp_path / f"c{suffix}")
    assert (d["vcodec"], d["acodec"]) == ("h264", "aac") and len(d["images"]) == 4


def test_encoder_setup_errors_are_sink_errors(tmp_path: Path) -> None:
    sink = FileSink(path=str(tmp_path / "o.mp4"))
    sink.path = tmp_path / "o.webm"  # past the option check: PyAV refuses libx264 in WebM
    with pytest.raises(SinkError, match="cannot set up H.264 \\+ AAC encoding") as info:
        sink.open(StreamInfo(160, 120, Fraction(FPS), SR))
    assert info.value.__cause__ is not None
    assert not (tmp_path / "o.webm").exists()


def test_encode_errors_are_sink_errors_and_leave_no_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "wide.mp4"
    sink = FileSink(path=str(path), preset="ultrafast")
    sink.open(StreamInfo(32768, 16, Fraction(FPS), SR))  # wider than libx264 accepts
    with pytest.raises(SinkError, match="encoding frame 0 .* failed") as info:
        sink.write(VideoFrame(0, Fraction(0), np.zeros((16, 32768, 3), np.uint8), tone(0)))
    assert info.value.__cause__ is not None
    report = sink.close(aborted=True)
    assert report.frames == 0 and report.details["bytes"] == 0 and not path.exists()


def test_non_finite_audio_is_a_sink_error(tmp_path: Path) -> None:
    sink = FileSink(path=str(tmp_path / "n.mp4"), preset="ultrafast")
    sink.open(StreamInfo(160, 120, Fraction(FPS), SR))
    sink.write(VideoFrame(0, Fraction(0), smooth_image(0), tone(0)))
    bad = tone(1)
    bad[5] = np.nan
    with pytest.raises(SinkError, match="frame 1: .*NaN"):
        sink.write(VideoFrame(1, Fraction(1, FPS), smooth_image(1), bad))
    assert sink.close(aborted=True).frames == 1
    assert len(decode(tmp_path / "n.mp4")["images"]) == 1


def test_write_after_close_is_a_sink_error(tmp_path: Path) -> None:
    sink, _ = write_file(tmp_path / "c.mp4", frames=2, preset="ultrafast")
    with pytest.raises(SinkError, match="after close"):
        sink.write(VideoFrame(2, Fraction(2, FPS), smooth_image(2), tone(2)))
    with pytest.raises(SinkError, match="already opened or closed"):
        sink.open(StreamInfo(160, 120, Fraction(FPS), SR))


@pytest.mark.parametrize("aborted", [True, False])
def test_closing_before_the_first_frame_leaves_no_file(tmp_path: Path, aborted: bool) -> None:
    path = tmp_path / "none.mp4"
    sink = FileSink(path=str(path))
    sink.open(StreamInfo(160, 120, Fraction(FPS), SR))
    report = sink.close(aborted=aborted)
    assert report.frames == 0 and report.details["bytes"] == 0
    assert not path.exists()
    # a file already at the path is not touched before the first frame
    path.write_bytes(b"an older render")
    sink = FileSink(path=str(path))
    sink.open(StreamInfo(160, 120, Fraction(FPS), SR))
    sink.close(aborted=aborted)
    assert path.read_bytes() == b"an older render"


def test_frame_size_is_checked_against_the_requested_stream_size(tmp_path: Path) -> None:
    sink = FileSink(path=str(tmp_path / "s.mp4"), preset="ultrafast")
    sink.open(StreamInfo(64, 48, Fraction(FPS), SR))
    for w, h in ((63, 47), (63, 48), (64, 47)):  # would pad up to 64x48, but the stream is 64x48 itself
        with pytest.raises(SinkError, match=f"frame size {w}x{h} does not match the stream size 64x48"):
            sink.write(VideoFrame(0, Fraction(0), smooth_image(0, w, h), tone(0)))
    sink.write(VideoFrame(0, Fraction(0), smooth_image(0, 64, 48), tone(0)))
    sink.close()
    odd = FileSink(path=str(tmp_path / "o.mp4"), preset="ultrafast")
    odd.open(StreamInfo(63, 47, Fraction(FPS), SR))  # encoded as 64x48
    with pytest.raises(SinkError, match="frame size 64x48 does not match the stream size 63x47"):
        odd.write(VideoFrame(0, Fraction(0), smooth_image(0, 64, 48), tone(0)))
    odd.write(VideoFrame(0, Fraction(0), smooth_image(0, 63, 47), tone(0)))
    odd.close()
    assert (decode(tmp_path / "o.mp4")["width"], decode(tmp_path / "o.mp4")["height"]) == (64, 48)
