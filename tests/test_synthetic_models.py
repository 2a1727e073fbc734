"""Seeded test models built without PyTorch (avatar.models.synthetic) and `avatar make-test-model`.

Every model here is run for real with ONNX Runtime; the cross-check loads the
numpy state dicts into the PyTorch reference networks when those are installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from avatar.cli import cli
from avatar.contract import read_contract
from avatar.errors import ConfigError, ModelError
from avatar.models import synthetic as S

MODES = list(S.MODES)


def _session(path: Path):  # noqa: ANN202 - onnxruntime type
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(path: Path, visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
    sess = _session(path)
    ins = [i.name for i in sess.get_inputs()]
    return sess.run(None, {ins[0]: visual, ins[1]: audio})[0]


@pytest.fixture(scope="module")
def state_dicts() -> dict[str, dict[str, np.ndarray]]:
    """Full-size state dicts, built once per mode on first use."""
    return {}


def _sd(cache: dict[str, dict[str, np.ndarray]], mode: str) -> dict[str, np.ndarray]:
    if mode not in cache:
        cache[mode] = S.unet_state_dict(mode, seed=0)
    return cache[mode]


@pytest.fixture(scope="module", params=[(m, t) for t in (True, False) for m in MODES], ids=lambda p: f"{p[0]}-{'tiny' if p[1] else 'full'}")
def model(request, tmp_path_factory, state_dicts) -> tuple[str, bool, Path]:
    mode, tiny = request.param
    path = tmp_path_factory.mktemp("models") / f"{mode}{'-tiny' if tiny else ''}.onnx"
    if tiny:
        S.make_unet(path, mode=mode, seed=0, tiny=True)
    else:
        S.build_unet_onnx(_sd(state_dicts, mode), mode, path)
    return mode, tiny, path


# ---------------------------------------------------------------- per model
def test_contract_identifies_mode_names_and_dynamic_batch(model) -> None:
    mode, _, path = model
    c = read_contract(path)
    assert c.feature_type == mode
    assert (c.visual.name, c.audio.name, c.output.name) == ("input", "audio", "output")
    assert c.dynamic_batch and c.fixed_batch is None
    assert c.visual.shape[0] == "batch" and c.opset == 17
    assert not c.visual_uint8


def test_runs_batch_1_and_3_with_outputs_in_0_1(model) -> None:
    mode, _, path = model
    v, a = S.sample_visual(3, seed=3), S.sample_audio(mode, 3, seed=3)
    out3 = _run(path, v, a)
    out1 = _run(path, v[1:2], a[1:2])
    assert out3.shape == (3, 3, 320, 320) and out3.dtype == np.float32
    assert out1.shape == (1, 3, 320, 320)
    # A row does not depend on the other rows of its batch (BN is folded, eval mode).
    np.testing.assert_allclose(out1[0], out3[1], atol=1e-5)
    assert 0.0 < out3.min() and out3.max() < 1.0
    assert out3.std() > 0.05, "output is (nearly) constant"
    # Not saturated: most values are well inside the sigmoid's range.
    assert np.mean((out3 < 0.01) | (out3 > 0.99)) < 0.05


def test_audio_and_visual_each_move_the_output(model) -> None:
    _, tiny, path = model
    s = S.check_sensitivity(path)
    assert s.audio > 1e-2, s
    assert s.visual is not None and s.visual > 1e-2, s
    assert s.ok


def test_uint8_visual_equals_float_on_scaled_input(model, tmp_path, state_dicts) -> None:
    mode, tiny, path = model
    u8 = tmp_path / "u8.onnx"
    if tiny:
        S.make_unet(u8, mode=mode, seed=0, tiny=True, uint8_visual=True)
    else:
        S.build_unet_onnx(_sd(state_dicts, mode), mode, u8, uint8_visual=True)
    assert read_contract(u8).visual_uint8
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2, 6, 320, 320), dtype=np.uint8)
    a = S.sample_audio(mode, 2, seed=4)
    got = _run(u8, x, a)
    want = _run(path, x.astype(np.float32) / 255.0, a)
    assert np.abs(got - want).max() <= 1e-5


def test_real_ave_windows_move_the_output(sanders_dir, tmp_path, state_dicts) -> None:
    """Real AVE features (made by the pretrained encoder) drive the AVE models visibly."""
    feats = np.load(sanders_dir / "aud_ave.npy")
    w = np.stack([feats[100:116].reshape(32, 16, 16), feats[300:316].reshape(32, 16, 16)])
    v = np.repeat(S.sample_visual(1, seed=8), 2, axis=0)
    for path in (
        S.make_unet(tmp_path / "tiny.onnx", mode="ave", tiny=True),
        S.build_unet_onnx(_sd(state_dicts, "ave"), "ave", tmp_path / "full.onnx"),
    ):
        out = _run(path, v, w)
        assert np.abs(out[0] - out[1]).mean() > 1e-2, path.name


# ---------------------------------------------------------------- state dicts
def test_state_dict_sizes_and_upstream_naming(state_dicts) -> None:
    sd = _sd(state_dicts, "ave")
    assert S.parameter_count(sd) == pytest.approx(12.19e6, rel=1e-3)
    assert "audio_model.conv3.weight" in sd and "outc.conv.bias" in sd
    assert "up5.conv.double_conv.1.conv.7.running_var" in sd
    assert sd["inc.inconv.0.conv.1.num_batches_tracked"].dtype == np.int64
    assert sd["inc.inconv.0.conv.1.num_batches_tracked"].shape == ()
    assert next(iter(sd)).startswith("audio_model.")  # the module registration order
    assert all(v.dtype == np.float32 for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    enc = S.audio_encoder_state_dict(0)
    assert S.parameter_count(enc) == pytest.approx(2.81e6, rel=2e-3)
    assert "audio_encoder.12.conv_block.1.running_mean" in enc


def test_calibration_sets_batchnorm_statistics(state_dicts) -> None:
    sd = _sd(state_dicts, "ave")
    var = sd["down5.maxpool_conv.0.double_conv.0.conv.1.running_var"]
    assert not np.allclose(var, 1.0) and np.all(var > 0)
    assert not np.allclose(sd["audio_model.bn5.running_mean"], 0.0)


def test_calibration_is_what_makes_the_audio_matter(tmp_path, state_dicts) -> None:
    """With PyTorch's untouched (0, 1) statistics the audio barely matters; calibrated, it does."""
    sd = dict(_sd(state_dicts, "ave"))
    for k in sd:
        if k.endswith("running_mean"):
            sd[k] = np.zeros_like(sd[k])
        elif k.endswith("running_var"):
            sd[k] = np.ones_like(sd[k])
    v = np.repeat(S.sample_visual(1, seed=1), 2, axis=0)
    a = S.sample_audio("ave", 2, seed=1)

    def audio_effect(path: Path) -> float:
        out = _run(path, v, a)
        return float(np.abs(out[0] - out[1]).mean())

    raw = audio_effect(S.build_unet_onnx(sd, "ave", tmp_path / "raw.onnx"))
    calibrated = audio_effect(S.build_unet_onnx(_sd(state_dicts, "ave"), "ave", tmp_path / "cal.onnx"))
    assert calibrated > 1e-2 and calibrated > 10 * raw, (calibrated, raw)


