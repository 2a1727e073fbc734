"""A small ONNX graph writer driven by a PyTorch-style state dict, in numpy only.

A network is described once, as a Python function that calls the layer methods
of :class:`GraphBuilder` in forward order. The same description serves three
purposes, chosen when the builder is made:

* **initialise** (``rng`` given): every parameter the description asks for and
  the state dict lacks is created, seeded, with the shape and the initialiser
  PyTorch would use, under the key PyTorch would use;
* **calibrate** (``calibrate=True``): each BatchNorm normalises with the
  statistics of the batch it sees (train mode) and its mean and variance become
  graph outputs, so one ONNX Runtime run yields the running statistics of every
  layer at once;
* **export** (default): BatchNorm is folded into the preceding convolution and
  the graph is what an inference engine should see.

Describing the network once is what keeps the exported graph, the calibration
graph and the state-dict naming from drifting apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import ModelError

BN_EPS = 1e-5  # PyTorch's BatchNorm2d default

Pair = int | tuple[int, int]


def _pair(v: Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class GraphBuilder:
    """Collects ONNX nodes and initializers for one network description.

    ``sd`` is the state dict (``key -> ndarray``) the description reads; in
    initialise mode missing keys are added to it in place.
    """

    def __init__(
        self,
        sd: dict[str, np.ndarray],
        *,
        rng: np.random.Generator | None = None,
        calibrate: bool = False,
    ) -> None:
        self.sd = sd
        self.rng = rng
        self.calibrate = calibrate
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        #: (batch-norm key prefix, mean output name, variance output name), calibrate mode only
        self.stats: list[tuple[str, str, str]] = []
        self.used: set[str] = set()
        self._count = 0

    # -- plumbing ---------------------------------------------------------
    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def node(self, op: str, inputs: Sequence[str], hint: str | None = None, **attrs: Any) -> str:
        """Append one node with a single output and return the output's name."""
        from onnx import helper

        out = self._name(hint or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def const(self, value: np.ndarray, hint: str) -> str:
        """Add an initializer and return its name."""
        from onnx import numpy_helper

        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def param(self, key: str, shape: tuple[int, ...], init: Callable[[tuple[int, ...]], np.ndarray]) -> np.ndarray:
        """The state-dict entry ``key``, created with ``init`` in initialise mode."""
        if key not in self.sd:
            if self.rng is None:
                raise ModelError(
                    f"the state dict has no '{key}'; it does not belong to this architecture or mode "
                    "(check the mode: ave, hubert or wenet)"
                )
            self.sd[key] = init(shape)
        arr = np.asarray(self.sd[key])
        if tuple(arr.shape) != tuple(shape):
            raise ModelError(
                f"state dict entry '{key}' has shape {tuple(arr.shape)}, the architecture needs {tuple(shape)}; "
                "the checkpoint was trained with another mode or network"
            )
        self.used.add(key)
        return arr

    # -- initialisers (PyTorch's defaults, so seeded weights look like a fresh nn.Module) --
    def _rng(self) -> np.random.Generator:
        # initialisers run only in initialise mode, where a generator is set
        if self.rng is None:
            raise RuntimeError("weights requested outside initialise mode (a builder bug)")
        return self.rng

    def _uniform(self, bound: float) -> Callable[[tuple[int, ...]], np.ndarray]:

        def init(shape: tuple[int, ...]) -> np.ndarray:
            return self._rng().uniform(-bound, bound, size=shape).astype(np.float32)

        return init

    def _bn_params(self, prefix: str, c: int, gamma_scale: float = 1.0) -> tuple[np.ndarray, ...]:
        # Gamma/beta are perturbed around PyTorch's (1, 0) so channels differ;
        # the running statistics are placeholders until calibration sets them.
        def gamma(shape: tuple[int, ...]) -> np.ndarray:
            return (gamma_scale * (1.0 + 0.1 * self._rng().standard_normal(shape))).astype(np.float32)

        def beta(shape: tuple[int, ...]) -> np.ndarray:
            return (0.1 * self._rng().standard_normal(shape)).astype(np.float32)

        g = self.param(f"{prefix}.weight", (c,), gamma)
        b = self.param(f"{prefix}.bias", (c,), beta)
        m = self.param(f"{prefix}.running_mean", (c,), lambda s: np.zeros(s, np.float32))
        v = self.param(f"{prefix}.running_var", (c,), lambda s: np.ones(s, np.float32))
        self.param(f"{prefix}.num_batches_tracked", (), lambda s: np.array(0, dtype=np.int64))
        return g, b, m, v

    def _conv_params(
        self, prefix: str, cin: int, cout: int, k: tuple[int, int], groups: int, bias: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        fan_in = (cin // groups) * k[0] * k[1]
        bound = 1.0 / float(np.sqrt(fan_in))  # kaiming_uniform(a=sqrt(5)) as nn.Conv2d does
        w = self.param(f"{prefix}.weight", (cout, cin // groups, k[0], k[1]), self._uniform(bound))
        b = self.param(f"{prefix}.bias", (cout,), self._uniform(bound)) if bias else None
        return w, b

    # -- layers -------------------------------------------------------------
    def _conv_node(
        self, x: str, w: np.ndarray, b: np.ndarray | None, k: tuple[int, int], stride: Pair, pad: Pair, groups: int, hint: str
    ) -> str:
        s, p = _pair(stride), _pair(pad)
        inputs = [x, self.const(w.astype(np.float32), f"{hint}.w")]
        if b is not None:
            inputs.append(self.const(b.astype(np.float32), f"{hint}.b"))
        return self.node(
            "Conv", inputs, hint, kernel_shape=list(k), strides=list(s), pads=[p[0], p[1], p[0], p[1]], group=groups
        )

    def conv(
        self, x: str, prefix: str, cin: int, cout: int, k: Pair, *, stride: Pair = 1, pad: Pair = 0, groups: int = 1, bias: bool = True
    ) -> str:
        """A plain ``nn.Conv2d`` (no BatchNorm after it)."""
        kk = _pair(k)
        w, b = self._conv_params(prefix, cin, cout, kk, groups, bias)
        return self._conv_node(x, w, b, kk, stride, pad, groups, prefix)

    def conv_bn(
        self,
        x: str,
        conv_prefix: str,
        bn_prefix: str,
        cin: int,
        cout: int,
        k: Pair,
        *,
        stride: Pair = 1,
        pad: Pair = 0,
        groups: int = 1,
        bias: bool = False,
        gamma_scale: float = 1.0,
    ) -> str:
        """``nn.Conv2d`` followed by ``nn.BatchNorm2d``: folded, or batch-normalised when calibrating.

        ``gamma_scale`` scales the initial BatchNorm weight (initialise mode only).
        """
        kk = _pair(k)
        w, b = self._conv_params(conv_prefix, cin, cout, kk, groups, bias)
        gamma, beta, mean, var = self._bn_params(bn_prefix, cout, gamma_scale)
        if self.calibrate:
            y = self._conv_node(x, w, b, kk, stride, pad, groups, conv_prefix)
            return self._batch_norm_train(y, bn_prefix, gamma, beta)
        # Fold in float64 so the folded model matches eval-mode PyTorch to ~1e-6.
        scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + BN_EPS)
        wf = w.astype(np.float64) * scale[:, None, None, None]
        b0 = b.astype(np.float64) if b is not None else np.zeros(cout)
        bf = (b0 - mean.astype(np.float64)) * scale + beta.astype(np.float64)
        return self._conv_node(x, wf, bf, kk, stride, pad, groups, conv_prefix)

    def _batch_norm_train(self, y: str, prefix: str, gamma: np.ndarray, beta: np.ndarray) -> str:
        c = gamma.shape[0]
        mean = self.node("ReduceMean", [y], f"{prefix}.mean", axes=[0, 2, 3], keepdims=1)
        d = self.node("Sub", [y, mean])
        var = self.node("ReduceMean", [self.node("Mul", [d, d])], f"{prefix}.var", axes=[0, 2, 3], keepdims=1)
        std = self.node("Sqrt", [self.node("Add", [var, self.const(np.array(BN_EPS, np.float32), "eps")])])
        n = self.node("Div", [d, std])
        g = self.const(gamma.astype(np.float32).reshape(1, c, 1, 1), f"{prefix}.gamma")
        b = self.const(beta.astype(np.float32).reshape(1, c, 1, 1), f"{prefix}.beta")
        self.stats.append((prefix, mean, var))
        return self.node("Add", [self.node("Mul", [n, g]), b])

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b])

    def concat(self, xs: Sequence[str]) -> str:
        return self.node("Concat", list(xs), axis=1)

    def upsample(self, x: str, factor: float | tuple[float, float] = 2) -> str:
        """Bilinear upsampling with ``align_corners=True`` (``nn.Upsample`` as upstream uses it)."""
        fh, fw = (factor, factor) if not isinstance(factor, tuple) else factor
        roi = self.const(np.zeros(0, np.float32), "roi")
        scales = self.const(np.array([1, 1, fh, fw], np.float32), "scales")
        return self.node(
            "Resize", [x, roi, scales], "up", mode="linear", coordinate_transformation_mode="align_corners"
        )

    def avg_pool(self, x: str, k: Pair) -> str:
        kk = _pair(k)
        return self.node("AveragePool", [x], "pool", kernel_shape=list(kk), strides=list(kk))

    def sigmoid(self, x: str) -> str:
        return self.node("Sigmoid", [x])

    def flatten(self, x: str) -> str:
        return self.node("Flatten", [x], axis=1)

    def unused(self) -> list[str]:
        """State-dict keys the description never read (a checkpoint for another network)."""
        return sorted(k for k in self.sd if k not in self.used)


def make_model(
    g: GraphBuilder,
    inputs: Sequence[tuple[str, int, Sequence[int | str]]],
    outputs: Sequence[tuple[str, str, Sequence[int | str]]],
    *,
    opset: int,
    doc: str = "",
    metadata: dict[str, str] | None = None,
) -> Any:
    """Wrap the builder's nodes into a checked ``onnx.ModelProto``.

    ``inputs`` are ``(name, onnx elem type, shape)``; ``outputs`` are
    ``(graph name, node output to expose, shape)`` — an Identity renames the
    node output so callers choose any output name.
    """
    import onnx
    from onnx import TensorProto, helper

    nodes = list(g.nodes)
    outs = []
    for name, src, shape in outputs:
        if src != name:
            nodes.append(helper.make_node("Identity", [src], [name], name=f"{name}_identity"))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
    ins = [helper.make_tensor_value_info(n, t, list(s)) for n, t, s in inputs]
    graph = helper.make_graph(nodes, "avatar_synthetic", ins, outs, initializer=g.initializers, doc_string=doc)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="avatar-sdk", producer_version="synthetic"
    )
    # Write the IR version that came with the opset, not the onnx package's
    # newest, so older runtimes (TensorRT's parser, ORT 1.18) accept the file.
    ir = 8 if opset <= 18 else 9 if opset <= 20 else 10
    model.ir_version = min(model.ir_version, ir)
    for k, v in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:  # a bug here, never a user error
        raise ModelError(f"internal error: the generated ONNX graph is invalid: {exc}") from exc
    return model
