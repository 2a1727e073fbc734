"""The demo's shipped model (trained with `avatar train`): the mouth opens with speech and closes in silence."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avatar.demo_model import available

pytestmark = pytest.mark.skipif(not available(), reason="the demo model is not built (python -m avatar.demo_model)")


def _dark_pixels(face: np.ndarray) -> int:
    """How much mouth is open in a 320 face: pixels of the dark opening's colour around the mouth."""
    region = face[90:280, 60:260].astype(int)
    return int(((region.sum(axis=2) < 250) & (region[..., 1] < 80)).sum())


def test_mouth_opening_follows_loudness_over_the_whole_render(tmp_path: Path) -> None:
    import av

    from avatar import vision
    from avatar.demo import build_demo, mouth_opening, speechlike_audio, write_wav
    from avatar.package import AvatarPackage
    from avatar.render import render
    from avatar.schedule import schedule

    paths = build_demo(tmp_path / "w", frames=50)
    assert paths["kind"] == "trained"
    pcm = speechlike_audio(8.0, seed=11)  # audio the model never saw (it was trained on seed 1)
    write_wav(tmp_path / "speech.wav", pcm)
    out = tmp_path / "out.mp4"
    render(paths["avatar"], tmp_path / "speech.wav", sinks=[("file", {"path": str(out)})], model=paths["model"],
           features="ave", feature_options={"encoder": str(paths["encoder"])}, backend="cpu")
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    assert len(frames) == 200
    with AvatarPackage.open(paths["avatar"]) as pkg:
        # the avatar walks its frames forward then back (ping-pong); its boxes say where each output face is
        walk = schedule(len(frames), pkg.frame_count)
        boxes = [tuple(int(v) for v in pkg.boxes[k]) for k in walk]
    opening = np.array([_dark_pixels(vision.face_320(f, b)) for f, b in zip(frames, boxes)], float)
    loudness = mouth_opening(pcm, len(frames))
    r = float(np.corrcoef(opening, loudness)[0, 1])
    assert r >= 0.6, r
    silent = loudness == 0
    assert silent.sum() >= 5 and opening[silent].mean() < 0.5 * opening[loudness > 0.7].mean()


def test_demo_runs_without_torch_and_says_what_the_model_is(tmp_path: Path) -> None:
    """The shipped ONNX weights need no PyTorch: `avatar demo` with torch made unimportable."""
    code = ("import sys; sys.modules['torch'] = None; from avatar.cli import main; "
            f"main(['demo', '--seconds', '1', '-o', {str(tmp_path / 'd.mp4')!r}, '--workdir', {str(tmp_path / 'w')!r}, "
            "'--no-progress'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "model: the demo model: a quarter-width UNet-328 trained with `avatar train`" in r.stderr
    assert (tmp_path / "d.mp4").stat().st_size > 0
