"""``avatar gate`` and ``avatar quantize``: measure accuracy gates, make a gated int8 model.

Registered by the ``openvino`` plugin (:func:`register_commands`); the heavy
imports (OpenVINO, NNCF, ONNX) happen when a command runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
import numpy as np

from avatar.errors import AvatarError, ConfigError

from . import _gates

log = logging.getLogger(__name__)

#: backends whose reduced precisions the gate command measures, with the precisions
GATED = {"openvino": ("bf16", "fp16", "int8"), "cpu": ("fp16",)}


def _names(model: Path) -> tuple[tuple[str, str], tuple[int, ...]]:
    """(visual name, audio name) and the audio input shape without batch, from the model contract."""
    from avatar.contract import read_contract

    c = read_contract(model)
    d = c.describe()
    return (d["visual"]["name"], d["audio"]["name"]), tuple(int(v) for v in d["audio"]["shape"][1:])


def measure_gate(model: str | Path, avatar: str | Path, *, precision: str, backend: str = "openvino", device: str = "CPU",
                 frames: str | None = None, threads: int | None = None, reference: str | Path | None = None,
                 data: _gates.FrameData | None = None) -> tuple[_gates.GateRecord, Path]:  # fmt: skip
    """Measure the gate of ``model`` at ``precision`` on ``avatar``'s held-out frames; save and return the record."""
    from avatar.plugins import get_plugin_manager

    from ._ov_quantize import quantized_from

    model = Path(model)
    if not model.is_file():
        raise ConfigError(f"model file not found: {model}")
    if backend not in GATED or precision not in GATED[backend]:
        choices = "; ".join(f"{b}: {', '.join(p)}" for b, p in GATED.items())
        raise ConfigError(f"no gate for backend {backend!r} at precision {precision!r} (gated: {choices})")
    ref_model = Path(reference) if reference else (quantized_from(model) if precision == "int8" else model)
    if ref_model is None:
        raise ConfigError(f"{model} does not name the fp32 model it was quantized from; pass --reference FP32.onnx")
    names, audio_shape = _names(model)
    data = data or _gates.load_frames(avatar, audio_shape, frames=frames)
    pm = get_plugin_manager()
    extra: dict[str, Any] = {"device": device, "allow_failed_gate": True} if backend == "openvino" else {}
    quiet = logging.getLogger(pm.backend_class(backend).__module__)
    level, quiet.level = quiet.level, logging.ERROR  # "no gate record" while measuring the gate is noise
    try:
        record = _measure(pm, model, ref_model, data, names, precision, device, backend, threads, extra)
    finally:
        quiet.level = level
    return record, _gates.save_record(model, record)


def _measure(pm: Any, model: Path, ref_model: Path, data: _gates.FrameData, names: tuple[str, str], precision: str,
             device: str, backend: str, threads: int | None, extra: dict[str, Any]) -> _gates.GateRecord:  # fmt: skip
    from avatar.interfaces import BackendOptions

    batch = 4
    with pm.backend_class("cpu")(ref_model, BackendOptions(max_batch=batch, threads=threads)) as ref, \
         pm.backend_class(backend)(model, BackendOptions(precision=precision, max_batch=batch, threads=threads, extra=extra)) as be:  # fmt: skip
        runtime = ", ".join(getattr(be, "providers", []) or [backend])
        record = _gates.measure(
            model, ref_model, data, precision=precision, device=device.split(".", 1)[0], backend=backend,
            run=lambda f: be.run(f)[be.outputs[0].name], reference_run=lambda f: ref.run(f)[ref.outputs[0].name],
            names=names, runtime=runtime,
        )  # fmt: skip
    return record


@click.command("gate")
@click.argument("model", type=click.Path(dir_okay=False, exists=True))
@click.option("--avatar", "avatar", required=True, type=click.Path(file_okay=False, exists=True),
              help="Avatar package (with aud_ave.npy) or SyncTalk_2D dataset folder the model was trained for.")