def test_same_seed_same_model_other_seed_other_model(tmp_path, state_dicts) -> None:
    a1 = S.make_unet(tmp_path / "a1.onnx", mode="hubert", seed=5, tiny=True)
    a2 = S.make_unet(tmp_path / "a2.onnx", mode="hubert", seed=5, tiny=True)
    b = S.make_unet(tmp_path / "b.onnx", mode="hubert", seed=6, tiny=True)
    assert a1.read_bytes() == a2.read_bytes()
    v, a = S.sample_visual(1, seed=1), S.sample_audio("hubert", 1, seed=1)
    assert np.abs(_run(a1, v, a) - _run(b, v, a)).mean() > 1e-3
    # Full size: the state dict is a pure function of (mode, seed).
    again = S.unet_state_dict("wenet", seed=0)
    ref = _sd(state_dicts, "wenet")
    assert list(again) == list(ref)
    assert all(np.array_equal(again[k], ref[k]) for k in ref)


def test_alternative_names(tmp_path, state_dicts) -> None:
    names = ("visual_input", "audio_input", "output")
    for path in (
        S.make_unet(tmp_path / "t.onnx", mode="wenet", tiny=True, names=names),
        S.build_unet_onnx(_sd(state_dicts, "ave"), "ave", tmp_path / "f.onnx", names=names),
    ):
        c = read_contract(path)
        assert (c.visual.name, c.audio.name, c.output.name) == names
        out = _session(path).run(["output"], {"visual_input": S.sample_visual(1), "audio_input": S.sample_audio(c.feature_type, 1)})
        assert out[0].shape == (1, 3, 320, 320)


