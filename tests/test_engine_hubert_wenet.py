"""`avatar run --features hubert|wenet` end to end: correct frame rate and length, mismatches refused."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from avatar.cli import cli

sys.path.insert(0, str(Path(__file__).parent))
from test_feature_wenet import _encoder as wenet_encoder  # noqa: E402  (the tests' WeNet-signature encoder)

SECONDS = 2.0


def _loud(path: Path, gain: float = 20.0) -> Path:
    """Scale the test encoder's rows to the O(1) spread real encoder features have."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    out = m.graph.output[0]
    for node in m.graph.node:
        for i, name in enumerate(node.output):
            if name == out.name:
                node.output[i] = out.name + "_raw"
    m.graph.initializer.append(numpy_helper.from_array(np.array(gain, np.float32), "gain"))
    m.graph.node.append(helper.make_node("Mul", [out.name + "_raw", "gain"], [out.name]))
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from avatar.demo import speechlike_audio, synthetic_frames, write_wav
    from avatar.models.synthetic import make_unet
    from avatar.package import write_package

    d = tmp_path_factory.mktemp("hw")
    frames, boxes = synthetic_frames(10, width=320, height=240)
    write_package(d / "pkg", iter(frames), boxes, fps=25, name="t")
    write_wav(d / "speech.wav", speechlike_audio(SECONDS, seed=4))
    return {
        "pkg": d / "pkg",
        "wav": d / "speech.wav",
        "hubert_unet": make_unet(d / "u_hubert.onnx", mode="hubert", seed=3, tiny=True),
        "wenet_unet": make_unet(d / "u_wenet.onnx", mode="wenet", seed=3, tiny=True),
        "wenet_enc": _loud(wenet_encoder(d / "wenet_encoder.onnx")),
        "dir": d,
    }


def _probe(path: Path) -> tuple[int, float, float, float]:
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        rate = float(v.average_rate)
        n = sum(1 for _ in c.decode(video=0))
    with av.open(str(path)) as c:
        frames = list(c.decode(audio=0))
        audio_s = sum(f.samples for f in frames) / frames[0].sample_rate
    return n, rate, n / rate, audio_s


def _run(*args: str) -> str:
    r = CliRunner().invoke(cli, ["run", "--backend", "cpu", "--no-progress", *args])
    assert r.exit_code == 0, r.output
    return r.output


def test_wenet_render_is_20_fps_and_as_long_as_the_audio(world: dict[str, Path]) -> None:
    out = world["dir"] / "wenet.mp4"
    _run("--avatar", str(world["pkg"]), "--audio", str(world["wav"]), "--model", str(world["wenet_unet"]),
         "--features", "wenet", "--wenet-model", str(world["wenet_enc"]), "-o", str(out))
    n, rate, video_s, audio_s = _probe(out)
    assert rate == 20
    assert abs(video_s - SECONDS) <= 1 / 20 and abs(audio_s - SECONDS) <= 1 / 20 + 0.03


def test_hubert_render_is_25_fps_and_as_long_as_the_audio(world: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from test_feature_hubert import _save_tiny

    model_dir = _save_tiny(tmp_path / "tiny-hubert")
    out = world["dir"] / "hubert.mp4"
    _run("--avatar", str(world["pkg"]), "--audio", str(world["wav"]), "--model", str(world["hubert_unet"]),
         "--features", "hubert", "--hubert-model", str(model_dir), "-o", str(out))
    n, rate, video_s, audio_s = _probe(out)
    assert rate == 25
    assert abs(video_s - SECONDS) <= 1 / 25 and abs(audio_s - SECONDS) <= 1 / 25 + 0.03


def test_wenet_audio_drives_the_face(world: dict[str, Path]) -> None:
    from avatar.demo import speechlike_audio
    from avatar.render import render
    from avatar_plugins.sinks.callback import CallbackSink

    faces = []
    for seed in (1, 2):
        got: list = []
        render(world["pkg"], speechlike_audio(1.0, seed=seed), model=world["wenet_unet"], features="wenet",
               feature_options={"model": str(world["wenet_enc"])}, backend="cpu", sinks=[CallbackSink(got.append, with_face=True)])
        faces.append(np.stack([f.face for f in got]).astype(np.int16))
    assert np.abs(faces[0] - faces[1]).mean() > 0.5


def test_model_and_source_mismatch_is_one_clear_line(world: dict[str, Path]) -> None:
    out = world["dir"] / "x.mp4"
    r = CliRunner().invoke(cli, ["run", "--backend", "cpu", "--avatar", str(world["pkg"]), "--audio", str(world["wav"]),
                                 "--model", str(world["hubert_unet"]), "--features", "wenet", "--wenet-model",
                                 str(world["wenet_enc"]), "-o", str(out)])
    assert r.exit_code != 0
    assert "(32, 32, 32)" in r.output and "(256, 16, 32)" in r.output
    assert r.output.count("\n") == 1


@pytest.mark.parametrize("seconds", [0.4, 0.81, 1.0, 1.37])
def test_sinks_are_told_the_frames_wenet_and_hubert_really_yield(world: dict[str, Path], tmp_path: Path, seconds: float) -> None:
    """StreamInfo.frame_count equals the frames delivered, though these sources round differently from ceil(d * fps)."""
    pytest.importorskip("transformers")
    from test_feature_hubert import _save_tiny

    from avatar.demo import speechlike_audio
    from avatar.render import render
    from avatar_plugins.sinks.callback import CallbackSink

    pcm = speechlike_audio(seconds, seed=6)
    hubert_dir = _save_tiny(tmp_path / "tiny-hubert")
    cases = {
        "wenet": (world["wenet_unet"], {"model": str(world["wenet_enc"])}),
        "hubert": (world["hubert_unet"], {"model": str(hubert_dir)}),
    }
    for name, (unet, opts) in cases.items():
        frames: list = []
        infos: list = []
        render(world["pkg"], pcm, sinks=[CallbackSink(frames.append, on_open=infos.append)], model=unet,
               features=name, feature_options=opts, backend="cpu")  # fmt: skip
        assert infos[0].frame_count == len(frames), (name, seconds)

