"""int8 post-training quantization of a UNet-328 with NNCF, calibrated on the avatar's own frames.

Each model is trained for one avatar, so the avatar package is the natural
calibration set: its faces (each frame its own reference, as at render time)
with the recording's own audio windows (``aud_ave.npy``, i.e. real speech
through the AVE encoder). The held-out frames the gate measures on are never
used for calibration.

NNCF's defaults (every convolution int8) cost 0.3-0.5 dB against the real
frames on the trained sanders model, which fails the gate. What the recipe
keeps in float (found on that model, see ``benchmarks/results``):

* the first convolution (it sees raw pixels; the masked half is half zeros),
* the last convolution (its output becomes the face through a sigmoid),
* the whole audio branch (small, cheap, and where the lip motion comes from).

The output is an ONNX model with QuantizeLinear/DequantizeLinear pairs:
OpenVINO runs it in int8, ONNX Runtime can load it too, and
:func:`avatar.read_contract` reads it like the original.
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
    keep_float: Sequence[str] = ("first_conv", "last_conv", "audio")
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


def sensitive_nodes(model: Any, visual: str, audio: str) -> dict[str, list[str]]:
    """ONNX node names of the layer groups a recipe may keep in float.

    Found from the graph, not from names: ``audio`` is every node whose inputs
    all descend from the audio input alone; ``first_conv`` the first Conv fed by
    the visual input; ``last_conv`` the last Conv in graph order; ``full_res``
    every Conv whose output has the visual input's full height and width (the
    layers that draw the output pixels directly, and most of the noise an int8
    model adds to them).
    """
    import onnx

    consts = {t.name for t in model.graph.initializer}
    origin: dict[str, set[str]] = {visual: {"v"}, audio: {"a"}}
    audio_nodes: list[str] = []
    convs: list[tuple[str, set[str], str]] = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        src: set[str] = set()
        for i in node.input:
            if i and i not in consts:
                src |= origin.get(i, set())
        for o in node.output:
            origin[o] = src
        if src == {"a"}:
            audio_nodes.append(node.name)
        if node.op_type == "Conv":
            convs.append((node.name, src, node.output[0]))
    # spatial sizes from ONNX shape inference (the batch axis stays symbolic; H and W are static)
    shapes: dict[str, list[int]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for v in list(inferred.graph.value_info) + list(inferred.graph.input):
            shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    except Exception as exc:  # noqa: BLE001  (shape inference is best effort: full_res is then empty)
        log.info("shape inference failed (%s); no full-resolution layers found", exc)
    full = shapes.get(visual, [])[2:]
    return {
        "first_conv": [n for n, s, _ in convs if s == {"v"}][:1],
        "last_conv": [convs[-1][0]] if convs else [],
        "audio": audio_nodes,
        "full_res": [n for n, _, o in convs if full and shapes.get(o, [])[2:] == full],
    }


def quantize(source: Path, out: Path, calibration: FrameData, names: tuple[str, str], recipe: Recipe) -> dict[str, Any]:
    """Quantize ``source`` (ONNX) to ``out`` (ONNX with Q/DQ pairs); return what was done."""
    import onnx

    nncf = _nncf()
    model = onnx.load(str(source))
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
    meta = {META_SOURCE: str(Path(source).resolve()), META_SOURCE_SHA: file_sha256(source),
            META_RECIPE: json.dumps(recipe.describe())}  # fmt: skip
    kept = {p.key for p in qmodel.metadata_props}
    for k, v in meta.items():
        if k in kept:
            next(p for p in qmodel.metadata_props if p.key == k).value = v
        else:
            qmodel.metadata_props.add(key=k, value=v)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(qmodel, str(out))
    return {"seconds": round(seconds, 1), "calibration_frames": min(recipe.subset_size, n), "kept_float_nodes": len(ignored),
            "recipe": recipe.describe()}  # fmt: skip


def quantized_from(model: Path) -> Path | None:
    """The fp32 model a quantized one was made from (its metadata), if that file is still there."""
    import onnx

    try:
        m = onnx.load(str(model), load_external_data=False)
    except Exception:
        return None
    src = next((p.value for p in m.metadata_props if p.key == META_SOURCE), None)
    return Path(src) if src and Path(src).is_file() else None
