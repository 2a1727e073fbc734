"""The PyTorch reference plugin: networks, checkpoints, ONNX export, `avatar export`.

Real components throughout: real torch modules, checkpoints written with
torch.save and read back, real torch.onnx exports run in ONNX Runtime, the real
CLI through click's CliRunner. Full UNet exports cost several seconds each, so
each audio mode is exported once (ave through the CLI, hubert and wenet through
the Python API with non-default options).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from avatar.cli import cli  # noqa: E402
from avatar.contract import read_contract  # noqa: E402
from avatar.errors import ConfigError, ModelError  # noqa: E402
from avatar_plugins.torch_reference.checkpoints import (  # noqa: E402
    audio_encoder_from_state_dict,
    load_audio_encoder_checkpoint,
    load_unet_checkpoint,
    unet_from_state_dict,
)
from avatar_plugins.torch_reference.export import ParityResult, export_audio_encoder, export_unet  # noqa: E402
from avatar_plugins.torch_reference.networks import (  # noqa: E402
    AudioEncoder,
    UNet328,
    calibrate_batchnorm,
    example_inputs,
    seeded_audio_encoder,
    seeded_unet,
)

ROOT = Path(__file__).resolve().parents[1]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(model: torch.nn.Module, *inputs: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs).numpy()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not a.training


def one_line_error(result) -> str:
    """The CLI's error output: exactly one non-empty line starting with 'error:'."""
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    return errors[0]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def ave_model() -> UNet328:
    return seeded_unet("ave", seed=0)


@pytest.fixture(scope="module")
def encoder() -> AudioEncoder:
    return seeded_audio_encoder(seed=0)


@pytest.fixture(scope="module")
def ave_ckpt(ckpt_dir: Path, ave_model: UNet328) -> Path:
    path = ckpt_dir / "ave.pth"
    torch.save(ave_model.state_dict(), path)  # what a SyncTalk_2D training run writes
    return path


@pytest.fixture(scope="module")
def encoder_ckpt_upstream(ckpt_dir: Path, encoder: AudioEncoder) -> Path:
    """The upstream file layout: keys without the ``audio_encoder.`` prefix."""
    path = ckpt_dir / "audio_visual_encoder.pth"
    state = {k.removeprefix("audio_encoder."): v for k, v in encoder.state_dict().items()}
    assert not any(k.startswith("audio_encoder.") for k in state)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def wenet_ckpt_raw(ckpt_dir: Path) -> Path:
    """An uncalibrated WeNet checkpoint, for mode-mismatch errors (no export needed)."""
    path = ckpt_dir / "wenet_raw.pth"
    torch.save(UNet328("wenet").state_dict(), path)
    return path


# ------------------------------------------------------------------ networks


def test_parameter_counts_match_the_model_family() -> None:
    assert round(n_params(UNet328("ave")) / 1e6, 2) == 12.19
    assert round(n_params(UNet328("hubert")) / 1e6, 2) == 12.19  # same shapes, one stride differs
    assert n_params(UNet328("wenet")) > n_params(UNet328("ave"))  # 256-wide audio input
    assert round(n_params(AudioEncoder()) / 1e6, 2) == 2.81


# (key, shape) pairs read from SyncTalk_2D's unet_328.py (class Model): renaming a
# layer or changing its width must fail here, because real checkpoints use these.
UPSTREAM_UNET_KEYS = {
    "inc.inconv.0.conv.0.weight": (12, 6, 1, 1),
    "inc.inconv.0.conv.3.weight": (12, 1, 3, 3),
    "inc.inconv.0.conv.7.running_var": (32,),
    "down1.maxpool_conv.0.double_conv.0.conv.0.weight": (64, 32, 1, 1),
    "down5.maxpool_conv.0.double_conv.1.conv.7.running_mean": (512,),
    "audio_model.conv1.conv.0.weight": (64, 32, 1, 1),
    "audio_model.conv2.conv.6.weight": (128, 128, 1, 1),
    "audio_model.conv3.weight": (256, 128, 3, 3),
    "audio_model.conv3.bias": (256,),
    "audio_model.bn3.num_batches_tracked": (),
    "audio_model.conv5.weight": (512, 256, 3, 3),
    "audio_model.bn5.running_var": (512,),
    "audio_model.conv7.conv.7.weight": (512,),
    "fuse_conv.0.double_conv.0.conv.0.weight": (2048, 1024, 1, 1),
    "fuse_conv.1.double_conv.1.conv.6.weight": (256, 512, 1, 1),
    "up1.conv.double_conv.0.conv.0.weight": (1024, 512, 1, 1),
    "up4.conv.double_conv.0.conv.6.weight": (32, 128, 1, 1),
    "up5.conv.double_conv.1.conv.3.weight": (32, 1, 3, 3),
    "outc.conv.weight": (3, 16, 1, 1),
    "outc.conv.bias": (3,),
}
UPSTREAM_ENCODER_KEYS = {
    "audio_encoder.0.conv_block.0.weight": (32, 1, 3, 3),
    "audio_encoder.0.conv_block.0.bias": (32,),
    "audio_encoder.3.conv_block.0.weight": (64, 32, 3, 3),
    "audio_encoder.3.conv_block.1.num_batches_tracked": (),
    "audio_encoder.10.conv_block.1.running_mean": (256,),
    "audio_encoder.11.conv_block.0.weight": (512, 256, 3, 3),
    "audio_encoder.12.conv_block.0.weight": (512, 512, 1, 1),
}