def test_opset_option_changes_the_file_not_the_result(tmp_path) -> None:
    p17 = S.make_unet(tmp_path / "17.onnx", mode="ave", tiny=True)
    p13 = S.make_unet(tmp_path / "13.onnx", mode="ave", tiny=True, opset=13)
    assert read_contract(p13).opset == 13
    v, a = S.sample_visual(1, seed=2), S.sample_audio("ave", 1, seed=2)
    np.testing.assert_allclose(_run(p13, v, a), _run(p17, v, a), atol=1e-6)


def _conv_macs(path: Path) -> int:
    """Multiply-accumulates of all Conv nodes for one frame, from ONNX shape inference."""
    import onnx

    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
    shapes.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.output})
    weights = {i.name: list(i.dims) for i in m.graph.initializer}
    total = 0
    for n in m.graph.node:
        if n.op_type == "Conv":
            out = shapes[n.output[0]]
            total += int(np.prod(out[1:])) * int(np.prod(weights[n.input[1]][1:]))
    return total


def test_tiny_is_much_cheaper(model, tmp_path) -> None:
    mode, tiny, path = model
    macs = _conv_macs(path)
    if tiny:
        assert macs < 4.89e9 / 40, f"tiny {mode} model costs {macs / 1e6:.0f} M MAC"
    else:  # the published per-frame cost of the real network
        assert macs / 1e9 == pytest.approx({"ave": 4.89, "hubert": 4.91, "wenet": 5.23}[mode], rel=0.02)


def test_bad_arguments_raise_avatar_errors(tmp_path, state_dicts) -> None:
    with pytest.raises(ConfigError, match="mode"):
        S.make_unet(tmp_path / "x.onnx", mode="whisper", tiny=True)
    with pytest.raises(ConfigError, match="names"):
        S.make_unet(tmp_path / "x.onnx", tiny=True, names=("a", "a", "b"))
    with pytest.raises(ConfigError, match="opset"):
        S.build_unet_onnx(_sd(state_dicts, "ave"), "ave", tmp_path / "x.onnx", opset=9)
    # A state dict for another mode: wrong shapes for the audio branch.
    with pytest.raises(ModelError, match="shape"):
        S.build_unet_onnx(_sd(state_dicts, "ave"), "wenet", tmp_path / "x.onnx")
    # Missing and unexpected entries are both caught.
    sd = dict(_sd(state_dicts, "ave"))
    del sd["outc.conv.bias"]
    with pytest.raises(ModelError, match="outc.conv.bias"):
        S.build_unet_onnx(sd, "ave", tmp_path / "x.onnx")
    sd = {**_sd(state_dicts, "ave"), "extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(ModelError, match="does not use"):
        S.build_unet_onnx(sd, "ave", tmp_path / "x.onnx")


# ---------------------------------------------------------------- audio encoder
@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "full"])
def test_audio_encoder_contract_and_sensitivity(tmp_path, tiny) -> None:
    path = S.make_audio_encoder(tmp_path / "enc.onnx", seed=0, tiny=tiny)
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["mel"]
    assert [o.name for o in sess.get_outputs()] == ["feature"]
    assert sess.get_inputs()[0].shape == ["batch", 1, 80, 16]
    mel = S.sample_mel(3, seed=1)
    out = sess.run(None, {"mel": mel})[0]
    assert out.shape == (3, 512) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.std() > 0.1  # ReLU output, like real AVE features
    np.testing.assert_allclose(sess.run(None, {"mel": mel[2:]})[0][0], out[2], atol=1e-5)
    other = sess.run(None, {"mel": S.sample_mel(3, seed=2)})[0]
    assert np.abs(out - other).mean() > 1e-2
    s = S.check_sensitivity(path)
    assert s.visual is None and s.ok
    again = S.make_audio_encoder(tmp_path / "again.onnx", seed=0, tiny=tiny)
    assert again.read_bytes() == path.read_bytes()


