"""What ``render()`` takes from the avatar package, and the output rounding option.

Real packages, real ONNX Runtime sessions on tiny seeded models, frames taken
with the real callback sink.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from avatar.models.synthetic import make_audio_encoder, make_unet

    d = tmp_path_factory.mktemp("models")
    return {
        "unet": make_unet(d / "unet.onnx", mode="ave", seed=1, tiny=True),
        "encoder": make_audio_encoder(d / "enc.onnx", seed=1, tiny=True),
    }


def _package(dst: Path, **kwargs: Any) -> Path:
    from avatar.demo import synthetic_frames
    from avatar.package import write_package

    frames, boxes = synthetic_frames(FRAMES, width=320, height=240)
    return write_package(dst, iter(frames), boxes, fps=25, name="opts", **kwargs)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _package(tmp_path_factory.mktemp("plain") / "pkg")


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Varied AVE rows, so edge padding changes the first frames' windows."""
    f = tmp_path_factory.mktemp("feat") / "rows.npy"
    np.save(f, np.random.default_rng(5).standard_normal((20, 512)).astype(np.float32))
    return f


def collect(avatar: Any, **kwargs: Any) -> tuple[list[Any], Any]:
    from avatar.render import render
    from avatar_plugins.sinks.callback import CallbackSink

    frames: list[Any] = []
    report = render(avatar, np.zeros(20 * 640, np.float32), sinks=[CallbackSink(frames.append, with_face=True)],
                    backend="cpu", batch_size=4, **kwargs)  # fmt: skip
    return frames, report


# --------------------------------------------------------------------------- padding (14.8)


def test_the_packages_padding_is_the_default_and_an_explicit_option_wins(
    models: dict[str, Path], plain: Path, features: Path, tmp_path: Path
) -> None:
    zero_pkg = _package(tmp_path / "zero", padding="zero")
    npy = {"path": str(features)}

    def first_face(avatar: Path, **opts: Any) -> np.ndarray:
        frames, _ = collect(avatar, model=models["unet"], features="npy", feature_options={**npy, **opts})
        return frames[0].face

    recorded = first_face(zero_pkg)
    assert np.array_equal(recorded, first_face(plain, padding="zero"))
    replicate = first_face(plain, padding="replicate")
    assert not np.array_equal(recorded, replicate), "the padding must change the first frame"
    # the command-line --padding (an explicit feature option) overrides the package
    assert np.array_equal(first_face(zero_pkg, padding="replicate"), replicate)


def test_a_padding_recorded_for_another_feature_type_is_not_applied(models: dict[str, Path]) -> None:
    from avatar.render import package_padding

    class Manifest:
        padding = "zero"
        feature_type = "hubert"

    class Package:
        manifest = Manifest()

    assert package_padding(Package(), "hubert") == "zero"
    assert package_padding(Package(), "ave") is None


# --------------------------------------------------------------------------- crop interpolation (14.9)


def test_the_packages_crop_interpolation_is_used_to_composite(models: dict[str, Path], tmp_path: Path) -> None:
    from avatar.package import AvatarPackage
    from avatar.vision import composite

    pkg_dir = _package(tmp_path / "nearest", crop_interpolation="nearest")
    frames, _ = collect(pkg_dir, model=models["unet"], feature_options={"encoder": str(models["encoder"])})
    with AvatarPackage.open(pkg_dir) as pkg:
        assert pkg.crop_interpolation == "nearest"
        for f in frames[:3]:
            full, box = pkg.frame(f.avatar_index), tuple(int(v) for v in pkg.boxes[f.avatar_index])
            assert np.array_equal(f.image, composite(full, box, f.face, interpolation="nearest"))
            # the old behaviour: a cubic 4-pixel ring around the face
            assert not np.array_equal(f.image, composite(full, box, f.face, interpolation="cubic"))


# --------------------------------------------------------------------------- output rounding (14.10)


def _spec_face(model: Path, pkg_dir: Path, window: np.ndarray, avatar_index: int) -> np.ndarray:
    """The specification's steps for one frame: x/255 in, ``(out * 255.0).astype(np.uint8)`` out."""
    import onnxruntime as ort

    from avatar.package import AvatarPackage

    with AvatarPackage.open(pkg_dir) as pkg:
        vis = pkg.visual_inputs([avatar_index]).astype(np.float32) / 255.0
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": vis, "audio": window[None].astype(np.float32)})[0][0]
    return (out.transpose(1, 2, 0) * 255.0).astype(np.uint8)


