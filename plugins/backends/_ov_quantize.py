"""int8 post-training quantization of a UNet-328 with NNCF, calibrated on the avatar's own frames.

Each model is trained for one avatar, so the avatar package is the natural
calibration set: its faces (each frame its own reference, as at render time)
with the recording's own audio windows (``aud_ave.npy``, i.e. real speech
through the AVE encoder). The held-out frames the gate measures on are never
used for calibration.

NNCF's defaults (every layer int8) give 33.9 dB against the fp32 output and
lose 0.49 dB against the real frames on the trained sanders model: the gate
fails. Taking the int8 out of one block at a time showed that the last,
full-resolution block holds about three quarters of that noise and the first
block most of the rest; keeping every operation whose output has the input's
full 320x320 resolution in float (``full_res``, the default) gives 41.9 dB and
0.04 dB lost: the gate passes. (First/last convolution and the audio branch
alone: 35.1 dB; ``mixed`` preset or depthwise convolutions in float: < 1 dB
more; see ``docs/backends.md``.)

The output is an OpenVINO IR (``.xml`` + ``.bin``) that records the fp32
model it was made from; :func:`avatar.read_contract` reads its contract like
an ONNX model's, and the ``openvino`` backend runs it in int8.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from avatar.errors import ConfigError, MissingDependency

from ._common import file_sha256
from ._gates import FrameData

log = logging.getLogger(__name__)

#: metadata keys written into the quantized model
META_SOURCE = "avatar.quantized_from"
META_SOURCE_SHA = "avatar.quantized_from_sha256"
META_RECIPE = "avatar.quantization"


@dataclass
class Recipe:
    """How to quantize; the defaults are what passes the gate on the trained sanders model."""

    #: keep these in float: ``first_conv``, ``last_conv``, ``audio`` (the audio branch)
    keep_float: Sequence[str] = ("full_res",)
    subset_size: int = 300
    fast_bias_correction: bool = True
    #: ``performance`` (symmetric activations) or ``mixed`` (asymmetric activations)
    preset: str = "performance"
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "tool": "nncf", "keep_float": list(self.keep_float), "subset_size": self.subset_size,
            "fast_bias_correction": self.fast_bias_correction, "preset": self.preset, **self.extra,
        }  # fmt: skip


def _nncf():  # type: ignore[no-untyped-def]
    try:
        import nncf
    except ImportError:
        raise MissingDependency("nncf", "openvino", feature="avatar quantize") from None
    return nncf


_CONVS = ("Convolution", "GroupConvolution")


def sensitive_nodes(model: Any, visual: str, audio: str) -> dict[str, list[str]]:
    """Names of the layer groups a recipe may keep in float, in an OpenVINO model.

    Found from the graph, not from names: ``audio`` is every operation whose
    inputs all descend from the audio input alone; ``first_conv`` the first
    convolution fed by the visual input; ``last_conv`` the last convolution;
    ``full_res`` every operation whose output has the visual input's full
    height and width (convolutions, activations, the upsampling and the skip
    concatenation into the last block) — the layers that draw the output pixels
    directly, and on the trained sanders model three quarters of the noise
    int8 adds.
    """
    origin: dict[str, set[str]] = {}
    audio_ops: list[str] = []
    convs: list[tuple[str, set[str], list[Any]]] = []
    shaped: list[tuple[str, list[Any]]] = []
    for p in model.inputs:
        origin[p.get_node().get_friendly_name()] = {"v"} if p.get_any_name() == visual else {"a"} if p.get_any_name() == audio else set()
    for op in model.get_ordered_ops():  # topological order
        name, kind = op.get_friendly_name(), op.get_type_name()
        if kind == "Parameter":
            continue
        src: set[str] = set()
        for i in range(op.get_input_size()):
            src |= origin.get(op.input_value(i).get_node().get_friendly_name(), set())
        origin[name] = src
        if src == {"a"} and kind != "Constant":
            audio_ops.append(name)
        if kind in _CONVS:
            convs.append((name, src, list(op.get_output_partial_shape(0))))
        if kind != "Constant" and op.get_output_size() == 1:
            shaped.append((name, list(op.get_output_partial_shape(0))))
    full = [d for d in next(p for p in model.inputs if p.get_any_name() == visual).get_partial_shape()][2:]

    def same(dims: list[Any]) -> bool:
        return len(dims) == len(full) + 2 and all(a.is_static and b.is_static and a.get_length() == b.get_length()
                                                  for a, b in zip(dims[2:], full))  # fmt: skip

    return {
        "first_conv": [n for n, s, _ in convs if s == {"v"}][:1],
        "last_conv": [convs[-1][0]] if convs else [],
        "audio": audio_ops,
        "full_res": [n for n, d in shaped if same(d)],
    }


def quantize(source: Path, out: Path, calibration: FrameData, names: tuple[str, str], recipe: Recipe) -> dict[str, Any]:
    """Quantize ``source`` (ONNX or OpenVINO IR) to ``out`` (OpenVINO IR ``.xml`` + ``.bin``); return what was done.

    NNCF's OpenVINO path: on the trained sanders model it gives 2-3 dB more
    than quantizing the ONNX graph with Q/DQ pairs and running that.
    """
    import openvino as ov

    nncf = _nncf()
    model = ov.Core().read_model(str(source))
    keep = sensitive_nodes(model, *names)
    unknown = sorted(set(recipe.keep_float) - set(keep))
    if unknown:
        raise ConfigError(f"unknown keep-float group(s) {', '.join(unknown)}; choose from {', '.join(keep)}")
    ignored = sorted({n for g in recipe.keep_float for n in keep[g]})
    n = len(calibration.indices)

    def item(i: int) -> dict[str, np.ndarray]:
        return {names[0]: calibration.visual(slice(i, i + 1)), names[1]: calibration.audio[i : i + 1]}

    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    if recipe.preset not in presets:
        raise ConfigError(f"preset must be one of {', '.join(presets)}, not {recipe.preset!r}")
    t0 = time.perf_counter()
    qmodel = nncf.quantize(
        model,
        nncf.Dataset(range(n), item),
        preset=presets[recipe.preset],
        subset_size=min(recipe.subset_size, n),
        fast_bias_correction=recipe.fast_bias_correction,
        ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
    )
    seconds = time.perf_counter() - t0
    qmodel.set_rt_info(str(Path(source).resolve()), ["avatar", META_SOURCE])
    qmodel.set_rt_info(file_sha256(source), ["avatar", META_SOURCE_SHA])
    qmodel.set_rt_info(json.dumps(recipe.describe()), ["avatar", META_RECIPE])
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(qmodel, str(out), compress_to_fp16=False)  # fp16 weights would add their own error to the float layers
    return {"seconds": round(seconds, 1), "calibration_frames": min(recipe.subset_size, n), "kept_float_nodes": len(ignored),
            "recipe": recipe.describe()}  # fmt: skip


def quantized_from(model: Path) -> Path | None:
    """The fp32 model a quantized one was made from (recorded in it), if that file is still there."""
    if Path(model).suffix != ".xml":
        return None
    import openvino as ov

    try:
        m = ov.Core().read_model(str(model))
        key = ["avatar", META_SOURCE]
        src = m.get_rt_info(key).astype(str) if m.has_rt_info(key) else None
    except RuntimeError:
        return None
    return Path(src) if src and Path(src).is_file() else None
