"""The UNet-328 model contract, read from an ONNX file without running it.

A model has a visual input ``[B, 6, 320, 320]`` (float32 in [0, 1], or uint8 in
[0, 255] for models exported with the on-device normalisation option), an audio
input whose per-frame shape names the feature type, and one output
``[B, 3, 320, 320]``. Names vary between exports (``input``/``audio``,
``visual_input``/``audio_input``, others): inputs are identified by shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import ModelError
from .interfaces import TensorInfo

#: audio window shape (without batch) -> feature type
AUDIO_SHAPES: dict[tuple[int, ...], str] = {
    (32, 16, 16): "ave",
    (32, 32, 32): "hubert",
    (256, 16, 32): "wenet",
}
FEATURE_SHAPES = {v: k for k, v in AUDIO_SHAPES.items()}
VISUAL_SHAPE = (6, 320, 320)
OUTPUT_SHAPE = (3, 320, 320)


@dataclass(frozen=True)
class ModelContract:
    """What an ONNX UNet-328 expects and returns."""

    path: Path
    visual: TensorInfo
    audio: TensorInfo
    output: TensorInfo
    feature_type: str
    dynamic_batch: bool
    fixed_batch: int | None
    opset: int | None

    @property
    def audio_window_shape(self) -> tuple[int, ...]:
        return FEATURE_SHAPES[self.feature_type]

    @property
    def visual_uint8(self) -> bool:
        return np.dtype(self.visual.dtype) == np.uint8

    def describe(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "feature_type": self.feature_type,
            "audio_window_shape": list(self.audio_window_shape),
            "visual": _info_dict(self.visual),
            "audio": _info_dict(self.audio),
            "output": _info_dict(self.output),
            "dynamic_batch": self.dynamic_batch,
            "fixed_batch": self.fixed_batch,
            "opset": self.opset,
        }


def _info_dict(t: TensorInfo) -> dict[str, object]:
    return {"name": t.name, "shape": [d if isinstance(d, int) else None for d in t.shape], "dtype": np.dtype(t.dtype).name}


def read_io(path: str | Path) -> tuple[list[TensorInfo], list[TensorInfo], int | None]:
    """Inputs, outputs and default-domain opset of an ONNX model (weights not loaded).

    An OpenVINO IR (``.xml``, e.g. from ``avatar quantize``) is read with OpenVINO; its opset is None.
    """
    import onnx
    from onnx import helper

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if path.suffix == ".xml":
        return _read_ir_io(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelError(f"{path} is not a readable ONNX model ({exc.__class__.__name__}: {exc})") from exc
    initializers = {i.name for i in model.graph.initializer}

    def infos(values: object) -> list[TensorInfo]:
        out = []
        for v in values:  # type: ignore[attr-defined]
            if v.name in initializers:
                continue
            tt = v.type.tensor_type
            dims: list[int | str | None] = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                else:
                    dims.append(d.dim_param or None)
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype("float32")
            out.append(TensorInfo(v.name, tuple(dims), dtype))
        return out

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return infos(model.graph.input), infos(model.graph.output), opset


def _read_ir_io(path: Path) -> tuple[list[TensorInfo], list[TensorInfo], None]:
    try:
        import openvino
    except ImportError:
        from .errors import MissingDependency

        raise MissingDependency("openvino", "openvino", feature=f"the OpenVINO model {path.name}") from None
    try:
        model = openvino.Core().read_model(str(path))
    except RuntimeError as exc:
        raise ModelError(f"{path} is not a readable OpenVINO model: {exc}") from exc

    def infos(ports: object) -> list[TensorInfo]:
        return [
            TensorInfo(p.get_any_name(), tuple(d.get_length() if d.is_static else None for d in p.get_partial_shape()),
                       np.dtype(p.get_element_type().to_dtype()))
            for p in ports  # type: ignore[attr-defined]
        ]  # fmt: skip

    return infos(model.inputs), infos(model.outputs), None


def _tail(t: TensorInfo) -> tuple[int | str | None, ...]:
    return tuple(t.shape[1:])


def contract_from_io(
    inputs: list[TensorInfo], outputs: list[TensorInfo], *, path: str | Path = "<model>", opset: int | None = None
) -> ModelContract:
    """Identify visual/audio/output tensors by shape; raise :class:`ModelError` otherwise."""
    expected = (
        "a UNet-328 takes a visual input [B,6,320,320] and an audio input [B,32,16,16] (AVE), "
        "[B,32,32,32] (HuBERT) or [B,256,16,32] (WeNet), and returns [B,3,320,320]"
    )
    if len(inputs) != 2 or len(outputs) != 1:
        raise ModelError(
            f"{path}: has {len(inputs)} input(s) ({', '.join(map(str, inputs))}) and {len(outputs)} output(s); {expected}"
        )
    visual = [t for t in inputs if _tail(t) == VISUAL_SHAPE]
    audio = [t for t in inputs if t not in visual]
    if len(visual) != 1:
        raise ModelError(f"{path}: no visual input of shape [B,6,320,320] among {', '.join(map(str, inputs))}; {expected}")
    a = audio[0]
    feature = AUDIO_SHAPES.get(tuple(d for d in _tail(a)))  # type: ignore[arg-type]
    if feature is None:
        raise ModelError(
            f"{path}: audio input {a} has per-frame shape {list(_tail(a))}, expected (32,16,16) for AVE, "
            f"(32,32,32) for HuBERT or (256,16,32) for WeNet"
        )
    out = outputs[0]
    if _tail(out) != OUTPUT_SHAPE:
        raise ModelError(f"{path}: output {out} is not [B,3,320,320]; {expected}")
    v = visual[0]
    if np.dtype(v.dtype) not in (np.float32, np.uint8) or np.dtype(a.dtype) != np.float32:
        raise ModelError(f"{path}: expected float32 (or uint8 visual) inputs, got {v} and {a}")
    batch_dims = {t.shape[0] for t in (v, a, out)}
    dynamic = any(not isinstance(d, int) for d in batch_dims)
    fixed = None if dynamic else int(next(iter(batch_dims)))  # type: ignore[arg-type]
    return ModelContract(Path(path), v, a, out, feature, dynamic, fixed, opset)


def read_contract(path: str | Path) -> ModelContract:
    """Read and check the contract of an ONNX UNet-328 file."""
    inputs, outputs, opset = read_io(path)
    return contract_from_io(inputs, outputs, path=path, opset=opset)


def check_feature_match(contract: ModelContract, source_name: str, window_shape: tuple[int, ...]) -> None:
    """Raise a clear error when a model's audio window differs from the feature source's."""
    if tuple(window_shape) != contract.audio_window_shape:
        raise ModelError(
            f"the model expects audio windows of shape {contract.audio_window_shape} ({contract.feature_type}) "
            f"but the feature source '{source_name}' makes {tuple(window_shape)}; choose the matching "
            f"--features or a model exported for '{source_name}'"
        )


def check_output(contract: ModelContract, result: Mapping[str, np.ndarray], batch: int) -> np.ndarray:
    """The model's output for a batch of ``batch`` rows, checked; raise :class:`ModelError` otherwise.

    A model can declare ``[B,3,320,320]`` and return something else (fewer rows,
    another size) or NaN/Inf values; rendering on would drop frames or make
    garbage with exit 0. The value check costs one min and one max over the
    batch (no temporary array); the count of bad values is made only on failure.
    """
    name = contract.output.name
    model = contract.path.name
    out = result.get(name) if isinstance(result, Mapping) else None
    if not isinstance(out, np.ndarray):
        got = ", ".join(sorted(map(str, result))) if isinstance(result, Mapping) else type(result).__name__
        raise ModelError(f"model {model} returned no output '{name}' (got {got or 'nothing'}); check the model file")
    want = (batch, *OUTPUT_SHAPE)
    if tuple(out.shape) != want:
        raise ModelError(
            f"model {model} returned output '{name}' of shape {list(out.shape)} for a batch of {batch}; "
            f"it declares {_info_dict(contract.output)['shape']} and must return {list(want)} — "
            "the model is broken or was exported wrongly (a fixed batch inside the graph?)"
        )
    if out.dtype.kind == "f" and out.size and not (np.isfinite(out.min()) and np.isfinite(out.max())):
        bad = int(out.size - np.count_nonzero(np.isfinite(out)))
        raise ModelError(
            f"model {model} returned {bad} NaN or infinite value(s) in a batch of {batch} frames; "
            "the weights are broken or the export is wrong (try fp32 if this is an fp16 model)"
        )
    return out


def check_output_rows(contract: ModelContract, result: Mapping[str, np.ndarray], batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's output for ``batch`` rows and a mask of the rows that are finite.

    Like :func:`check_output`, a missing output or a wrong shape raises
    :class:`ModelError` (the whole call is wrong); NaN/Inf values only mark
    their rows, so a shared batch can end just the sessions whose rows are bad.
    The check costs one min and one max per row.
    """
    name = contract.output.name
    out = result.get(name) if isinstance(result, Mapping) else None
    if not isinstance(out, np.ndarray) or tuple(out.shape) != (batch, *OUTPUT_SHAPE):
        return check_output(contract, result, batch), np.ones(batch, bool)  # raises the structural error
    if out.dtype.kind != "f" or not out.size:
        return out, np.ones(batch, bool)
    flat = out.reshape(batch, -1)
    return out, np.isfinite(flat.min(axis=1)) & np.isfinite(flat.max(axis=1))