def test_state_dict_names_follow_upstream() -> None:
    state = UNet328("ave").state_dict()
    assert len(state) == 556
    for key, shape in UPSTREAM_UNET_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert {k.split(".")[0] for k in state} == {
        "audio_model", "fuse_conv", "inc", "down1", "down2", "down3", "down4", "down5",
        "up1", "up2", "up3", "up4", "up5", "outc",
    }
    wenet = UNet328("wenet").state_dict()
    assert tuple(wenet["audio_model.conv1.conv.0.weight"].shape) == (512, 256, 1, 1)
    assert tuple(wenet["audio_model.conv3.weight"].shape) == (256, 256, 3, 3)
    assert set(wenet) == set(state)  # same names, only the audio widths differ

    enc = AudioEncoder().state_dict()
    assert len(enc) == 13 * 7  # 13 conv+BN blocks: weight, bias, BN weight/bias/mean/var/count
    for key, shape in UPSTREAM_ENCODER_KEYS.items():
        assert tuple(enc[key].shape) == shape, key


@pytest.mark.parametrize("mode,audio", [("ave", (32, 16, 16)), ("hubert", (32, 32, 32)), ("wenet", (256, 16, 32))])
def test_each_audio_branch_meets_the_10x10_bottleneck(mode: str, audio: tuple[int, ...]) -> None:
    # only the audio branch runs here; the full forward of every mode runs in the export tests
    model = UNet328(mode).eval()
    assert model.audio_shape == audio
    assert run(model.audio_model, torch.randn(2, *audio)).shape == (2, 512, 10, 10)
    other = {"ave": (32, 32, 32), "hubert": (32, 16, 16), "wenet": (32, 16, 16)}[mode]
    with torch.no_grad():
        try:
            wrong = model.audio_model(torch.randn(1, *other)).shape
        except RuntimeError:
            wrong = None  # channel mismatch
    assert wrong != (1, 512, 10, 10)  # another mode's window cannot reach the bottleneck


def test_full_forward_is_a_bgr_face_in_0_1(ave_model: UNet328) -> None:
    out = run(ave_model, *example_inputs(ave_model, batch=1, seed=12))
    assert out.shape == (1, 3, 320, 320)
    assert 0.0 <= out.min() and out.max() <= 1.0  # sigmoid


def test_unknown_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ave, hubert, wenet"):
        UNet328("deepspeech")


def test_calibrated_unet_reacts_to_audio_and_visual(ave_model: UNet328) -> None:
    visual, audio = example_inputs(ave_model, batch=1, seed=11)
    audio2 = torch.randn(audio.shape, generator=torch.Generator().manual_seed(5))
    visual2 = torch.rand(visual.shape, generator=torch.Generator().manual_seed(6))
    base, other_audio, other_visual = run(ave_model, torch.cat([visual, visual, visual2]),
                                          torch.cat([audio, audio2, audio]))
    assert np.abs(base - other_audio).mean() > 1e-3
    assert np.abs(base - other_visual).mean() > 1e-3
    assert base.std() > 0.01  # not a flat image


