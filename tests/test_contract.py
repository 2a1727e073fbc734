"""The model contract and `avatar inspect`, on real ONNX files."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from avatar import ModelError, read_contract
from avatar.cli import cli
from avatar.contract import check_feature_match


def _model(path: Path, audio_shape: tuple[int, ...], names=("input", "audio", "output"), batch="batch", visual_dtype=TensorProto.FLOAT) -> Path:
    """A small valid graph with the given I/O signature (the output ignores the inputs' values)."""
    v, a, o = names
    b = batch
    inputs = [
        helper.make_tensor_value_info(v, visual_dtype, [b, 6, 320, 320]),
        helper.make_tensor_value_info(a, TensorProto.FLOAT, [b, *audio_shape]),
    ]
    out = helper.make_tensor_value_info(o, TensorProto.FLOAT, [b, 3, 320, 320])
    cast = helper.make_node("Cast", [v], ["vf"], to=TensorProto.FLOAT)
    sl = helper.make_node("Slice", ["vf", "starts", "ends", "axes"], [o])
    inits = [
        helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("ends", TensorProto.INT64, [1], [3]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    g = helper.make_graph([cast, sl], "t", inputs, [out], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize(
    "shape,feature", [((32, 16, 16), "ave"), ((32, 32, 32), "hubert"), ((256, 16, 32), "wenet")]
)
@pytest.mark.parametrize("names", [("input", "audio", "output"), ("visual_input", "audio_input", "output"), ("faces", "feats", "y")])
def test_feature_type_and_names_by_shape(tmp_path: Path, shape, feature, names) -> None:
    c = read_contract(_model(tmp_path / "m.onnx", shape, names))
    assert c.feature_type == feature
    assert (c.visual.name, c.audio.name, c.output.name) == names
    assert c.dynamic_batch and c.fixed_batch is None and c.opset == 17
    assert c.audio_window_shape == shape


def test_input_order_does_not_matter(tmp_path: Path) -> None:
    p = _model(tmp_path / "m.onnx", (32, 16, 16))
    m = onnx.load(str(p))
    inputs = list(m.graph.input)
    del m.graph.input[:]
    m.graph.input.extend(reversed(inputs))
    onnx.save(m, str(p))
    c = read_contract(p)
    assert (c.visual.name, c.audio.name) == ("input", "audio")


def test_fixed_batch_and_uint8_visual(tmp_path: Path) -> None:
    c = read_contract(_model(tmp_path / "m.onnx", (32, 16, 16), batch=4, visual_dtype=TensorProto.UINT8))
    assert not c.dynamic_batch and c.fixed_batch == 4 and c.visual_uint8


def test_wrong_audio_window_is_rejected_with_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"\[16, 16, 16\].*\(32,16,16\) for AVE.*\(32,32,32\) for HuBERT.*\(256,16,32\) for WeNet"):
        read_contract(_model(tmp_path / "m.onnx", (16, 16, 16)))


def test_not_an_onnx_file_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        read_contract(bad)
    with pytest.raises(ModelError, match="not found"):
        read_contract(tmp_path / "missing.onnx")


def test_wrong_visual_or_output_shape(tmp_path: Path) -> None:
    p = _model(tmp_path / "m.onnx", (32, 16, 16))
    m = onnx.load(str(p))
    m.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 256
    onnx.save(m, str(p))
    with pytest.raises(ModelError, match=r"not \[B,3,320,320\]"):
        read_contract(p)


def test_feature_mismatch_names_both_shapes(tmp_path: Path) -> None:
    c = read_contract(_model(tmp_path / "m.onnx", (32, 32, 32)))
    with pytest.raises(ModelError, match=r"\(32, 32, 32\).*'ave' makes \(32, 16, 16\)"):
        check_feature_match(c, "ave", (32, 16, 16))
    check_feature_match(c, "hubert", (32, 32, 32))


def test_synthetic_models_satisfy_the_contract(tmp_path: Path) -> None:
    from avatar.models.synthetic import make_unet

    c = read_contract(make_unet(tmp_path / "u.onnx", mode="wenet", tiny=True, names=("visual_input", "audio_input", "output")))
    assert c.feature_type == "wenet" and c.visual.name == "visual_input"


def test_cli_inspect_text_json_and_rejection(tmp_path: Path) -> None:
    p = _model(tmp_path / "m.onnx", (32, 32, 32), ("visual_input", "audio_input", "output"))
    r = CliRunner().invoke(cli, ["inspect", str(p)])
    assert r.exit_code == 0 and "hubert" in r.output and "visual_input" in r.output and "audio_input" in r.output
    d = json.loads(CliRunner().invoke(cli, ["inspect", str(p), "--json"]).output)
    assert d["feature_type"] == "hubert" and d["audio"]["shape"] == [None, 32, 32, 32]
    r = CliRunner().invoke(cli, ["inspect", str(_model(tmp_path / "w.onnx", (32, 16, 8)))])
    assert r.exit_code == 1 and "expected (32,16,16) for AVE" in r.output and r.output.count("\n") == 1
