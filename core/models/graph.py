"""ONNX graph transforms for faster inference: uint8 visual input and fp16 weights.

``with_uint8_visual`` moves the visual normalisation (``x / 255``) into the graph,
so the host sends the cached uint8 crops to the device (4x fewer bytes than
float32) and the division runs there. ``to_fp16`` makes a half-precision copy of
a model that keeps float32 inputs and outputs, so callers feed and read exactly
what they did before.

Both are written with :mod:`onnx` alone (no converter package): the fp16 pass
assigns each float tensor a precision, converts initializers and constants,
and inserts a ``Cast`` wherever a producer and a consumer disagree, keeping the
few input slots the ONNX spec requires to be float32 (``Resize`` scales, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import ModelError

log = logging.getLogger(__name__)

#: largest finite float16; weights beyond it are clipped (and logged)
FP16_MAX = 65504.0

#: (op type, input index) slots that must stay float32 whatever the node runs in
FP32_INPUT_SLOTS: frozenset[tuple[str, int]] = frozenset(
    {
        ("Resize", 1),  # roi
        ("Resize", 2),  # scales (tensor(float) only)
        ("Upsample", 1),  # scales
    }
)

#: op types kept entirely in float32 by default (inputs cast up, outputs float32)
DEFAULT_FP32_OPS: frozenset[str] = frozenset(
    {
        # numerically sensitive reductions of large sums
        "ReduceSumSquare",
        "ReduceLogSumExp",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Range",
        "CumSum",
        "NonMaxSuppression",
        "TopK",
        "RoiAlign",
    }
)

_CONTROL_FLOW = {"If", "Loop", "Scan"}


def _load(src: str | Path) -> Any:
    import onnx

    src = Path(src)
    if not src.is_file():
        raise ModelError(f"model file not found: {src}")
    try:
        return onnx.load(str(src))
    except Exception as exc:
        raise ModelError(f"{src} is not a readable ONNX model ({exc.__class__.__name__}: {exc})") from exc


def _save(model: Any, dst: str | Path) -> Path:
    import onnx

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ModelError(f"the transformed model is invalid ({exc}); please report this with the source model") from exc
    if model.ByteSize() > 1_900_000_000:  # protobuf's 2 GB limit: keep weights beside the graph
        onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    else:
        onnx.save(model, str(dst))
    return dst


def _unique(existing: set[str], base: str) -> str:
    name, i = base, 0
    while name in existing:
        i += 1
        name = f"{base}_{i}"
    existing.add(name)
    return name


def _all_names(graph: Any) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
        names.add(n.name)
    return names


# --------------------------------------------------------------------------- uint8 visual


def with_uint8_visual(src: str | Path, dst: str | Path, *, visual_name: str | None = None) -> Path:
    """Write a copy of ``src`` whose visual input is uint8 in [0, 255].

    The new graph starts with ``Cast(uint8 -> float32)`` and ``Div(255)`` in
    front of every former use of the visual input; ``Div`` rather than a
    multiplication by 1/255, so the result is bit-identical to normalising on
    the host with ``x.astype(np.float32) / 255``. The visual input is found with
    :mod:`avatar.contract` (shape ``[B, 6, 320, 320]``) unless ``visual_name``
    names it, so other image models can use this too.
    """
    from onnx import TensorProto, helper, numpy_helper

    from ..contract import read_contract

    model = _load(src)
    graph = model.graph
    if visual_name is None:
        visual_name = read_contract(src).visual.name
    inp = next((i for i in graph.input if i.name == visual_name), None)
    if inp is None:
        raise ModelError(f"{src} has no input named {visual_name!r}")
    elem = inp.type.tensor_type.elem_type
    if elem == TensorProto.UINT8:
        raise ModelError(f"{src}: input {visual_name!r} is already uint8; nothing to convert")
    if elem != TensorProto.FLOAT:
        raise ModelError(f"{src}: input {visual_name!r} is {TensorProto.DataType.Name(elem)}, expected FLOAT")
    names = _all_names(graph)
    as_float = _unique(names, f"{visual_name}__float")
    scaled = _unique(names, f"{visual_name}__normalised")
    const = _unique(names, f"{visual_name}__255")
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == visual_name:
                node.input[k] = scaled
    for out in graph.output:  # a model that echoes its input: keep the float contract
        if out.name == visual_name:
            raise ModelError(f"{src}: the visual input is also a graph output; cannot convert")
    inp.type.tensor_type.elem_type = TensorProto.UINT8
    graph.initializer.append(numpy_helper.from_array(np.array(255.0, dtype=np.float32), const))
    new_nodes = [
        helper.make_node("Cast", [visual_name], [as_float], to=TensorProto.FLOAT, name=_unique(names, "avatar_uint8_cast")),
        helper.make_node("Div", [as_float, const], [scaled], name=_unique(names, "avatar_uint8_normalise")),
    ]
    for n in reversed(new_nodes):
        graph.node.insert(0, n)
    for vi in list(graph.value_info):
        if vi.name == visual_name:
            graph.value_info.remove(vi)
    return _save(model, dst)


# --------------------------------------------------------------------------- fp16


def to_fp16(
    src: str | Path,
    dst: str | Path,
    *,
    keep_io_types: bool = True,
    fp32_ops: Iterable[str] = DEFAULT_FP32_OPS,
) -> Path:
    """Write a float16 copy of ``src``.

    :param keep_io_types: keep float32 graph inputs and outputs (a ``Cast`` at
        each edge), so callers feed and read float32 as before.
    :param fp32_ops: op types that stay float32 (their float inputs are cast up
        and their outputs cast down as needed).
    Integer and uint8 tensors are untouched.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    model = _load(src)
    graph = model.graph
    fp32_ops = frozenset(fp32_ops)
    for node in graph.node:
        if node.op_type in _CONTROL_FLOW:
            raise ModelError(f"{src}: to_fp16 does not convert models with control flow ({node.op_type} node {node.name!r})")

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:
        raise ModelError(f"{src}: ONNX shape inference failed ({exc}); cannot tell float tensors apart") from exc
    types: dict[str, int] = {}
    for vi in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == F32

    names = _all_names(graph)
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}

    # 1. which precision every float tensor is produced in ("home")
    home: dict[str, int] = {}
    for name in graph_inputs:
        if is_float(name):
            home[name] = F32 if keep_io_types else F16
    order = list(graph.node)  # protobuf wrappers are views: keep one list and index it
    node_fp16 = [n.op_type not in fp32_ops for n in order]
    for i, node in enumerate(order):
        for o in node.output:
            if is_float(o):
                home[o] = F16 if node_fp16[i] else F32

    # 2. which precision each consumer slot wants
    wants: dict[str, set[int]] = {}
    slot_want: list[tuple[int, int, int]] = []
    for i, node in enumerate(order):
        for k, name in enumerate(node.input):
            if not is_float(name):
                continue
            want = F32 if (not node_fp16[i] or (node.op_type, k) in FP32_INPUT_SLOTS) else F16
            wants.setdefault(name, set()).add(want)
            slot_want.append((i, k, want))

    # 3. initializers: stored in the precision most consumers want
    clipped = 0
    for name, t in inits.items():
        if t.data_type != F32 or name in graph_inputs:
            continue
        w = wants.get(name, {F32})
        if F16 in w:
            arr = numpy_helper.to_array(t)
            big = np.abs(arr) > FP16_MAX
            clipped += int(big.sum())
            new = numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), name)
            t.CopyFrom(new)
            home[name] = F16
        else:
            home[name] = F32

    # 4. nodes that create float tensors from attributes follow their home precision
    for i, node in enumerate(order):
        if not node_fp16[i]:
            continue
        for attr in node.attribute:
            if node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" and attr.t.data_type == F32:
                arr = numpy_helper.to_array(attr.t)
                attr.t.CopyFrom(numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), attr.t.name))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == F32:
                attr.i = F16
            elif attr.name == "dtype" and attr.i == F32:
                attr.i = F16
        if node.op_type == "Cast":
            for o in node.output:
                if types.get(o) == F32:
                    home[o] = F16
        if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
            # default value is float32 zero: make it explicit so it can be float16
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
            home[node.output[0]] = F16

    # 5. casts where a slot wants another precision than the tensor's home
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[tuple[int, Any]] = []  # (index of the consumer to insert before, node)
    for i, k, want in slot_want:
        node = order[i]
        name = node.input[k]
        have = home.get(name, F32)
        if have == want:
            continue
        key = (name, want)
        if key not in casts:
            suffix = "fp16" if want == F16 else "fp32"
            casts[key] = _unique(names, f"{name}__{suffix}")
            cast = helper.make_node("Cast", [name], [casts[key]], to=want, name=_unique(names, f"avatar_cast_{suffix}"))
            new_nodes.append((i, cast))
        node.input[k] = casts[key]

    # 6. graph edges
    for inp in graph.input:
        if is_float(inp.name) and not keep_io_types and inp.name not in inits:
            inp.type.tensor_type.elem_type = F16
    nodes = list(order)
    for pos, cast in sorted(new_nodes, key=lambda p: p[0], reverse=True):
        nodes.insert(pos, cast)
    renames: dict[str, str] = {}
    tail: list[Any] = []
    for out in graph.output:
        if not is_float(out.name) or out.name in graph_inputs:
            continue
        have = home.get(out.name, F32)
        want = F32 if keep_io_types else F16
        if have == want:
            out.type.tensor_type.elem_type = want
            continue
        # the producer writes a renamed tensor; a Cast gives the graph output its old name and type
        inner = _unique(names, f"{out.name}__{'fp16' if have == F16 else 'fp32'}")
        renames[out.name] = inner
        tail.append(helper.make_node("Cast", [inner], [out.name], to=want, name=_unique(names, "avatar_cast_output")))
        out.type.tensor_type.elem_type = want
    if renames:
        for node in nodes:
            for k, o in enumerate(node.output):
                node.output[k] = renames.get(o, o)
            for k, i in enumerate(node.input):
                node.input[k] = renames.get(i, i)
    nodes.extend(tail)
    detached = []
    for n in nodes:  # copy before clearing: the wrappers may view the field being cleared
        c = onnx.NodeProto()
        c.CopyFrom(n)
        detached.append(c)
    del graph.node[:]
    graph.node.extend(detached)
    del graph.value_info[:]  # stale float32 annotations; ORT re-infers them
    if clipped:
        log.warning("to_fp16: %d weight value(s) exceeded the float16 range and were clipped to +-%g", clipped, FP16_MAX)
    return _save(model, dst)

