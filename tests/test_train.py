"""`avatar train`: the model-family training loop on a small synthetic recording, with real checkpoints and export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from avatar.cli import cli  # noqa: E402
from avatar.errors import ConfigError  # noqa: E402

FRAMES = 24


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 24-frame talking recording (the demo's head, mouth following the audio) and a tiny AVE encoder."""
    from avatar.demo import mouth_opening, speechlike_audio, synthetic_frames, write_wav
    from avatar.models.synthetic import make_audio_encoder
    from avatar.package import write_package

    tmp = tmp_path_factory.mktemp("train")
    pcm = speechlike_audio(FRAMES / 25, seed=2)
    frames, boxes = synthetic_frames(FRAMES, width=320, height=240, mouth=mouth_opening(pcm, FRAMES))
    pkg = write_package(tmp / "pkg", iter(frames), boxes, fps=25, name="rec", source={"audio": "audio.wav"})
    write_wav(pkg / "audio.wav", pcm)
    return {"pkg": pkg, "encoder": make_audio_encoder(tmp / "enc.onnx", tiny=True), "tmp": tmp}


def _trainer(recording: dict[str, Path], ckpt: Path, steps: int, **cfg: object):  # type: ignore[no-untyped-def]
    from avatar.package import AvatarPackage
    from avatar.train import load_data
    from avatar_plugins.torch_reference.training import TrainConfig, Trainer

    pkg = AvatarPackage.open(recording["pkg"])
    data = load_data(pkg, features="ave", feature_options={"encoder": str(recording["encoder"])}, holdout=0.2,
                     allow_short=True)
    config = TrainConfig(steps=steps, batch=2, tiny=True, eval_every=1000, checkpoint_every=1000, **cfg)  # type: ignore[arg-type]
    return Trainer(data, config, ckpt), data


def test_loss_goes_down_and_resume_repeats_the_curve(recording: dict[str, Path], tmp_path: Path) -> None:
    # the run is cut short by a shorter --steps (a Ctrl-C stand-in); the learning rate's anneal follows --steps,
    # so it is off here (an interrupted run keeps its --steps and with it the schedule)
    straight, data = _trainer(recording, tmp_path / "a", 6, anneal=0.0)
    assert len(data.held_out) == 5 and data.held_out[0] == FRAMES - 5 and data.train[-1] == FRAMES - 6
    result = straight.run()
    losses = result.losses
    assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2]), losses

    first, _ = _trainer(recording, tmp_path / "b", 3, anneal=0.0)
    first.run()
    again, _ = _trainer(recording, tmp_path / "b", 6, anneal=0.0)
    again.resume()
    assert again.step == 3
    resumed = again.run().losses
    np.testing.assert_allclose(resumed, losses, rtol=1e-5)


def test_learning_rate_is_held_then_annealed_to_the_end_of_the_run(recording: dict[str, Path], tmp_path: Path) -> None:
    t, _ = _trainer(recording, tmp_path / "s", 10, lr=1e-3, anneal=0.3)
    seen: list[float] = []
    t.run(lambda p: seen.append(t.opt.param_groups[0]["lr"]))
    # held for the first 70 % of the steps, then falling every step to near 5 % at the end
    assert seen[:8] == [1e-3] * 8, seen
    assert 1e-3 > seen[8] > seen[9] >= 5e-5, seen
    assert t.set_lr(1.0) == pytest.approx(5e-5) and t.set_lr(0.0) == 1e-3
    # a time budget counts too: halfway through the minutes anneals as halfway through the steps would
    assert t.set_lr(0.85) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5)), "the cosine's midpoint"


def test_resume_refuses_other_settings(recording: dict[str, Path], tmp_path: Path) -> None:
    t, _ = _trainer(recording, tmp_path / "c", 1)
    t.run()
    other, _ = _trainer(recording, tmp_path / "c", 2, lr=5e-4)
    with pytest.raises(ConfigError, match=r"other settings \(lr\)"):
        other.resume()


def test_short_recording_is_refused_without_allow_short(recording: dict[str, Path]) -> None:
    from avatar.package import AvatarPackage
    from avatar.train import load_data

    with AvatarPackage.open(recording["pkg"]) as pkg, pytest.raises(ConfigError, match="too few to train on"):
        load_data(pkg, features="ave", feature_options={"encoder": str(recording["encoder"])})