def test_calibration_is_what_makes_the_audio_matter() -> None:
    torch.manual_seed(3)
    model = UNet328("ave").eval()  # untouched BN statistics
    visual, audio = example_inputs(model, batch=1, seed=1)
    pair = (visual.repeat(2, 1, 1, 1), torch.cat([audio, -audio]))  # one batch: same face, two audios
    out = run(model, *pair)
    before = np.abs(out[0] - out[1]).mean()
    calibrate_batchnorm(model, seed=3, steps=2)
    assert not model.training
    out = run(model, *pair)
    after = np.abs(out[0] - out[1]).mean()
    assert before < 1e-4 < 1e-3 < after


def test_calibrate_batchnorm_uses_its_seed_and_restores_momentum() -> None:
    torch.manual_seed(0)
    a = AudioEncoder()
    b = AudioEncoder()
    b.load_state_dict(a.state_dict())
    calibrate_batchnorm(a, seed=1, steps=1)
    calibrate_batchnorm(b, seed=2, steps=1)
    bn_a, bn_b = a.audio_encoder[0].conv_block[1], b.audio_encoder[0].conv_block[1]
    assert bn_a.momentum == 0.1  # restored
    assert not torch.equal(bn_a.running_mean, bn_b.running_mean)
    assert not torch.equal(bn_a.running_mean, torch.zeros_like(bn_a.running_mean))


def test_seeded_models_are_reproducible_and_seed_dependent() -> None:
    mel = example_inputs(AudioEncoder(), batch=2, seed=4)[0]
    a, b, c = (run(seeded_audio_encoder(s), mel) for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-2


def test_audio_encoder_maps_a_mel_window_to_512_values(encoder: AudioEncoder) -> None:
    mel = example_inputs(encoder, batch=3, seed=1)[0]
    assert mel.shape == (3, 1, 80, 16)
    out = run(encoder, mel)
    assert out.shape == (3, 512)
    assert np.abs(out[0] - out[1]).mean() > 1e-2  # different mel, different features


# ------------------------------------------------------------------ checkpoints


def test_wrapped_and_dataparallel_checkpoints_load(tmp_path: Path, ave_model: UNet328) -> None:
    state = ave_model.state_dict()
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "wrapped.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "dp.pth")
    for name in ("wrapped.pth", "dp.pth"):
        assert_same_weights(load_unet_checkpoint(tmp_path / name, "ave"), ave_model)


def test_state_dict_of_numpy_arrays_loads(ave_model: UNet328, encoder: AudioEncoder) -> None:
    """The torch-free synthetic builder hands over numpy state dicts in upstream naming."""
    arrays = {k: v.numpy() for k, v in ave_model.state_dict().items()}
    assert_same_weights(unet_from_state_dict(arrays, "ave"), ave_model)
    enc = audio_encoder_from_state_dict({k: v.numpy() for k, v in encoder.state_dict().items()})
    mel = example_inputs(enc, batch=1)[0]
    np.testing.assert_array_equal(run(enc, mel), run(encoder, mel))


def test_mismatched_keys_name_the_keys(tmp_path: Path) -> None:
    state = UNet328("ave").state_dict()
    state["outc.conv.weight_renamed"] = state.pop("outc.conv.weight")
    state["up3.conv.double_conv.0.conv.0.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ModelError) as err:
        load_unet_checkpoint(tmp_path / "bad.pth", "ave")
    msg = str(err.value)
    assert "missing: outc.conv.weight" in msg
    assert "unexpected: outc.conv.weight_renamed" in msg
    assert "wrong shape: up3.conv.double_conv.0.conv.0.weight" in msg
    assert "ave/hubert" in msg  # the mode that fits the audio branch
    assert "\n" not in msg


def test_wrong_mode_names_the_mode_that_fits(wenet_ckpt_raw: Path, ave_ckpt: Path) -> None:
    with pytest.raises(ModelError, match="use --mode wenet"):
        load_unet_checkpoint(wenet_ckpt_raw, "ave")
    with pytest.raises(ModelError, match="use --mode ave or --mode hubert"):
        load_unet_checkpoint(ave_ckpt, "wenet")
    # AVE and HuBERT share every parameter shape: the file cannot tell them apart
    assert load_unet_checkpoint(ave_ckpt, "hubert").mode == "hubert"


def test_unreadable_and_swapped_checkpoints(tmp_path: Path, ave_ckpt: Path, encoder_ckpt_upstream: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="torch.save"):
        load_unet_checkpoint(tmp_path / "junk.pth", "ave")
    with pytest.raises(ModelError, match="not found"):
        load_unet_checkpoint(tmp_path / "missing.pth", "ave")
    with pytest.raises(ModelError, match="avatar export unet"):
        load_audio_encoder_checkpoint(ave_ckpt)
    with pytest.raises(ModelError, match="avatar export audio-encoder"):
        load_unet_checkpoint(encoder_ckpt_upstream, "ave")


def test_encoder_checkpoint_loads_with_and_without_prefix(
    tmp_path: Path, encoder: AudioEncoder, encoder_ckpt_upstream: Path
) -> None:
    torch.save(encoder.state_dict(), tmp_path / "prefixed.pth")
    mel = example_inputs(encoder, batch=2, seed=3)[0]
    want = run(encoder, mel)
    for path in (encoder_ckpt_upstream, tmp_path / "prefixed.pth"):
        np.testing.assert_array_equal(run(load_audio_encoder_checkpoint(path), mel), want)


# ------------------------------------------------------------------ export


def ort_run(path: Path, *arrays: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), arrays)})[0]


