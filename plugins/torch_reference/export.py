"""Export the reference networks to ONNX and prove the export right.

Every export runs the same checks before it returns: the ONNX checker, a
self-contained file (weights inside, no external-data side file), a symbolic
batch axis on every input and output, and a parity check: ONNX Runtime (CPU)
against PyTorch (run in float64, i.e. against exact arithmetic) on seeded random
inputs of batch 2, plus a batch-1 run that must
match the first row of the batch-2 run (so the dynamic batch axis really works).

Exporter choice (torch 2.13): the ``torch.export``-based exporter
(``dynamo=True``, the default since 2.9) gives a clean graph - BatchNorm folded
into the convolutions, no ``Identity`` or ``Constant`` clutter - and a symbolic
``batch`` axis from ``dynamic_shapes``. The legacy TorchScript exporter works
too but is deprecated and leaves ~80 ``Identity`` nodes; it is used only on
torch builds whose ``torch.onnx.export`` has no ``dynamo`` switch. The new
exporter's native opset is 18; lower targets (17, the default, which TensorRT 8.6+
and every ONNX Runtime since 1.14 read) go through ONNX's version converter, and
the written opset is verified.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from avatar.errors import ConfigError, ModelError

from .checkpoints import load_audio_encoder_checkpoint, load_unet_checkpoint, require_torch

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
UNET_NAMES = ("input", "audio", "output")
ENCODER_NAMES = ("mel", "feature")
PARITY_BATCH = 2


@dataclass(frozen=True)
class ParityResult:
    """How far ONNX Runtime's output is from PyTorch's on the same inputs."""

    path: Path
    max_abs_diff: float
    mean_abs_diff: float
    shape: tuple[int, ...]
    tolerance: float
    #: max |batch-1 run - first row of the batch-2 run| in ONNX Runtime
    batch1_diff: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            math.isfinite(self.max_abs_diff)
            and self.max_abs_diff <= self.tolerance
            and self.batch1_diff <= self.tolerance
        )

    def __str__(self) -> str:
        shape = "x".join(map(str, self.shape))
        verdict = "ok" if self.ok else f"FAILED, tolerance {self.tolerance:.0e}"
        extra = "" if self.batch1_diff <= self.tolerance else f", batch-1 run differs by {self.batch1_diff:.1e}"
        return f"parity: max abs diff {self.max_abs_diff:.1e} over {shape} outputs ({verdict}{extra})"


# ---------------------------------------------------------------------- public


def export_unet(
    model_or_ckpt: Any,
    mode: str | None,
    out_path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    names: Sequence[str] = UNET_NAMES,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> ParityResult | None:
    """Export a UNet-328 (a :class:`UNet328` or a checkpoint path) to ONNX.

    ``mode`` is the audio branch (``"ave"``, ``"hubert"``, ``"wenet"``); None
    means the model's own mode, or ``"ave"`` for a checkpoint path. ``names``
    are (visual input, audio input, output); a comma-separated string works
    too. The caller's model is not modified (a CPU float32 copy is exported).
    Returns the parity
    result, or None when ``check`` is False. The file is written even when
    parity fails, so it can be inspected; callers decide (the CLI exits 1).
    """
    from .networks import UNet328

    names = _check_names(names, 3, "a UNet-328")
    if isinstance(model_or_ckpt, UNet328):
        model = model_or_ckpt
        if mode is not None and mode != model.mode:
            raise ConfigError(f"mode {mode!r} was asked for but the model is a {model.mode!r} UNet328")
    else:
        model = load_unet_checkpoint(model_or_ckpt, mode or "ave")
    return _export(model, out_path, names, opset=opset, check=check, tolerance=tolerance, seed=seed)


def export_audio_encoder(
    model_or_ckpt: Any,
    out_path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    names: Sequence[str] = ENCODER_NAMES,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> ParityResult | None:
    """Export the AVE audio encoder (``[B,1,80,16] -> [B,512]``) to ONNX.

    ``names`` are (mel input, feature output); see :func:`export_unet`.
    """
    from .networks import AudioEncoder

    names = _check_names(names, 2, "an audio encoder")
    model = model_or_ckpt if isinstance(model_or_ckpt, AudioEncoder) else load_audio_encoder_checkpoint(model_or_ckpt)
    return _export(model, out_path, names, opset=opset, check=check, tolerance=tolerance, seed=seed)


def check_parity(model: Any, onnx_path: str | Path, *, tolerance: float = DEFAULT_TOLERANCE,
                 seed: int = 0) -> ParityResult:
    """Run ``model`` (PyTorch, float64) and ``onnx_path`` (ONNX Runtime, CPU) on the same seeded inputs.

    ``model`` is left untouched (the float64 reference is a copy).
    """
    import onnxruntime as ort

    from .networks import example_inputs

    torch = require_torch()
    inputs = example_inputs(model, batch=PARITY_BATCH, seed=seed)
    # The reference runs in float64: float32 PyTorch is itself ~3e-5 away from
    # exact on a calibrated UNet-328, as far as ONNX Runtime is, so comparing two
    # float32 runs would charge the export with PyTorch's own rounding too.
    reference = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        expected = reference(*(t.double() for t in inputs)).numpy()
    del reference
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feeds)[0]
    if got.shape != expected.shape:
        raise ModelError(f"the exported model returns {got.shape}, PyTorch {expected.shape}")
    one = sess.run(None, {k: v[:1] for k, v in feeds.items()})[0]
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    return ParityResult(
        path=Path(onnx_path),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        shape=tuple(got.shape),
        tolerance=tolerance,
        batch1_diff=float(np.abs(one - got[:1]).max()),
    )


# --------------------------------------------------------------------- internals


def _check_names(names: Sequence[str] | str, n: int, what: str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [s.strip() for s in names.split(",")]
    names = tuple(names)
    if len(names) != n or any(not s for s in names) or len(set(names)) != n:
        raise ConfigError(f"{what} needs {n} distinct, non-empty tensor names (got {','.join(names)!r})")
    return names


def _export(model: Any, out_path: str | Path, names: tuple[str, ...], *, opset: int, check: bool,
            tolerance: float, seed: int) -> ParityResult | None:
    from .networks import example_inputs

    if opset < MIN_OPSET:
        raise ConfigError(f"opset {opset} is too old; use --opset {MIN_OPSET} or newer")
    out = Path(out_path)
    if not out.parent.exists():
        raise ConfigError(f"output folder does not exist: {out.parent}")
    model = copy.deepcopy(model).float().cpu().eval()
    args = example_inputs(model, batch=PARITY_BATCH, seed=seed + 1)
    _torch_export(model, args, out, names, opset)
    _validate(out, names, opset)
    if not check:
        return None
    result = check_parity(model, out, tolerance=tolerance, seed=seed)
    log.info("%s: %s", out, result)
    return result


def _torch_export(model: Any, args: tuple[Any, ...], out: Path, names: tuple[str, ...], opset: int) -> None:
    torch = require_torch()
    in_names = list(names[: len(args)])
    out_names = list(names[len(args):])
    kwargs: dict[str, Any] = dict(input_names=in_names, output_names=out_names, opset_version=opset)
    if _use_dynamo():
        batch = torch.export.Dim("batch")
        kwargs.update(
            dynamo=True,
            dynamic_shapes=tuple({0: batch} for _ in args),
            external_data=False,  # one self-contained file (the UNet is ~49 MB, far below 2 GB)
            verbose=False,
        )
    else:
        kwargs.update(dynamo=False, dynamic_axes={n: {0: "batch"} for n in names})
        if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
            del kwargs["dynamo"]
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(model, args, str(out), **kwargs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ModelError(f"torch.onnx.export failed for {type(model).__name__}: {first}") from exc


def _use_dynamo() -> bool:
    """The torch.export-based exporter needs torch >= 2.5 and the onnxscript package."""
    torch = require_torch()
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        return False
    if importlib.util.find_spec("onnxscript") is None:
        log.info("onnxscript is not installed; using the legacy TorchScript ONNX exporter "
                 "(same numbers, a less tidy graph; `pip install onnxscript` for the new one)")
        return False
    return True


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress chatter; real failures still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _validate(out: Path, names: tuple[str, ...], opset: int) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(out))
    except Exception as exc:
        raise ModelError(f"the exported {out} fails the ONNX checker: {exc}") from exc
    model = onnx.load(str(out), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ModelError(f"the export of {out} put weights in external files ({external[0]}, ...)")
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ModelError(
            f"the exporter wrote opset {got} instead of {opset} (the version conversion failed); "
            f"rerun with --opset {got}"
        )
    io = list(model.graph.input) + list(model.graph.output)
    if [t.name for t in io] != list(names):
        raise ModelError(f"exported tensor names {[t.name for t in io]} differ from the requested {list(names)}")
    fixed = [t.name for t in io if not t.type.tensor_type.shape.dim[0].dim_param]
    if fixed:
        raise ModelError(f"the export of {out} has a fixed batch size on {', '.join(fixed)}")