def test_truncate_rounding_is_the_specifications_and_nearest_is_the_default(
    models: dict[str, Path], plain: Path, features: Path
) -> None:
    from avatar.plugins import get_plugin_manager

    opts = {"model": models["unet"], "features": "npy", "feature_options": {"path": str(features)}}
    nearest, report = collect(plain, **opts)
    truncated, _ = collect(plain, output_rounding="truncate", **opts)
    windows = get_plugin_manager().feature_source("npy", path=str(features)).windows(np.zeros(20 * 640, np.float32))
    for k in (0, 7, 19):
        spec = _spec_face(models["unet"], plain, windows[k], truncated[k].avatar_index)
        assert np.array_equal(truncated[k].face, spec)
        diff = nearest[k].face.astype(int) - spec
        # rounding moves a level up exactly where the fraction is >= 0.5, never down
        assert diff.min() == 0 and diff.max() == 1 and 0.3 < diff.mean() < 0.7
    from avatar import ConfigError

    with pytest.raises(ConfigError, match="output_rounding must be one of nearest, truncate, not 'up'"):
        collect(plain, output_rounding="up", **opts)


def test_cli_output_rounding_has_an_effect(models: dict[str, Path], plain: Path, tmp_path: Path) -> None:
    """Through ``avatar run``: truncation darkens the decoded face by about half a level."""
    import av

    from avatar.demo import speechlike_audio, write_wav
    from avatar.package import AvatarPackage
    from avatar.schedule import pingpong

    with AvatarPackage.open(plain) as pkg:
        boxes, n = pkg.boxes.copy(), pkg.frame_count

    wav = tmp_path / "a.wav"
    write_wav(wav, speechlike_audio(0.6, seed=2))
    means = {}
    for mode in ("nearest", "truncate"):
        out = tmp_path / f"{mode}.mp4"
        r = subprocess.run(
            [sys.executable, "-m", "avatar", "run", "--avatar", str(plain), "--audio", str(wav), "--model",
             str(models["unet"]), "--ave-encoder", str(models["encoder"]), "--backend", "cpu", "-o", str(out),
             "--output-rounding", mode, "--sink-opt", "file.crf=0", "--report", str(tmp_path / f"{mode}.json")],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / f"{mode}.json").read_text())["error"] is None
        with av.open(str(out)) as c:
            faces = []
            for i, f in enumerate(c.decode(video=0)):
                x1, y1, x2, y2 = boxes[pingpong(i, n)]
                faces.append(f.to_ndarray(format="gray")[y1 + 4 : y2 - 4, x1 + 4 : x2 - 4].astype(float).mean())
            means[mode] = np.mean(faces)
    # the same frames but for the rounding (crf 0 keeps levels): about half a level apart
    assert 0.25 < means["nearest"] - means["truncate"] < 0.75


# --------------------------------------------------------------------------- closing the package (14.15)


def test_render_closes_the_package_it_opened_and_not_one_it_was_given(
    models: dict[str, Path], plain: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from avatar import ModelError
    from avatar.package import AvatarPackage

    closed: list[Path] = []
    real_close = AvatarPackage.close

    def recording_close(self: AvatarPackage) -> None:  # the real close, noted
        closed.append(self.path)
        real_close(self)

    monkeypatch.setattr(AvatarPackage, "close", recording_close)
    enc = {"encoder": str(models["encoder"])}
    collect(plain, model=models["unet"], feature_options=enc)
    assert closed == [plain]
    # also when the render fails before it starts
    with pytest.raises(ModelError):
        collect(plain, model=plain / "missing.onnx", feature_options=enc)
    assert closed == [plain, plain]
    # a package the caller opened stays open and usable
    closed.clear()
    pkg = AvatarPackage.open(plain)
    collect(pkg, model=models["unet"], feature_options=enc)
    frames, _ = collect(pkg, model=models["unet"], feature_options=enc)
    assert closed == [] and len(frames) == 20
    pkg.close()