def assert_self_contained(path: Path) -> None:
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(path.name)] == [path.name]
    model = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


@pytest.mark.parametrize("mode,seed", [("hubert", 1), ("wenet", 2)])
def test_export_unet_from_checkpoint_matches_torch(tmp_path: Path, mode: str, seed: int) -> None:
    model = seeded_unet(mode, seed)
    torch.save(model.state_dict(), tmp_path / f"{mode}.pth")
    out = tmp_path / f"{mode}.onnx"
    names = ("visual_input", "audio_input", "pred")  # the older exports' names
    result = export_unet(tmp_path / f"{mode}.pth", mode, out, opset=18, names=names)
    assert isinstance(result, ParityResult)
    assert result.ok and result.max_abs_diff <= 1e-4, result
    assert result.shape == (2, 3, 320, 320)
    assert str(result).startswith("parity: max abs diff ") and str(result).endswith("(ok)")

    assert_self_contained(out)
    proto = onnx.load(str(out), load_external_data=False)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert [i.name for i in proto.graph.input] == ["visual_input", "audio_input"]
    assert [o.name for o in proto.graph.output] == ["pred"]
    contract = read_contract(out)  # the SDK's own reader identifies the model
    assert contract.feature_type == mode and contract.dynamic_batch


def test_export_rejects_bad_options(tmp_path: Path, encoder: AudioEncoder, ave_model: UNet328) -> None:
    with pytest.raises(ConfigError, match="opset"):
        export_audio_encoder(encoder, tmp_path / "e.onnx", opset=13)
    with pytest.raises(ConfigError, match="distinct"):
        export_audio_encoder(encoder, tmp_path / "e.onnx", names=("x", "x"))
    with pytest.raises(ConfigError, match="3 distinct"):
        export_unet(ave_model, "ave", tmp_path / "u.onnx", names=("input", "audio"))
    with pytest.raises(ConfigError, match="'hubert'"):
        export_unet(ave_model, "hubert", tmp_path / "u.onnx")
    with pytest.raises(ConfigError, match="does not exist"):
        export_audio_encoder(encoder, tmp_path / "nowhere" / "e.onnx")


def test_export_audio_encoder_python_api(tmp_path: Path, encoder: AudioEncoder) -> None:
    out = tmp_path / "enc.onnx"
    result = export_audio_encoder(encoder, out)
    assert result is not None and result.ok and result.max_abs_diff <= 1e-4
    assert result.shape == (2, 512)
    assert_self_contained(out)
    mel = example_inputs(encoder, batch=5, seed=8)[0]
    np.testing.assert_allclose(ort_run(out, mel.numpy()), run(encoder, mel), atol=1e-4)
    assert export_audio_encoder(encoder, tmp_path / "nocheck.onnx", check=False) is None


