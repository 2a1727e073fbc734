"""`avatar demo`: the out-of-the-box render works with nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner

from avatar.cli import cli


def test_demo_renders_a_playable_clip_with_sound(tmp_path: Path) -> None:
    import av

    out = tmp_path / "out" / "demo.mp4"
    r = CliRunner().invoke(cli, ["demo", "--tiny", "--seconds", "1.2", "-o", str(out), "--workdir", str(tmp_path / "w"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "untrained" in r.output
    with av.open(str(out)) as c:
        assert sorted(s.codec_context.name for s in c.streams) == ["aac", "h264"]
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    assert len(frames) == 30
    # the top of the picture is background: it must survive encoding and compositing untouched
    assert np.abs(frames[5][:40].astype(int) - frames[20][:40].astype(int)).mean() < 3
    stamp = (tmp_path / "w" / "demo.json").stat().st_mtime
    r = CliRunner().invoke(cli, ["demo", "--tiny", "--seconds", "1.2", "-o", str(out), "--workdir", str(tmp_path / "w"), "--no-progress"])
    assert r.exit_code == 0 and (tmp_path / "w" / "demo.json").stat().st_mtime == stamp  # reused, not rebuilt


def test_speechlike_audio_and_frames_depend_on_the_seed() -> None:
    from avatar.demo import speechlike_audio, synthetic_frames

    a, b = speechlike_audio(1.0, seed=0), speechlike_audio(1.0, seed=1)
    assert a.shape == (16000,) and a.dtype == np.float32 and np.abs(a).max() <= 1
    assert np.abs(a - b).mean() > 0.01
    frames, boxes = synthetic_frames(4, seed=0)
    assert boxes.shape == (4, 4) and all(x2 - x1 == y2 - y1 for x1, y1, x2, y2 in boxes)
    assert not np.array_equal(frames[0], frames[2])