@click.option("--precision", required=True, type=click.Choice(["bf16", "fp16", "int8"]), help="Precision to measure.")
@click.option("--backend", default="openvino", show_default=True, type=click.Choice(sorted(GATED)), help="Backend that runs it.")
@click.option("--device", default="CPU", show_default=True, help="OpenVINO device.")
@click.option("--frames", help="Held-out frames START:END (default: the last 62 frames with feature rows).")
@click.option("--reference", type=click.Path(dir_okay=False, exists=True), help="The fp32 model (default: the model itself; for int8 the model it was quantized from).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads.")
def gate(model: str, avatar: str, precision: str, backend: str, device: str, frames: str | None, reference: str | None,
         threads: int | None) -> None:  # fmt: skip
    """Measure a reduced precision's accuracy gate on a trained model and record it beside the model.

    The gate: face PSNR against the fp32 output >= 40 dB and at most 0.1 dB lost
    against the real frames, on held-out frames. Backends read the record when
    they load that precision (a failing one refuses to load).

    \b
    avatar gate sanders/model/unet.onnx --avatar sanders_pkg/ --precision bf16 --frames 460:522
    """
    record, where = measure_gate(model, avatar, precision=precision, backend=backend, device=device, frames=frames,
                                 threads=threads, reference=reference)  # fmt: skip
    click.echo(record.summary())
    click.echo(f"recorded in {where}")
    _fail_unless_passed(record)


def _fail_unless_passed(record: _gates.GateRecord) -> None:
    """A failed gate is a failed command (exit 1), so a CI step notices; the record stays, and backends refuse it."""
    if not record.passed:
        raise GateFailed(f"the {record.precision} accuracy gate failed on {record.device}; backends refuse "
                         f"{record.precision} for this model unless told allow_failed_gate=1")


class GateFailed(AvatarError):
    """A measured accuracy gate failed (exit status 1)."""


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False, exists=True))
@click.option("--avatar", "avatar", required=True, type=click.Path(file_okay=False, exists=True),
              help="Avatar package (with aud_ave.npy) or SyncTalk_2D dataset folder: the calibration data.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Quantized model: an OpenVINO IR .xml (its weights go to the .bin beside it).")
@click.option("--frames", help="Held-out frames START:END for the gate, never calibrated on (default: the last 62).")
@click.option("--subset", default=300, show_default=True, help="Calibration frames (spread over the rest of the avatar).")
@click.option("--keep-float", default="full_res", show_default=True,
              help="Layer groups kept in float: full_res (convolutions at the input's resolution), first_conv, last_conv, "
                   "audio (comma-separated; '' quantizes everything).")
@click.option("--bias-correction", type=click.Choice(["fast", "full"]), default="fast", show_default=True)
@click.option("--preset", type=click.Choice(["performance", "mixed"]), default="performance", show_default=True,
              help="mixed: asymmetric activations.")
@click.option("--gate/--no-gate", "run_gate", default=True, show_default=True, help="Measure the int8 gate and record it beside the output.")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for the gate measurement.")
def quantize(model: str, avatar: str, output: str, frames: str | None, subset: int, keep_float: str, bias_correction: str,
             preset: str, run_gate: bool, threads: int | None) -> None:  # fmt: skip
    """Quantize a UNet-328 to int8 with NNCF, calibrated on its avatar, and record its accuracy gate.

    \b
    avatar quantize model.onnx --avatar pkg/ -o model.int8.xml
    avatar run --avatar pkg/ --audio a.wav --model model.int8.xml --backend openvino --precision int8 -o out.mp4
    """
    from ._ov_quantize import Recipe
    from ._ov_quantize import quantize as run_quantize

    src, out = Path(model), Path(output)
    if out.suffix != ".xml":
        raise ConfigError(f"-o must name an OpenVINO IR .xml file (the .bin is written beside it), not {out}")
    if out.resolve() == src.resolve():
        raise ConfigError("-o must differ from MODEL")
    names, audio_shape = _names(src)
    held = _gates.load_frames(avatar, audio_shape, frames=frames)
    usable = _gates.usable_frames(avatar)
    rest = [i for i in range(usable) if i not in set(held.indices)]
    if not rest:
        raise ConfigError("no frames are left for calibration outside the held-out frames")
    if subset < 1:
        raise ConfigError(f"--subset must be at least 1, not {subset}")
    picks = sorted({rest[int(k)] for k in np.linspace(0, len(rest) - 1, min(subset, len(rest)))})  # spread over the avatar
    calib = _gates.load_frames(avatar, audio_shape, indices=picks)
    recipe = Recipe(
        keep_float=tuple(g.strip() for g in keep_float.split(",") if g.strip()),
        subset_size=subset, fast_bias_correction=bias_correction == "fast", preset=preset,
    )  # fmt: skip
    click.echo(f"quantizing on {len(calib.indices)} calibration frames (held out: {held.indices[0]}-{held.indices[-1]})", err=True)
    info = run_quantize(src, out, calib, names, recipe)
    click.echo(f"wrote {out} in {info['seconds']:.0f} s ({info['kept_float_nodes']} nodes kept in float)")
    if run_gate:
        record, where = measure_gate(out, avatar, precision="int8", reference=src, data=held, threads=threads)
        click.echo(record.summary())
        click.echo(f"recorded in {where}")
        _fail_unless_passed(record)