def test_legacy_exporter_fallback_gives_the_same_contract(tmp_path: Path, encoder: AudioEncoder,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Without onnxscript (or on torch < 2.5) the TorchScript exporter is used; the checks still hold."""
    import avatar_plugins.torch_reference.export as export_mod

    real_export, seen = torch.onnx.export, []

    @functools.wraps(real_export)  # keeps the signature the exporter choice inspects
    def spy(*args, **kwargs):  # records the exporter choice, then runs the real exporter
        seen.append(kwargs.get("dynamo"))
        return real_export(*args, **kwargs)

    monkeypatch.setattr(export_mod, "_use_dynamo", lambda: False)
    monkeypatch.setattr(torch.onnx, "export", spy)
    out = tmp_path / "legacy.onnx"
    result = export_audio_encoder(encoder, out)
    assert seen == [False]
    assert result is not None and result.ok, result
    contract = onnx.load(str(out))
    assert contract.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert [o.version for o in contract.opset_import if o.domain in ("", "ai.onnx")] == [17]


# ------------------------------------------------------------------ CLI


def test_cli_exports_a_unet_checkpoint(tmp_path: Path, ave_ckpt: Path, ave_model: UNet328) -> None:
    out = tmp_path / "model.onnx"
    res = CliRunner().invoke(cli, ["export", "unet", str(ave_ckpt), "--mode", "ave", "-o", str(out)])
    assert res.exit_code == 0, res.output
    parity = [ln for ln in res.output.splitlines() if ln.startswith("parity: max abs diff ")]
    assert len(parity) == 1 and parity[0].endswith("over 2x3x320x320 outputs (ok)"), res.output
    assert float(parity[0].split()[4]) <= 1e-4
    proto = onnx.load(str(out), load_external_data=False)
    assert [i.name for i in proto.graph.input] == ["input", "audio"]  # the default names
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert_self_contained(out)
    # independent of the built-in check: other inputs, float32 PyTorch
    visual, audio = example_inputs(ave_model, batch=1, seed=30)
    np.testing.assert_allclose(ort_run(out, visual.numpy(), audio.numpy()), run(ave_model, visual, audio), atol=1e-4)


def test_cli_exports_the_upstream_audio_encoder(tmp_path: Path, encoder_ckpt_upstream: Path) -> None:
    out = tmp_path / "ave_encoder.onnx"
    args = ["export", "audio-encoder", str(encoder_ckpt_upstream), "-o", str(out)]
    res = CliRunner().invoke(cli, [*args, "--names", "m,f", "--opset", "18"])
    assert res.exit_code == 0, res.output
    assert "parity: max abs diff " in res.output and "over 2x512 outputs (ok)" in res.output
    proto = onnx.load(str(out))
    assert [i.name for i in proto.graph.input] == ["m"] and [o.name for o in proto.graph.output] == ["f"]
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]


def test_cli_tolerance_turns_a_tiny_difference_into_a_failure(tmp_path: Path, encoder_ckpt_upstream: Path) -> None:
    out = tmp_path / "enc.onnx"
    res = CliRunner().invoke(cli, ["export", "audio-encoder", str(encoder_ckpt_upstream), "-o", str(out),
                                   "--tolerance", "1e-15"])
    assert res.exit_code == 1, res.output
    assert "(FAILED, tolerance 1e-15)" in res.output
    assert "does not reproduce PyTorch" in one_line_error(res)


def test_cli_wrong_mode_is_one_line(tmp_path: Path, wenet_ckpt_raw: Path) -> None:
    res = CliRunner().invoke(cli, ["export", "unet", str(wenet_ckpt_raw), "--mode", "ave",
                                   "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code != 0
    line = one_line_error(res)
    assert "wenet checkpoint" in line and "--mode wenet" in line
    assert not (tmp_path / "x.onnx").exists()


def test_cli_rejects_bad_opset_and_names(tmp_path: Path, encoder_ckpt_upstream: Path) -> None:
    base = ["export", "audio-encoder", str(encoder_ckpt_upstream), "-o", str(tmp_path / "x.onnx")]
    assert CliRunner().invoke(cli, [*base, "--opset", "11"]).exit_code == 2
    res = CliRunner().invoke(cli, [*base, "--names", "a,b,c"])
    assert res.exit_code == 2 and "2 distinct" in one_line_error(res)


def test_cli_without_torch_says_how_to_install(tmp_path: Path) -> None:
    """The plugin imports and lists its commands without torch; running one fails in one line."""
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail like a missing package
        "import avatar_plugins.torch_reference\n"
        "from avatar.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    env = {**os.environ, "AVATAR_PLUGINS": "torch-reference"}
    help_run = subprocess.run([sys.executable, "-c", code, "export", "--help"], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)
    assert help_run.returncode == 0, help_run.stderr
    assert "unet" in help_run.stdout and "audio-encoder" in help_run.stdout
    (tmp_path / "m.pth").write_bytes(b"x")
    res = subprocess.run([sys.executable, "-c", code, "export", "unet", "m.pth"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 1
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert err == ["error: torch is not installed for PyTorch checkpoint export; "
                   "install it with `pip install 'avatar-sdk[torch]'`"], res.stderr