def test_precomputed_rows_are_the_audio(recording: dict[str, Path], tmp_path: Path) -> None:
    """--features npy: the windows are the file's rows (AVE window layout, replicate padding)."""
    from avatar.package import AvatarPackage
    from avatar.train import load_data
    from avatar.windows import window

    rows = np.random.default_rng(0).standard_normal((FRAMES, 512)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    with AvatarPackage.open(recording["pkg"]) as pkg:
        data = load_data(pkg, features="npy", feature_options={"path": str(tmp_path / "rows.npy")}, allow_short=True)
    assert data.mode == "ave" and data.windows.shape == (FRAMES, 32, 16, 16)
    np.testing.assert_array_equal(data.windows[7], window(rows, 7, padding="replicate").reshape(32, 16, 16))


def test_syncnet_sees_negative_pairs(recording: dict[str, Path], tmp_path: Path) -> None:
    t, data = _trainer(recording, tmp_path / "s", 2, syncnet_weight=0.5)
    idx = np.arange(10)
    neg = t.sync._negatives(idx)
    assert (np.abs(neg - idx) >= min(t.sync.min_shift, 1)).all() and (neg != idx).all()
    before = {k: v.clone() for k, v in t.sync.net.state_dict().items()}
    t.run()
    after = t.sync.net.state_dict()
    assert any(not bool((before[k] == after[k]).all()) for k in before)  # the SyncNet trained too


def _vgg_file(path: Path, seed: int = 0) -> Path:
    """A VGG19 state dict in torchvision's layout (features.N.*, a classifier), random weights: the SDK ships none."""
    import torch

    from avatar_plugins.torch_reference.perceptual import vgg19_to_conv3_3

    torch.manual_seed(seed)
    state = {f"features.{k}": v for k, v in vgg19_to_conv3_3().state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(state, path)
    return path


def test_perceptual_loss_uses_the_given_vgg_weights(recording: dict[str, Path], tmp_path: Path) -> None:
    import torch

    from avatar_plugins.torch_reference.perceptual import PerceptualLoss, load_vgg_weights

    plain, _ = _trainer(recording, tmp_path / "p0", 2)
    with_vgg, _ = _trainer(recording, tmp_path / "p1", 2, perceptual_weight=0.5,
                           vgg_weights=str(_vgg_file(tmp_path / "vgg.pth")))
    assert plain.perceptual is None and with_vgg.perceptual is not None
    a, b = plain.run().losses, with_vgg.run().losses
    assert a[0] != b[0] and all(np.isfinite(b)), (a, b)  # same seed and batch: the loss differs by the VGG term
    # the term follows its inputs and its weights: zero for equal images, larger for a farther one, other weights
    # give another value
    loss = with_vgg.perceptual
    x = torch.rand(2, 3, 64, 64)
    off = {"device_type": "cpu", "enabled": False}
    assert float(loss(x, x, off)) == 0.0
    assert 0 < float(loss(x * 0.9, x, off)) < float(loss(1 - x, x, off))
    other = PerceptualLoss(load_vgg_weights(_vgg_file(tmp_path / "vgg2.pth", seed=1)))
    assert float(other(1 - x, x, off)) != float(loss(1 - x, x, off))


def test_perceptual_loss_refuses_what_is_not_vgg19(recording: dict[str, Path], tmp_path: Path) -> None:
    import torch

    with pytest.raises(ConfigError, match="needs VGG19 weights"):
        _trainer(recording, tmp_path / "q0", 1, perceptual_weight=0.1)
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "small.pth")
    with pytest.raises(ConfigError, match=r"not VGG19 weights: features.0.weight is \(8, 3, 3, 3\)"):
        _trainer(recording, tmp_path / "q1", 1, perceptual_weight=0.1, vgg_weights=str(tmp_path / "small.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read VGG weights"):
        _trainer(recording, tmp_path / "q2", 1, perceptual_weight=0.1, vgg_weights=str(tmp_path / "junk.pth"))


def test_export_installs_a_model_that_inspects_and_renders(recording: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    import av

    pkg = tmp_path / "pkg"
    shutil.copytree(recording["pkg"], pkg)
    out = tmp_path / "model.onnx"
    r = CliRunner().invoke(cli, ["train", str(pkg), "-o", str(out), "--ave-encoder", str(recording["encoder"]), "--tiny",
                                 "--steps", "2", "--batch", "2", "--allow-short", "--holdout", "0.2",
                                 "--vgg-weights", str(_vgg_file(tmp_path / "vgg.pth"))])
    assert r.exit_code == 0, r.output
    assert "held-out frames 19-23: face" in r.output and "lip-sync signal" in r.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["steps"] == 2 and record["gate"]["held_out_frames"] == [19, 23]
    assert record["config"]["perceptual_weight"] == 0.01 and record["config"]["vgg_weights"].endswith("vgg.pth")
    manifest = json.loads((pkg / "avatar.json").read_text())
    assert manifest["model"] == {"file": "unet.onnx", "feature_type": "ave", "padding": "replicate",
                                 "audio_encoder": "ave_encoder.onnx"}
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert r.exit_code == 0 and "ave" in r.output, r.output
    video = tmp_path / "out.mp4"
    r = CliRunner().invoke(cli, ["run", "--avatar", str(pkg), "--audio", str(pkg / "audio.wav"), "-o", str(video),
                                 "--no-progress"])
    assert r.exit_code == 0, r.output
    with av.open(str(video)) as c:
        assert sum(1 for _ in c.decode(video=0)) == FRAMES


def test_ctrl_c_saves_a_checkpoint_that_resumes(recording: dict[str, Path], tmp_path: Path) -> None:
    """A real `avatar train` process gets SIGINT: it exits 130 and leaves a checkpoint --resume continues."""
    import torch

    ckpt = tmp_path / "ckpt"
    args = [sys.executable, "-m", "avatar", "train", str(recording["pkg"]), "-o", str(tmp_path / "m.onnx"),
            "--ave-encoder", str(recording["encoder"]), "--tiny", "--steps", "100000", "--batch", "2", "--allow-short",
            "--holdout", "0.2", "--checkpoint-dir", str(ckpt), "--no-install", "--eval-every", "100000"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 300
        line = ""
        while "step 1/" not in line:  # the first step is done: training is under way
            line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line or proc.poll() is None, "avatar train ended before its first step"
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "Traceback" not in err
    step = torch.load(ckpt / "last.pt", weights_only=False)["step"]
    assert step >= 1
    r = CliRunner().invoke(cli, ["train", str(recording["pkg"]), "-o", str(tmp_path / "m.onnx"), "--ave-encoder",
                                 str(recording["encoder"]), "--tiny", "--steps", str(step + 1), "--batch", "2",
                                 "--allow-short", "--holdout", "0.2", "--checkpoint-dir", str(ckpt), "--no-install",
                                 "--eval-every", "100000", "--resume"])
    assert r.exit_code == 0, r.output
    assert torch.load(ckpt / "last.pt", weights_only=False)["step"] == step + 1


def test_wenet_features_train_the_wenet_network(recording: dict[str, Path], tmp_path: Path) -> None:
    """--features wenet: the SDK's WeNet source makes the windows; the UNet gets its wenet audio branch and trains."""
    from test_feature_wenet import _encoder

    from avatar.package import AvatarPackage
    from avatar.train import load_data
    from avatar_plugins.torch_reference.training import TrainConfig, Trainer

    from avatar.demo import mouth_opening, speechlike_audio, synthetic_frames, write_wav
    from avatar.package import write_package

    with AvatarPackage.open(recording["pkg"]) as pkg, pytest.raises(ConfigError, match="prepare the video with --fps 20"):
        load_data(pkg, features="wenet", feature_options={"model": str(_encoder(tmp_path / "w0.onnx"))}, allow_short=True)
    # WeNet's rows come at 20 per second: a recording prepared at 20 fps
    pcm = speechlike_audio(FRAMES / 20, seed=2)
    frames, boxes = synthetic_frames(FRAMES, width=320, height=240, mouth=mouth_opening(pcm, FRAMES))
    path = write_package(tmp_path / "pkg20", iter(frames), boxes, fps=20, name="rec20", source={"audio": "audio.wav"})
    write_wav(path / "audio.wav", pcm)
    encoder = _encoder(tmp_path / "wenet.onnx")
    with AvatarPackage.open(path) as pkg:
        data = load_data(pkg, features="wenet", feature_options={"model": str(encoder)}, holdout=0.2, allow_short=True)
        other = load_data(pkg, features="wenet", feature_options={"model": str(_encoder(tmp_path / "w2.onnx", seed=3))},
                          holdout=0.2, allow_short=True)
    assert data.mode == "wenet" and data.windows.shape == (FRAMES, 256, 16, 32)
    assert not np.array_equal(data.windows, other.windows)  # the encoder's weights are what the windows are made of
    t = Trainer(data, TrainConfig(steps=2, batch=2, tiny=True, eval_every=1000, checkpoint_every=1000), tmp_path / "c")
    result = t.run()
    assert result.steps == 2 and all(np.isfinite(result.losses)) and t.model.audio_shape == (256, 16, 32)
