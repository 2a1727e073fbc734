"""ONNX graph transforms (avatar.models.graph) and the `avatar convert` command.

Every transform is checked by running the original and the transformed model
in real ONNX Runtime CPU sessions on the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from avatar.cli import cli
from avatar.contract import read_contract
from avatar.errors import ModelError
from avatar.models.graph import FP16_MAX, to_fp16, with_uint8_visual
from avatar.models.synthetic import make_audio_encoder, make_unet, sample_audio, sample_mel, sample_visual
from avatar_plugins.backends._common import psnr


def _session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return _session(path).run(None, feeds)[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("graph_models")
    return {
        "unet": make_unet(d / "tiny.onnx", tiny=True, seed=0),
        "renamed": make_unet(d / "renamed.onnx", tiny=True, seed=1, names=("visual_input", "audio_input", "pred")),
        "encoder": make_audio_encoder(d / "enc.onnx", tiny=True),
    }


def _pixels(batch: int, seed: int = 0) -> np.ndarray:
    return np.round(sample_visual(batch, seed=seed) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- uint8 visual


@pytest.mark.parametrize("which,vis,aud", [("unet", "input", "audio"), ("renamed", "visual_input", "audio_input")])
def test_uint8_visual_matches_float_model_on_x_over_255(models, tmp_path, which, vis, aud):
    src = models[which]
    dst = with_uint8_visual(src, tmp_path / "u8.onnx")
    c = read_contract(dst)
    assert c.visual.name == vis and c.visual_uint8
    assert np.dtype(read_contract(src).visual.dtype) == np.float32
    x, a = _pixels(3), sample_audio("ave", 3)
    want = _run(src, {vis: x.astype(np.float32) / 255, aud: a})
    got = _run(dst, {vis: x, aud: a})
    assert np.abs(want - got).max() <= 1e-6
    # the pixels still matter after the new first nodes
    other = _run(dst, {vis: _pixels(3, seed=7), aud: a})
    assert np.abs(other - got).mean() > 1e-3


def test_uint8_visual_inserts_cast_and_div_at_the_top(models, tmp_path):
    m = onnx.load(str(with_uint8_visual(models["unet"], tmp_path / "u8.onnx")))
    first = [n.op_type for n in m.graph.node[:2]]
    assert first == ["Cast", "Div"]
    assert m.graph.node[0].input[0] == "input"
    assert not any("input" == i for n in m.graph.node[2:] for i in n.input)


def test_uint8_visual_refuses_a_model_already_uint8(models, tmp_path):
    u8 = with_uint8_visual(models["unet"], tmp_path / "u8.onnx")
    with pytest.raises(ModelError, match="already uint8"):
        with_uint8_visual(u8, tmp_path / "again.onnx")


def test_uint8_visual_needs_a_visual_input(models, tmp_path):
    with pytest.raises(ModelError):
        with_uint8_visual(models["encoder"], tmp_path / "x.onnx")
    with pytest.raises(ModelError, match="no input named"):
        with_uint8_visual(models["unet"], tmp_path / "x.onnx", visual_name="nope")
    with pytest.raises(ModelError, match="not found"):
        with_uint8_visual(tmp_path / "missing.onnx", tmp_path / "x.onnx")


# --------------------------------------------------------------------------- fp16


def _float_types(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}


def test_fp16_keeps_float32_io_and_is_close_to_fp32(models, tmp_path):
    dst = to_fp16(models["unet"], tmp_path / "fp16.onnx")
    m = onnx.load(str(dst))
    assert TensorProto.FLOAT16 in _float_types(m)
    io = {v.name: v.type.tensor_type.elem_type for v in (*m.graph.input, *m.graph.output)}
    assert io == {"input": TensorProto.FLOAT, "audio": TensorProto.FLOAT, "output": TensorProto.FLOAT}
    v, a = sample_visual(2), sample_audio("ave", 2)
    want = _run(models["unet"], {"input": v, "audio": a})
    got = _run(dst, {"input": v, "audio": a})
    assert got.dtype == np.float32
    assert psnr(want, got) >= 40.0
    assert not np.array_equal(want, got)  # it really computed in another precision
    # the audio still matters in fp16
    moved = _run(dst, {"input": v, "audio": sample_audio("ave", 2, seed=5)})
    assert np.abs(moved - got).mean() > 1e-3


def test_fp16_keeps_resize_scales_float32(models, tmp_path):
    m = onnx.load(str(to_fp16(models["unet"], tmp_path / "fp16.onnx")))
    inits = {t.name: t for t in m.graph.initializer}
    consts = {o: n for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    resizes = [n for n in m.graph.node if n.op_type == "Resize"]
    assert resizes
    for n in resizes:
        for slot in n.input[1:]:
            if slot in inits:
                assert inits[slot].data_type == TensorProto.FLOAT
            elif slot in consts:
                assert consts[slot].attribute[0].t.data_type == TensorProto.FLOAT


def test_fp16_without_keep_io_types_has_float16_io(models, tmp_path):
    dst = to_fp16(models["encoder"], tmp_path / "enc16.onnx", keep_io_types=False)
    m = onnx.load(str(dst))
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert m.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    mel = sample_mel(4)
    want = _run(models["encoder"], {"mel": mel})
    got = _run(dst, {"mel": mel.astype(np.float16)})
    assert got.dtype == np.float16 and got.shape == (4, 512)
    assert psnr(want, got.astype(np.float32), peak=float(np.ptp(want))) >= 40.0


def test_fp16_fp32_ops_option_keeps_those_ops_in_float32(models, tmp_path):
    all16 = onnx.load(str(to_fp16(models["unet"], tmp_path / "a.onnx")))
    keep = onnx.load(str(to_fp16(models["unet"], tmp_path / "b.onnx", fp32_ops={"Conv"})))
    conv_w = {n.input[1] for n in keep.graph.node if n.op_type == "Conv"}
    types_all = {t.name: t.data_type for t in all16.graph.initializer}
    types_keep = {t.name: t.data_type for t in keep.graph.initializer}
    assert all(types_all[w] == TensorProto.FLOAT16 for w in conv_w)
    assert all(types_keep[w] == TensorProto.FLOAT for w in conv_w)
    v, a = sample_visual(1), sample_audio("ave", 1)
    want = _run(models["unet"], {"input": v, "audio": a})
    assert psnr(want, _run(tmp_path / "b.onnx", {"input": v, "audio": a})) >= 40.0


def _handmade(path: Path, weight: float) -> Path:
    """x -> Mul(w) -> Add(Constant) -> Cast(to float) -> y, with a graph output used downstream."""
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["m"]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Add", ["m", "c"], ["y"]),
        helper.make_node("Cast", ["y"], ["z"], to=TensorProto.FLOAT),
        helper.make_node("Relu", ["z"], ["r"]),
    ]
    g = helper.make_graph(
        nodes, "h",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.full(4, weight, np.float32), "w")],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_fp16_handles_constants_casts_and_outputs_used_downstream(tmp_path):
    src = _handmade(tmp_path / "h.onnx", 2.0)
    dst = to_fp16(src, tmp_path / "h16.onnx")
    m = onnx.load(str(dst))
    const = next(n for n in m.graph.node if n.op_type == "Constant")
    assert const.attribute[0].t.data_type == TensorProto.FLOAT16
    x = np.array([[1.0, -2.0, 3.0, 0.25]], np.float32)
    s = _session(dst)
    y, r = s.run(None, {"x": x})
    assert y.dtype == np.float32 and r.dtype == np.float32
    np.testing.assert_allclose(y, x * 2 + 0.5, rtol=1e-3)
    np.testing.assert_allclose(r, np.maximum(x * 2 + 0.5, 0), rtol=1e-3)


def test_fp16_clips_weights_beyond_the_float16_range(tmp_path, caplog):
    src = _handmade(tmp_path / "big.onnx", 1e6)
    with caplog.at_level("WARNING"):
        dst = to_fp16(src, tmp_path / "big16.onnx")
    assert "clipped" in caplog.text
    w = next(t for t in onnx.load(str(dst)).graph.initializer if t.name == "w")
    assert float(numpy_helper.to_array(w).max()) == FP16_MAX
    y = _session(dst).run(None, {"x": np.ones((1, 4), np.float32)})[0]
    assert np.isfinite(y).all()


def test_fp16_refuses_control_flow_and_bad_files(tmp_path):
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "t", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])])
    g = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then)], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "if.onnx"))
    with pytest.raises(ModelError, match="control flow"):
        to_fp16(tmp_path / "if.onnx", tmp_path / "o.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        to_fp16(tmp_path / "junk.onnx", tmp_path / "o.onnx")


def test_uint8_then_fp16_compose(models, tmp_path):
    u8 = with_uint8_visual(models["unet"], tmp_path / "u8.onnx")
    both = to_fp16(u8, tmp_path / "u8fp16.onnx")
    assert read_contract(both).visual_uint8
    x, a = _pixels(2), sample_audio("ave", 2)
    want = _run(models["unet"], {"input": x.astype(np.float32) / 255, "audio": a})
    assert psnr(want, _run(both, {"input": x, "audio": a})) >= 40.0


# --------------------------------------------------------------------------- avatar convert


def test_convert_command_writes_each_variant(models, tmp_path):
    runner = CliRunner()
    x, a = _pixels(1), sample_audio("ave", 1)
    want = _run(models["unet"], {"input": x.astype(np.float32) / 255, "audio": a})
    for flags, uint8, half in ((["--uint8-visual"], True, False), (["--fp16"], False, True), (["--uint8-visual", "--fp16"], True, True)):
        out = tmp_path / f"{'-'.join(flags)}.onnx"
        res = runner.invoke(cli, ["convert", str(models["unet"]), "-o", str(out), *flags])
        assert res.exit_code == 0, res.output
        assert str(out) in res.output
        c = read_contract(out)
        assert c.visual_uint8 is uint8
        m = onnx.load(str(out))
        assert (TensorProto.FLOAT16 in _float_types(m)) is half
        got = _run(out, {"input": x if uint8 else x.astype(np.float32) / 255, "audio": a})
        if half:
            assert psnr(want, got) >= 40.0
        else:
            assert np.abs(want - got).max() <= 1e-6


def test_convert_command_errors_are_one_line(models, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["convert", str(models["unet"]), "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 2 and "nothing to do" in res.output
    res = runner.invoke(cli, ["convert", str(models["unet"]), "-o", str(models["unet"]), "--fp16"])
    assert res.exit_code == 2 and "different file" in res.output
    res = runner.invoke(cli, ["convert", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "o.onnx"), "--fp16"])
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0 and "not found" in res.output
