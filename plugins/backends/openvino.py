"""OpenVINO backend: ``openvino`` (CPU, Intel GPU, NPU, AUTO) with fp32, bf16, fp16 and int8.

The fast CPU path. OpenVINO runs an ONNX model (or an OpenVINO IR: the int8
model ``avatar quantize`` writes carries FakeQuantize layers) and lowers its
float layers to the precision asked for (``INFERENCE_PRECISION_HINT``). Compiled
models are cached (OpenVINO's ``CACHE_DIR``), so a second start skips the
compilation.

Reduced precision is gated (see :mod:`._gates`): bf16, fp16 and int8 load only
with a passing record for *this* model file, precision and device; an
unmeasured or failed precision is refused (the error names the command that
measures it) unless ``allow_failed_gate`` insists. Under ``AUTO`` the same
checks (native precision, gate) apply to every device it runs the model on.

``precision="auto"`` picks the fastest precision with a passing record: int8
for a quantized model, else bf16 where the CPU has native bf16, else fp32. When
``auto`` chooses among backends (:meth:`open_auto`) and only fp32 would be
left, it declines: OpenVINO fp32 is no faster than ONNX Runtime's ``cpu``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import queue
import time
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from avatar.errors import BackendError, BackendUnavailable, ConfigError, ModelError, interrupt_behind
from avatar.hookspecs import hookimpl
from avatar.interfaces import Availability, BackendOptions, TensorInfo

from . import _gates
from ._common import ListedTensorsBackend, cache_dir, check_extra, check_feeds, option_bool

log = logging.getLogger(__name__)

DEVICES = ("CPU", "GPU", "NPU", "AUTO")
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")
#: OpenVINO inference precision hint per precision (int8: see OpenVinoBackend._compute_precision)
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_OV_HINT_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
#: OPTIMIZATION_CAPABILITIES a device must list for a precision
_CAPS = {"bf16": "BF16", "fp16": "FP16", "int8": "INT8"}
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")

_EXTRA = {
    "device": "CPU (default), GPU, GPU.N, NPU or AUTO",
    "streams": "parallel inference streams (NUM_STREAMS; default: OpenVINO's choice for the hint)",
    "performance_hint": "LATENCY (default), THROUGHPUT or CUMULATIVE_THROUGHPUT",
    "cache_dir": "where compiled models are cached (default: the avatar-sdk cache)",
    "cache": "cache compiled models so a second start is fast (default True)",
    "allow_failed_gate": "load a reduced precision whose accuracy gate failed or was never measured (default false)",
}


@functools.lru_cache(maxsize=1)
def _core():  # type: ignore[no-untyped-def]
    import openvino

    return openvino.Core()


@functools.lru_cache(maxsize=1)
def _status() -> Availability:
    if importlib.util.find_spec("openvino") is None:
        return Availability.missing("openvino", "openvino")
    try:
        devices = list(_core().available_devices)
    except Exception as exc:  # a broken install says why instead of failing the listing
        interrupt = interrupt_behind(exc)  # Ctrl-C/SIGTERM during its import: not a broken install
        if interrupt is not None:
            raise interrupt from None
        return Availability(False, f"OpenVINO is installed but cannot start: {exc}", "pip install -U 'avatar-sdk[openvino]'")
    if not devices:
        return Availability(False, "OpenVINO found no device it can run on")
    return Availability(True, f"devices: {', '.join(devices)}")


def available_devices() -> list[str]:
    return list(_core().available_devices) if _status().usable else []


def device_capabilities(device: str) -> list[str]:
    """``OPTIMIZATION_CAPABILITIES`` of a device (``[]`` when it cannot say, e.g. ``AUTO``)."""
    try:
        return [str(c) for c in _core().get_property(device, "OPTIMIZATION_CAPABILITIES")]
    except Exception:
        return []


def _tensor_infos(ports: Sequence[Any]) -> list[TensorInfo]:
    out = []
    for p in ports:
        try:
            dtype = np.dtype(p.get_element_type().to_dtype())
        except Exception as exc:
            raise ModelError(f"tensor '{p.get_any_name()}' has type {p.get_element_type()}, which avatar backends do not support") from exc
        shape = tuple(d.get_length() if d.is_static else None for d in p.get_partial_shape())
        out.append(TensorInfo(p.get_any_name(), shape, dtype))
    return out


def is_quantized(model: Any) -> bool:
    """Whether an OpenVINO model carries int8 quantization (FakeQuantize, from ONNX Q/DQ pairs or NNCF)."""
    return any(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())


class OpenVinoBackend(ListedTensorsBackend):
    """OpenVINO on CPU (or an Intel GPU/NPU): fp32, bf16, fp16 and int8, accuracy-gated."""

    name = "openvino"
    description = "OpenVINO (Intel/AMD CPU, Intel GPU, NPU): fp32, bf16, fp16, int8; gated on a trained model"
    #: ``auto`` tries backends by priority (onnx-cuda 100, cpu 10): OpenVINO before ONNX Runtime on a CPU
    priority: ClassVar[int | None] = 50
    _extra: ClassVar[Mapping[str, str]] = _EXTRA

    @classmethod
    def availability(cls) -> Availability:
        return _status()

    @classmethod
    def open_auto(cls, model_path: str | Path, options: BackendOptions) -> "OpenVinoBackend":
        """Load for ``--backend auto``: the fastest gated precision, or decline when that would be fp32."""
        if options.precision == "fp32":
            if options.precision_explicit:  # fp32 asked for: ONNX Runtime's is as fast, and no model is read here
                raise BackendUnavailable("openvino: fp32 was asked for; ONNX Runtime fp32 (cpu) is as fast, so auto does not use it")
            from dataclasses import replace

            options = replace(options, precision="auto")  # the default: pick the fastest gated precision
        try:
            be = cls(model_path, options)
        except ConfigError as exc:  # e.g. fp16 asked on a CPU without it: let auto try the next backend
            raise BackendUnavailable(f"openvino: {exc}") from exc
        if be.precision == "fp32" and options.precision == "auto":
            be.close()
            raise BackendUnavailable(f"openvino: {be.choice}; ONNX Runtime fp32 (cpu) is as fast, so auto does not use it")
        return be

    def __init__(self, model_path: str | Path, options: BackendOptions | None = None) -> None:
        super().__init__(model_path, options)
        a = self.availability()
        if not a.usable:
            fix = f"; install it with `{a.install}`" if a.install else ""
            raise BackendUnavailable(f"openvino is unavailable: {a.reason}{fix}")
        opts = self.options
        check_extra(opts.extra, self._extra, self.name)
        if opts.precision not in PRECISIONS:
            raise ConfigError(f"openvino: precision must be one of {', '.join(PRECISIONS)}, not {opts.precision!r}")
        if not self.model_path.is_file():
            raise ModelError(f"model file not found: {self.model_path}")
        start = time.perf_counter()
        self._allow_failed = option_bool(opts.extra.get("allow_failed_gate", False), "openvino: allow_failed_gate")
        self._cache = option_bool(opts.extra.get("cache", True), "openvino: cache")
        self.device = self._device()
        try:
            self._model = _core().read_model(str(self.model_path))
        except Exception as exc:
            raise ModelError(f"openvino cannot read {self.model_path}: {exc}") from exc
        self.quantized = is_quantized(self._model)
        self._sha = _gates.model_sha256(self.model_path)
        #: the gate record the precision was loaded under (None for fp32 or when never measured)
        self.gate: _gates.GateRecord | None = None
        self.precision, self.choice = self._choose_precision(opts.precision)
        if self.precision != "fp32" and not self.device.startswith("AUTO"):
            self._enforce_gate(self._gate_device())
        self._inputs = _tensor_infos(self._model.inputs)
        self._outputs = _tensor_infos(self._model.outputs)
        config = self._config()
        try:
            self._compiled = _core().compile_model(self._model, self.device, config)
        except Exception as exc:
            raise BackendError(f"openvino: cannot compile {self.model_path} for {self.device}: {exc}") from exc
        if self.device.startswith("AUTO") and self.precision != "fp32":
            self._check_auto_devices()  # AUTO picks the device only now: the same checks, on what it picked
        self._check_compiled()
        # one infer request per stream the compiled model runs in parallel (1 under the LATENCY hint):
        # calls from that many threads run at once, each on its stream's threads
        self._n_requests = self._parallel_requests()
        self._requests: queue.Queue[Any] = queue.Queue(maxsize=self._n_requests)
        for _ in range(self._n_requests):
            self._requests.put_nowait(self._compiled.create_infer_request())
        self._closed = False
        self.stats.load_s = time.perf_counter() - start
        log.info("openvino: %s on %s (%s)%s", self.model_path.name, self.device, self.choice,
                 " from the compiled-model cache" if self.loaded_from_cache else "")  # fmt: skip

    # ------------------------------------------------------------------ options

    def _device(self) -> str:
        dev = str(self.options.extra.get("device", "CPU")).upper()
        base = dev.split(".", 1)[0].split(":", 1)[0]
        if base not in DEVICES:
            raise ConfigError(f"openvino: device must be one of {', '.join(DEVICES)} (GPU.N for a GPU index), not {dev!r}")
        if base == "GPU" and dev == "GPU" and int(self.options.device_id) > 0:
            dev = f"GPU.{int(self.options.device_id)}"
        present = available_devices()
        if base != "AUTO" and dev not in present and not any(p.startswith(dev + ".") for p in present):
            raise BackendUnavailable(f"openvino: device {dev} is not present here (OpenVINO sees: {', '.join(present) or 'none'})")
        return dev

    def _choose_precision(self, asked: str) -> tuple[str, str]:
        """(precision, why) for ``asked``; ``auto`` goes by the gate records."""
        caps = device_capabilities(self.device)
        if asked != "auto":
            if asked == "int8" and not self.quantized:
                raise ConfigError(
                    f"openvino: precision int8 needs a quantized model and {self.model_path.name} has no int8 layers; "
                    f"make one with `avatar quantize {self.model_path} --avatar AVATAR_PKG -o MODEL.int8.xml`"
                )
            if self.quantized and asked != "int8":
                raise ConfigError(f"openvino: {self.model_path.name} is a quantized (int8) model; load it with precision int8")
            need = _CAPS.get(asked)
            if need and caps and need not in caps:
                raise ConfigError(
                    f"openvino: device {self.device} has no native {asked} (its capabilities: {', '.join(caps)}); use fp32"
                )
            return asked, f"precision {asked} as asked"
        if self.quantized:
            rec = _gates.find_record(self.model_path, "int8", self._gate_device(), self._sha)
            if rec is None or not rec.passed:
                state = "has no gate record" if rec is None else "failed its gate"
                raise BackendUnavailable(f"openvino: auto will not run the quantized model {self.model_path.name}: it {state}")
            return "int8", f"int8: a quantized model whose gate passed ({rec.psnr_vs_fp32:.1f} dB vs fp32, {rec.loss_db:+.2f} dB lost)"
        reasons = []
        if "BF16" in caps:
            rec = _gates.find_record(self.model_path, "bf16", self._gate_device(), self._sha)
            if rec is not None and rec.passed:
                return "bf16", (
                    f"bf16: {self.device} has native bf16 and this model passed the bf16 gate "
                    f"({rec.psnr_vs_fp32:.1f} dB vs fp32, {rec.loss_db:+.2f} dB lost against the real frames)"
                )
            reasons.append("bf16 " + ("has no gate record" if rec is None else "failed its gate"))
        else:
            reasons.append(f"{self.device} has no native bf16")
        return "fp32", "fp32: " + "; ".join(reasons)

    def _gate_device(self) -> str:
        return self.device.split(".", 1)[0]

    def _enforce_gate(self, device: str) -> None:
        """Refuse a reduced precision on ``device`` (a base name: CPU, GPU, NPU) whose gate failed or was never
        measured, unless ``allow_failed_gate`` insists."""
        rec = _gates.find_record(self.model_path, self.precision, device, self._sha)
        cmd = _gates.measure_command(self.model_path, self.precision, self.name, device)
        if rec is not None:
            self.gate = rec
        if rec is not None and rec.passed:
            log.info("openvino: gate %s", rec.summary())
            return
        state = f"has no accuracy gate record on {device}" if rec is None else f"failed its accuracy gate: {rec.summary()}"
        if self._allow_failed:
            log.warning("openvino: loading %s for %s although it %s (allow_failed_gate); its output may be wrong",
                        self.precision, self.model_path.name, state)
            return
        raise BackendError(
            f"openvino: refusing {self.precision} for {self.model_path.name}: it {state}. Use fp32, measure it with `"
            + cmd + "`, or insist with allow_failed_gate=True (--backend-opt allow_failed_gate=1)"
        )

    def _check_auto_devices(self) -> None:
        """Under ``AUTO``: every device it runs the model on must have the precision natively and pass its gate."""
        try:
            devices = [str(d) for d in self._compiled.get_property("EXECUTION_DEVICES")]
        except Exception as exc:
            devices = []
            log.debug("openvino: AUTO does not say which devices it uses: %s", exc)
        if not devices:
            if self._allow_failed:
                log.warning("openvino: AUTO does not say which device runs %s; loading it unchecked (allow_failed_gate)",
                            self.precision)
                return
            raise BackendError(f"openvino: AUTO does not say which device runs the model, so the {self.precision} "
                               "accuracy gate cannot be checked; name the device (device=CPU) or use fp32")
        need = _CAPS.get(self._compute_precision())
        for dev in devices:
            caps = device_capabilities(dev)
            if need and caps and need not in caps:
                raise ConfigError(f"openvino: AUTO runs the model on {dev}, which has no native "
                                  f"{self._compute_precision()} (its capabilities: {', '.join(caps)}); use fp32")
            self._enforce_gate(dev.split(".", 1)[0])

    def _config(self) -> dict[str, Any]:
        opts, extra = self.options, self.options.extra
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINTS[self._compute_precision()]}
        hint = str(extra.get("performance_hint", "LATENCY")).upper()
        if hint not in PERFORMANCE_HINTS:
            raise ConfigError(f"openvino: performance_hint must be one of {', '.join(PERFORMANCE_HINTS)}, not {hint!r}")
        config["PERFORMANCE_HINT"] = hint
        if opts.threads is not None:
            if int(opts.threads) < 1:
                raise ConfigError(f"threads must be at least 1, not {opts.threads}")
            config["INFERENCE_NUM_THREADS"] = int(opts.threads)
        if extra.get("streams") is not None:
            if int(extra["streams"]) < 1:
                raise ConfigError(f"openvino: streams must be at least 1, not {extra['streams']}")
            config["NUM_STREAMS"] = int(extra["streams"])
        if self._cache:
            d = cache_dir(extra.get("cache_dir"), "openvino")
            d.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(d)
        if self.device.startswith("AUTO"):  # AUTO passes only the hints it knows to the device it picks
            config = {k: v for k, v in config.items() if k in ("PERFORMANCE_HINT", "CACHE_DIR", "INFERENCE_PRECISION_HINT")}
        return config

    def _compute_precision(self) -> str:
        """The float precision the layers run in: an int8 model's float layers run in bf16 where it is native.

        (Faster, and on the trained sanders model as accurate: the int8 gate is measured this way.)
        """
        if self.precision != "int8":
            return self.precision
        return "bf16" if "BF16" in device_capabilities(self.device) else "fp32"

    def _check_compiled(self) -> None:
        """A device that silently lowers the precision asked for is an error, not a surprise (AUTO included)."""
        try:
            hint = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        except Exception:
            return
        got = _OV_HINT_NAMES.get(hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint).lower())
        want = self._compute_precision()
        if got is not None and got != want:
            raise ConfigError(f"openvino: {self.device} runs {got} when asked for {want}; use {got} or fp32")

    # ------------------------------------------------------------------ run

    @property
    def loaded_from_cache(self) -> bool:
        try:
            return bool(self._compiled.get_property("LOADED_FROM_CACHE"))
        except Exception:
            return False

    def compiled_property(self, name: str) -> Any:
        """A property of the compiled model (``NUM_STREAMS``, ``INFERENCE_NUM_THREADS``, ...)."""
        return self._compiled.get_property(name)

    @property
    def providers(self) -> list[str]:
        """What really runs the model: the devices and the inference precision."""
        try:
            devs = list(self._compiled.get_property("EXECUTION_DEVICES"))
        except Exception:
            devs = [self.device]
        rest = f" (float layers {self._compute_precision()})" if self.precision == "int8" else ""
        return [f"OpenVINO {d} {self.precision}{rest}" for d in devs]

    def _parallel_requests(self) -> int:
        """Infer requests worth running at once: the compiled model's streams (1 under LATENCY)."""
        try:
            streams = int(self._compiled.get_property("NUM_STREAMS"))
        except Exception:  # (a device or AUTO that does not report streams: one call at a time)
            return 1
        return max(1, min(streams, int(self.options.max_batch) * 4, 64))

    @property
    def concurrency(self) -> int:
        return self._n_requests

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise BackendError(f"{self.name}: the backend is closed")
        check_feeds(feeds, self._inputs, backend=self.name)
        request = self._requests.get()  # a free infer request (as many as streams: calls beyond wait)
        try:
            res = request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()}, share_outputs=False)
        except Exception as exc:
            raise BackendError(f"{self.name}: inference failed: {exc}") from exc
        finally:
            self._requests.put_nowait(request)
        return {t.name: np.asarray(res[i]) for i, t in enumerate(self._outputs)}

    def close(self) -> None:
        self._closed = True
        while not self._requests.empty():  # the requests hold the compiled model's buffers
            self._requests.get_nowait()
        self._compiled = None


@hookimpl
def register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(OpenVinoBackend)


@hookimpl
def register_commands(cli) -> None:  # type: ignore[no-untyped-def]
    from ._ov_commands import gate, quantize

    cli.add_command(gate)
    cli.add_command(quantize)