def test_audio_encoder_custom_names(tmp_path) -> None:
    path = S.make_audio_encoder(tmp_path / "e.onnx", tiny=True, names=("audio_mel", "emb"))
    out = _session(path).run(["emb"], {"audio_mel": S.sample_mel(1)})[0]
    assert out.shape == (1, 512)


# ---------------------------------------------------------------- CLI
def test_cli_makes_a_checked_unet(tmp_path) -> None:
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(cli, ["make-test-model", "-o", str(out), "--mode", "hubert", "--tiny", "--seed", "3",
                                 "--names", "visual_input,audio_input,pred", "--uint8-visual"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert str(out) in r.output and "hubert" in r.output and "visual_input" in r.output and ": ok" in r.output
    c = read_contract(out)
    assert (c.feature_type, c.visual.name, c.output.name, c.visual_uint8) == ("hubert", "visual_input", "pred", True)
    # The seed option has an effect: same seed through the library gives the same bytes.
    same = S.make_unet(tmp_path / "s.onnx", mode="hubert", seed=3, tiny=True, names=("visual_input", "audio_input", "pred"), uint8_visual=True)
    assert same.read_bytes() == out.read_bytes()


def test_cli_full_unet_default_names(tmp_path) -> None:
    out = tmp_path / "full.onnx"
    r = CliRunner().invoke(cli, ["make-test-model", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "48.7 MB" in r.output and "ave" in r.output
    c = read_contract(out)
    assert (c.feature_type, c.visual.name, c.audio.name, c.output.name) == ("ave", "input", "audio", "output")


def test_cli_audio_encoder(tmp_path) -> None:
    out = tmp_path / "enc.onnx"
    r = CliRunner().invoke(cli, ["make-test-model", "-o", str(out), "--kind", "audio-encoder", "--tiny"])
    assert r.exit_code == 0, r.output
    assert "mel" in r.output and "feature" in r.output and ": ok" in r.output
    assert _session(out).get_outputs()[0].shape == ["batch", 512]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--names", "a,b"], "--names needs 3"),
        (["--kind", "audio-encoder", "--uint8-visual"], "--uint8-visual"),
        (["--kind", "audio-encoder", "--names", "a,b,c"], "--names needs 2"),
    ],
)
def test_cli_rejects_bad_options(tmp_path, args, message) -> None:
    r = CliRunner().invoke(cli, ["make-test-model", "-o", str(tmp_path / "x.onnx"), "--tiny", *args])
    assert r.exit_code == 2
    assert message in r.output
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------- cross-check with PyTorch
def _torch_networks():  # noqa: ANN202
    pytest.importorskip("torch")
    try:
        from avatar_plugins.torch_reference import networks
    except ImportError as exc:  # the reference plugin is optional
        pytest.skip(f"PyTorch reference networks unavailable: {exc}")
    return networks


@pytest.mark.parametrize("mode", MODES)
def test_onnx_matches_pytorch_reference(mode, tmp_path, state_dicts) -> None:
    """The numpy state dict loads strictly into the PyTorch UNet328 and both agree: it is the real architecture."""
    networks = _torch_networks()
    import torch

    sd = _sd(state_dicts, mode)
    net = networks.UNet328(mode).eval()
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=True)
    path = S.build_unet_onnx(sd, mode, tmp_path / "m.onnx")
    v, a = S.sample_visual(1, seed=11), S.sample_audio(mode, 1, seed=11)
    with torch.no_grad():
        want = net(torch.from_numpy(v), torch.from_numpy(a)).numpy()
    got = _run(path, v, a)
    assert np.abs(got - want).max() <= 1e-4


def test_audio_encoder_matches_pytorch_reference(tmp_path) -> None:
    networks = _torch_networks()
    import torch

    sd = S.audio_encoder_state_dict(seed=0)
    net = networks.AudioEncoder().eval()
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=True)
    path = S.build_audio_encoder_onnx(sd, tmp_path / "e.onnx")
    mel = S.sample_mel(4, seed=5)
    with torch.no_grad():
        want = net(torch.from_numpy(mel)).numpy()
    got = _session(path).run(None, {"mel": mel})[0]
    assert np.abs(got - want).max() <= 1e-4
