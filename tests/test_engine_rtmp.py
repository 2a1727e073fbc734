"""A real render of real speech, live through `avatar run --sink rtmp` into a real nginx-rtmp."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rtmp_server import NginxRtmp, nginx_rtmp_available

pytestmark = [
    pytest.mark.rtmp,
    pytest.mark.skipif(not nginx_rtmp_available()[0], reason=nginx_rtmp_available()[1]),
]

KEY = "render-key-5ecret"
SECONDS = 6.0


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, sanders_dir: Path, talk_wav: Path) -> dict[str, Path]:
    from avatar.audio import load_audio
    from avatar.demo import write_wav
    from avatar.importers import import_synctalk
    from avatar.models.synthetic import make_audio_encoder, make_unet

    d = tmp_path_factory.mktemp("live")
    import_synctalk(sanders_dir, d / "pkg", limit=40, preset="ultrafast")
    write_wav(d / "speech.wav", load_audio(talk_wav)[: int(SECONDS * 16000)])
    return {
        "pkg": d / "pkg",
        "wav": d / "speech.wav",
        "unet": make_unet(d / "unet.onnx", seed=2, tiny=True),
        "enc": make_audio_encoder(d / "enc.onnx", seed=2, tiny=True),
    }


def test_live_render_of_real_speech_is_recorded_in_sync(assets: dict[str, Path]) -> None:
    import av

    server = NginxRtmp().start()
    try:
        cmd = [
            sys.executable, "-m", "avatar.cli", "run", "--avatar", str(assets["pkg"]), "--audio", str(assets["wav"]),
            "--model", str(assets["unet"]), "--ave-encoder", str(assets["enc"]), "--backend", "cpu",
            "--sink", "rtmp", "--rtmp-url", server.url(KEY), "--sink-opt", "rtmp.max_lag_s=5", "--no-progress",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert KEY not in out.stderr and KEY not in out.stdout  # the stream key is never printed
        server.wait_recordings_closed()
        (rec,) = server.recordings(KEY)
        video, audio = [], []
        with av.open(str(rec)) as c:
            assert c.streams.video[0].codec_context.name == "h264"
            assert c.streams.audio[0].codec_context.name == "aac"
            rate = c.streams.audio[0].codec_context.sample_rate
            for p in c.demux():
                if p.pts is None or p.size == 0:
                    continue
                t = float(p.pts * p.time_base)
                (video if p.stream.type == "video" else audio).append((t, float(p.duration * p.time_base) if p.duration else 0.0))
    finally:
        server.close()

    frames = int(SECONDS * 25)
    assert len(video) == frames
    v_start, v_end = video[0][0], video[-1][0] + 1 / 25
    a_start = audio[0][0] + 1024 / rate  # the first AAC packet is encoder priming
    a_end = audio[-1][0] + audio[-1][1]
    assert abs((v_end - v_start) - SECONDS) <= 1 / 25
    assert abs((a_end - a_start) - SECONDS) <= 1 / 25
    assert abs(a_start - v_start) <= 0.040 and abs(a_end - v_end) <= 0.040


@pytest.mark.slow
def test_a_machine_slower_than_real_time_streams_video_for_the_whole_duration(assets: dict[str, Path], tmp_path: Path) -> None:
    """The full UNet-328 on this machine's CPU runs below real time; with the default options
    (on_lag=drop) frames are skipped before inference, so the stream still carries video throughout."""
    import av
    import numpy as np
    from avatar.models.synthetic import make_unet

    full = make_unet(tmp_path / "unet_full.onnx", seed=2)
    server = NginxRtmp().start()
    try:
        cmd = [
            sys.executable, "-m", "avatar.cli", "run", "--avatar", str(assets["pkg"]), "--audio", str(assets["wav"]),
            "--model", str(full), "--ave-encoder", str(assets["enc"]), "--backend", "cpu",
            "--sink", "rtmp", "--rtmp-url", server.url(KEY), "--no-progress", "--report", str(tmp_path / "r.json"),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        server.wait_recordings_closed()
        (rec,) = server.recordings(KEY)
        times, images = [], []
        with av.open(str(rec)) as c:
            for frame in c.decode(video=0):
                times.append(float(frame.pts * frame.time_base))
                images.append(frame.to_ndarray(format="gray"))
    finally:
        server.close()
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    print({k: report[k] for k in ("skipped", "late", "frames", "realtime_factor", "stage_ms_per_frame")}, report["sinks"])
    # a real-time sink on a CPU backend runs batch 1 by default: at batch 8 a batch of the full UNet on 2 busy
    # cores outlasted the sink's 0.5 s lag budget and the stream dropped bursts of frames (holes of 1.2-1.5 s)
    assert report["batch_size"] == 1
    gaps = np.diff(times)
    assert times and times[-1] - times[0] >= SECONDS - 2 / 25  # video from the first to the last second
    assert len(times) >= int(SECONDS * 25) - 1
    assert gaps.max() <= 0.1  # no hole in the picture
    distinct = sum(1 for a, b in zip(images, images[1:]) if not np.array_equal(a, b))
    assert distinct > 0  # the picture moves
    print("skipped", report["skipped"], "late", report["late"], "distinct", distinct, "realtime", report["realtime_factor"])
