"""A model that returns the wrong number of rows, a wrong shape or NaN/Inf fails the render clearly.

The broken models are real ONNX graphs made with the project's builder
(``avatar.models.onnx_builder``) and run by real ONNX Runtime sessions.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from avatar import ModelError

ROOT = Path(__file__).resolve().parents[1]


def _slice(g, x: str, starts: list[int], ends: list[int], axes: list[int]) -> str:  # type: ignore[no-untyped-def]
    const = [g.const(np.array(v, np.int64), h) for v, h in ((starts, "starts"), (ends, "ends"), (axes, "axes"))]
    return g.node("Slice", [x, *const])


def broken_unet(path: Path, kind: str) -> Path:
    """A UNet-328 by its declared contract (``[B,6,320,320]`` + AVE audio → ``[B,3,320,320]``) that misbehaves.

    * ``one_row``: returns one row whatever the batch;
    * ``small``: returns ``[B,3,160,160]``;
    * ``nan``: returns NaN everywhere; ``inf``: +Inf everywhere.
    """
    import onnx
    from onnx import TensorProto

    from avatar.models.onnx_builder import GraphBuilder, make_model

    g = GraphBuilder({})
    face = _slice(g, "input", [0], [3], [1])  # the first three visual channels, [B,3,320,320]
    if kind == "one_row":
        y = _slice(g, face, [0], [1], [0])
    elif kind == "small":
        y = _slice(g, face, [0, 0], [160, 160], [2, 3])
    elif kind in ("nan", "inf"):
        zero = g.node("Mul", [face, g.const(np.array(0, np.float32), "zero")])
        num = zero if kind == "nan" else g.node("Add", [zero, g.const(np.array(1, np.float32), "one")])
        y = g.node("Div", [num, zero])  # 0/0 = NaN, 1/0 = +Inf
    else:
        raise ValueError(kind)
    model = make_model(
        g,
        [("input", TensorProto.FLOAT, ["B", 6, 320, 320]), ("audio", TensorProto.FLOAT, ["B", 32, 16, 16])],
        [("output", y, ["B", 3, 320, 320])],
        opset=17,
    )
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def setup(small_render_kit: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("broken")
    return {**small_render_kit, **{kind: broken_unet(d / f"{kind}.onnx", kind) for kind in ("one_row", "small", "nan", "inf")}}


@pytest.mark.parametrize(
    "kind, message",
    [
        ("one_row", r"model one_row\.onnx returned output 'output' of shape \[1, 3, 320, 320\] for a batch of \d"),
        ("small", r"model small\.onnx returned output 'output' of shape \[\d, 3, 160, 160\]"),
        ("nan", r"model nan\.onnx returned \d+ NaN or infinite value"),
        ("inf", r"model inf\.onnx returned \d+ NaN or infinite value"),
    ],
)
def test_a_broken_model_output_is_an_error_naming_the_model(setup: dict[str, Path], kind: str, message: str) -> None:
    from avatar.render import render
    from avatar_plugins.sinks.callback import CallbackSink

    frames: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a NumPy RuntimeWarning (NaN cast to uint8) would fail here
        with pytest.raises(ModelError, match=message):
            render(setup["avatar"], setup["wav"], sinks=[CallbackSink(frames.append)], model=setup[kind],
                   feature_options={"encoder": str(setup["encoder"])}, backend="cpu", batch_size=8)  # fmt: skip
    assert frames == []  # nothing made from the bad batch


def test_cli_short_output_fails_with_one_line(setup: dict[str, Path], tmp_path: Path) -> None:
    """The probe's case: `avatar run` exited 0 having rendered a fraction of the frames."""
    r = subprocess.run(
        [sys.executable, "-m", "avatar", "run", "--avatar", str(setup["avatar"]), "--audio", str(setup["wav"]),
         "--model", str(setup["one_row"]), "--ave-encoder", str(setup["encoder"]), "--backend", "cpu",
         "-o", str(tmp_path / "out.mp4")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model one_row.onnx returned output"), r.stderr


def test_check_output_unit() -> None:
    from avatar.contract import check_output, contract_from_io
    from avatar.interfaces import TensorInfo

    c = contract_from_io(
        [TensorInfo("input", ("B", 6, 320, 320), np.float32), TensorInfo("audio", ("B", 32, 16, 16), np.float32)],
        [TensorInfo("output", ("B", 3, 320, 320), np.float32)],
        path="m.onnx",
    )
    good = np.zeros((2, 3, 320, 320), np.float32)
    assert check_output(c, {"output": good}, 2) is good
    assert check_output(c, {"output": good.astype(np.uint8)}, 2).dtype == np.uint8  # a denormalising graph
    with pytest.raises(ModelError, match="returned no output 'output' \\(got other\\)"):
        check_output(c, {"other": good}, 2)
    with pytest.raises(ModelError, match=r"shape \[2, 3, 320, 320\] for a batch of 3"):
        check_output(c, {"output": good}, 3)
    bad = good.copy()
    bad[1, 2, 5, 7] = np.nan
    bad[0, 0, 0, 0] = -np.inf
    with pytest.raises(ModelError, match="returned 2 NaN or infinite"):
        check_output(c, {"output": bad}, 2)
