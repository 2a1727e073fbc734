"""ONNX Runtime backends: ``cpu`` (CPUExecutionProvider) and ``onnx-cuda`` (CUDA).

Both run any ONNX model (a UNet-328, the AVE audio encoder, ...): names, shapes
and dtypes are read from the session, and every feed is checked against them
before it reaches ONNX Runtime. One :meth:`run` is one ``session.run`` on the
whole batch.

Returned arrays never alias internal buffers: ``cpu`` returns what
``session.run`` allocated, ``onnx-cuda`` copies device outputs into fresh host
arrays. Callers own them and may keep them across calls.

Model variants (``precision="fp16"``, ``extra={"uint8_visual": True}``) are made
with :mod:`avatar.models.graph` and cached by content hash (see
:func:`prepare_model`).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from avatar.errors import BackendError, BackendUnavailable, ConfigError, ModelError
from avatar.hookspecs import hookimpl
from avatar.interfaces import Availability, BackendOptions, TensorInfo

from . import _ort_placement as placement
from ._common import (
    ListedTensorsBackend,
    check_extra,
    check_feeds,
    cuda_driver_status,
    fp16_gate,
    ort_log_severity,
    output_psnr,
    prepare_model,
    random_feeds,
)
from ._host_buffers import LeasedBuffers

log = logging.getLogger(__name__)

#: ONNX Runtime type strings -> numpy dtypes
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}

#: options in BackendOptions.extra understood by both ORT backends
_COMMON_EXTRA = {
    "uint8_visual": "feed the visual input as uint8 (normalised in the graph)",
    "cache_dir": "where converted models are cached",
    "fp16_min_psnr": "minimum PSNR (dB) of the fp16 model against fp32 at load (default 40; 0 skips the check)",
    "optimization": "ONNX Runtime graph optimisation level: all (default), extended, basic, disabled",
    "profile": "write an ONNX Runtime profile JSON with this file prefix",
    "spin": "whether idle intra-op threads spin waiting for work: 1 (ONNX Runtime's default) or 0 (they sleep and "
            "leave the cores to other threads; the thread budget's choice when sessions share the CPU)",
}
_CUDA_EXTRA = {
    "io_binding": "run with device buffers bound once per batch size (default True)",
    "batch_sizes": "batch sizes bound (and warmed up) at load, e.g. '1,4,8'; a smaller batch runs padded to the next (default: powers of two below max_batch, and max_batch)",
    "warmup": "run every bound batch size once at load, so cuDNN's algorithm search never stalls a stream (default True)",
    "cpu_fallback": "when ONNX Runtime places compute nodes on the CPU: warn (default), error, or off (skips the load-time check)",
    "staging": "host side of the bound copies: auto (default: pinned if it can), pinned, pageable",
    "alias_outputs": "return views of the page-locked output buffers (overwritten by the next run; they keep the buffers alive after close)",
    "cuda_stream": "an existing CUDA stream handle (int) ONNX Runtime should compute on",
    "cudnn_conv_algo_search": "EXHAUSTIVE (default), HEURISTIC or DEFAULT",
    "gpu_mem_limit": "bytes the CUDA arena may use",
    "tf32": "allow TF32 tensor-core math in fp32 convolutions (faster, ~1e-3 less exact; default False)",
}


def _ort():  # type: ignore[no-untyped-def]
    import onnxruntime

    onnxruntime.set_default_logger_severity(ort_log_severity())  # the process-wide logger (provider loading)
    return onnxruntime


def _tensor_infos(values: Sequence[Any]) -> list[TensorInfo]:
    out = []
    for v in values:
        dtype = _ORT_DTYPES.get(v.type)
        if dtype is None:
            raise ModelError(f"tensor '{v.name}' has type {v.type}, which avatar backends do not support")
        shape = tuple(d if isinstance(d, int) else (d or None) for d in v.shape)
        out.append(TensorInfo(v.name, shape, np.dtype(dtype)))
    return out


_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC", "disabled": "ORT_DISABLE_ALL"}


def session_options(options: BackendOptions):  # type: ignore[no-untyped-def]
    """SessionOptions for a backend: graph optimisation, threads, sequential execution."""
    ort = _ort()
    so = ort.SessionOptions()
    level = str(options.extra.get("optimization", "all"))
    if level not in _LEVELS:
        raise ConfigError(f"optimization must be one of {', '.join(_LEVELS)}, not {level!r}")
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if options.threads is not None:
        if int(options.threads) < 1:
            raise ConfigError(f"threads must be at least 1, not {options.threads}")
        so.intra_op_num_threads = int(options.threads)
        so.inter_op_num_threads = 1
    spin = str(options.extra.get("spin", "1"))
    if spin not in ("0", "1"):
        raise ConfigError(f"spin must be 0 or 1, not {spin!r}")
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if options.extra.get("profile"):
        so.enable_profiling = True
        so.profile_file_prefix = str(options.extra["profile"])
    so.log_severity_level = ort_log_severity()  # ORT's own lines go to stderr, past Python logging
    return so


# --------------------------------------------------------------------------- base


class _OrtBackend(ListedTensorsBackend):
    """Shared lifecycle of the ONNX Runtime backends."""

    provider: ClassVar[str]
    _extra: ClassVar[Mapping[str, str]] = _COMMON_EXTRA

    def __init__(self, model_path: str | Path, options: BackendOptions | None = None) -> None:
        super().__init__(model_path, options)
        opts = self.options
        check_extra(opts.extra, self._extra, self.name)
        if int(opts.max_batch) < 1:
            raise ConfigError(f"max_batch must be at least 1, not {opts.max_batch}")
        start = time.perf_counter()
        self.fp16_psnr: float | None = None
        self.model_file = prepare_model(
            self.model_path,
            precision=opts.precision,
            uint8_visual=bool(opts.extra.get("uint8_visual", False)),
            cache=opts.extra.get("cache_dir"),
        )
        self._session = self._make_session(self.model_file)
        self._check_providers()
        self._inputs = _tensor_infos(self._session.get_inputs())
        self._outputs = _tensor_infos(self._session.get_outputs())
        if opts.precision == "fp16":
            self._check_fp16()
        self._setup()
        self.stats.load_s = time.perf_counter() - start

    # -- hooks for subclasses
    def _providers(self) -> list[Any]:
        raise NotImplementedError

    def _setup(self) -> None:
        """Prepare run-time state once the session exists."""

    def _check_providers(self) -> None:
        got = self._session.get_providers()
        if self.provider not in got:
            raise BackendUnavailable(
                f"{self.name}: ONNX Runtime did not give the session {self.provider} (it got {', '.join(got)}); "
                f"use --backend cpu on this machine or fix the installation (see `avatar plugins`)"
            )

    # -- lifecycle
    def _make_session(self, path: Path):  # type: ignore[no-untyped-def]
        ort = _ort()
        try:
            return ort.InferenceSession(str(path), sess_options=session_options(self.options), providers=self._providers())
        except (ConfigError, BackendError):
            raise
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/RuntimeError types
            raise BackendError(f"{self.name}: ONNX Runtime cannot load {path}: {exc}") from exc

    def _check_fp16(self) -> None:
        """Compare the fp16 session with fp32 on a seeded random batch; refuse a bad conversion."""
        limit = float(self.options.extra.get("fp16_min_psnr", 40.0))
        if limit <= 0:
            return
        ref_path = self.model_path
        if self.options.extra.get("uint8_visual"):
            ref_path = prepare_model(self.model_path, precision="fp32", uint8_visual=True, cache=self.options.extra.get("cache_dir"))
        ref = self._make_session(ref_path)
        feeds = random_feeds(self._inputs, batch=min(2, int(self.options.max_batch)), seed=0)
        want = ref.run(None, feeds)
        got = self._session.run(None, feeds)
        del ref
        self.fp16_psnr = output_psnr(want, got)
        log.info("%s: fp16 model PSNR against fp32: %.1f dB", self.name, self.fp16_psnr)
        fp16_gate(self.name, self.model_path, self.fp16_psnr, limit)

    @property
    def providers(self) -> list[str]:
        """Providers the session really got (``session.get_providers()``)."""
        return list(self._session.get_providers())

    def _max_batch(self) -> int | None:
        return None

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise BackendError(f"{self.name}: the backend is closed")
        check_feeds(feeds, self._inputs, max_batch=self._max_batch(), backend=self.name)
        try:
            outs = self._session.run(None, dict(feeds))
        except Exception as exc:
            raise BackendError(f"{self.name}: inference failed: {exc}") from exc
        return {t.name: o for t, o in zip(self._outputs, outs)}

    def close(self) -> None:
        self._session = None


# --------------------------------------------------------------------------- cpu


class CpuBackend(_OrtBackend):
    """ONNX Runtime on the CPU: works everywhere; the reference for the other backends."""

    name = "cpu"
    description = "ONNX Runtime CPUExecutionProvider (works everywhere)"
    priority = 10  # auto's last resort
    provider = "CPUExecutionProvider"

    def _providers(self) -> list[Any]:
        return ["CPUExecutionProvider"]


# --------------------------------------------------------------------------- onnx-cuda


@functools.lru_cache(maxsize=1)
def _cuda_provider_status() -> Availability:
    """Cheap (``avatar plugins`` asks every backend): installed, CUDA provider listed, a driver with a GPU.

    It does not load the CUDA provider library (that pulls in the CUDA
    runtime, cuBLAS and cuDNN: seconds and hundreds of MB); the backend does
    that when it loads (:func:`_cuda_provider_loads`).
    """
    if importlib.util.find_spec("onnxruntime") is None:
        return Availability(False, "onnxruntime-gpu is not installed", "pip install onnxruntime-gpu")
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return Availability(
            False,
            f"the installed ONNX Runtime ({ort.__version__}) has no CUDAExecutionProvider (it is the CPU build)",
            "pip uninstall -y onnxruntime && pip install onnxruntime-gpu",
        )
    ok, reason, _ = cuda_driver_status()
    if not ok:
        return Availability(False, f"onnxruntime-gpu is installed but {reason}")
    return Availability.ok()


@functools.lru_cache(maxsize=1)
def _cuda_provider_loads() -> Availability:
    """The real check, at load: the CUDA provider library and its CUDA/cuDNN libraries load."""
    ort = _ort()
    if hasattr(ort, "preload_dlls"):  # finds CUDA/cuDNN in the nvidia-* pip packages
        try:
            ort.preload_dlls()
        except Exception as exc:  # best effort: system libraries may still be found
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    lib = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if lib.is_file():
        try:
            ctypes.CDLL(str(lib))
        except OSError as exc:
            return Availability(
                False,
                f"onnxruntime-gpu and the driver are present but its CUDA provider cannot load: {exc}",
                "pip install 'onnxruntime-gpu[cuda,cudnn]'",
            )
    return Availability.ok()


def batch_sizes(spec: Any, top: int) -> list[int]:
    """The batch sizes ``onnx-cuda`` binds: ``spec`` ('1,4,8', a list, an int) or powers of two and ``top``."""
    if spec is None:
        sizes = {1 << i for i in range(top.bit_length()) if 1 << i < top} | {top}
    else:
        items = str(spec).split(",") if isinstance(spec, (str, int)) else list(spec)
        try:
            sizes = {int(str(x).strip()) for x in items if str(x).strip()}
        except ValueError:
            raise ConfigError(f"batch_sizes must be comma-separated integers, not {spec!r}") from None
        if not sizes or min(sizes) < 1 or max(sizes) > top:
            raise ConfigError(f"batch_sizes must lie in 1..max_batch={top}, got {sorted(sizes)}")
        sizes.add(top)
    return sorted(sizes)


def cuda_provider_options(options: BackendOptions, stream: int | None = None) -> dict[str, str]:
    """CUDAExecutionProvider options from backend options (all values as strings).

    ``stream``: the handle ORT should compute on (the staging stream); the
    ``cuda_stream`` option, when given, is that stream already.
    """
    extra = options.extra
    po: dict[str, str] = {
        "device_id": str(int(options.device_id)),
        "cudnn_conv_algo_search": str(extra.get("cudnn_conv_algo_search", "EXHAUSTIVE")),
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
        "arena_extend_strategy": "kSameAsRequested",
        # ORT enables TF32 by default on Ampere and newer; fp32 should mean fp32 unless asked
        "use_tf32": "1" if extra.get("tf32", False) else "0",
    }
    if po["cudnn_conv_algo_search"] not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        raise ConfigError(f"cudnn_conv_algo_search must be EXHAUSTIVE, HEURISTIC or DEFAULT, not {po['cudnn_conv_algo_search']!r}")
    if extra.get("gpu_mem_limit") is not None:
        po["gpu_mem_limit"] = str(int(extra["gpu_mem_limit"]))
    if stream is None and extra.get("cuda_stream") is not None:
        stream = int(extra["cuda_stream"])
    if stream is not None:
        po["has_user_compute_stream"] = "1"
        po["user_compute_stream"] = str(int(stream))
    return po


def _batched(t: TensorInfo) -> bool:
    """Whether the tensor's first axis is the (dynamic) batch axis; caches and scalars beside it are not."""
    return bool(t.shape) and not isinstance(t.shape[0], int)


def _dims(t: TensorInfo, batch: int) -> list[int]:
    """The tensor's shape for a run of ``batch`` items (fixed-size tensors keep their size)."""
    return [batch, *t.shape[1:]] if _batched(t) else list(t.shape)


class _Binding:
    """Device buffers for one batch size, bound once and reused for every run of that size."""

    def __init__(
        self, session: Any, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo], batch: int, device: str, device_id: int
    ) -> None:
        ort = _ort()
        self.batch = batch
        self.binding = session.io_binding()
        self.in_values: dict[str, Any] = {}
        self.out_values: dict[str, Any] = {}
        for t in inputs:
            v = ort.OrtValue.ortvalue_from_shape_and_type(_dims(t, batch), t.dtype, device, device_id)
            self.binding.bind_ortvalue_input(t.name, v)
            self.in_values[t.name] = v
        for t in outputs:
            if all(isinstance(d, int) for d in t.shape[1:]):
                v = ort.OrtValue.ortvalue_from_shape_and_type(_dims(t, batch), t.dtype, device, device_id)
                self.binding.bind_ortvalue_output(t.name, v)
                self.out_values[t.name] = v
            else:  # shape known only after the run: let ORT allocate on the device
                self.binding.bind_output(t.name, device, device_id)


class OnnxCudaBackend(_OrtBackend):
    """ONNX Runtime with the CUDAExecutionProvider, device buffers bound with IO binding.

    Input and output tensors are allocated on the GPU and bound to an IO
    binding at load for a few batch sizes (``batch_sizes``: powers of two
    and ``max_batch``), and each is run once (``warmup``), so cuDNN's algorithm
    search and the arena growth happen at load: live input produces arbitrary
    partial batches, and a new shape mid-stream would stall it. A batch runs
    on the smallest bound size that holds it; only its rows are copied in and
    out (the model computes the padding rows too, and every UNet-328 and audio
    encoder treats batch rows independently). The host side is a set
    of page-locked staging buffers sized for ``max_batch`` and one CUDA stream
    that ONNX Runtime also computes on (see :mod:`._cuda_staging`): a run
    copies the batch into staging, queues the H2D copies, the model and the
    D2H copies on that stream, and synchronises once.

    ``staging="pageable"`` (or ``auto`` where ``cuda-bindings`` cannot run)
    lets ONNX Runtime copy from and to ordinary numpy memory instead.
    """

    name = "onnx-cuda"
    description = "ONNX Runtime CUDAExecutionProvider with IO binding (NVIDIA GPU)"
    priority = 100  # auto's first choice where a GPU is usable
    provider = "CUDAExecutionProvider"
    _extra = {**_COMMON_EXTRA, **_CUDA_EXTRA}
    #: where bound buffers live (ONNX Runtime device name)
    _device_type: ClassVar[str] = "cuda"

    @classmethod
    def availability(cls) -> Availability:
        return _cuda_provider_status()

    def __init__(self, model_path: str | Path, options: BackendOptions | None = None) -> None:
        a = self.availability()
        if a.usable:
            a = self._loads()
        if not a.usable:
            fix = f"; install with `{a.install}`" if a.install else ""
            raise BackendUnavailable(f"onnx-cuda is unavailable: {a.reason}{fix}")
        opts = options or BackendOptions()
        check_extra(opts.extra, self._extra, self.name)
        if str(opts.extra.get("cpu_fallback", "warn")) not in ("warn", "error", "off"):
            raise ConfigError(f"cpu_fallback must be warn, error or off, not {opts.extra['cpu_fallback']!r}")
        self._bindings: dict[int, _Binding] = {}
        self._lock = threading.Lock()  # bound buffers are shared: one run at a time
        self._host: dict[str, np.ndarray] = {}
        self._io = bool(opts.extra.get("io_binding", True))
        self._alias = bool(opts.extra.get("alias_outputs", False))
        self._staging = self._open_staging(opts) if self._io else None
        # aliased outputs may outlive close(): staging is freed when the last one is gone
        self._leases = LeasedBuffers(self._staging.close, "onnx-cuda staging") if self._staging is not None else None
        self._staged = False
        self._sizes: list[int] = []
        self._batched: set[str] = set()
        #: nodes per execution provider, as ONNX Runtime placed them at load ({} when not checked)
        self.node_placement: dict[str, int] = {}
        try:
            super().__init__(model_path, opts)
        except BaseException:
            self._close_staging()
            raise

    def _open_staging(self, opts: BackendOptions) -> Any:
        """Page-locked staging and its stream, or ``None`` for ORT's own pageable copies."""
        mode = str(opts.extra.get("staging", "auto"))
        if mode not in ("auto", "pinned", "pageable"):
            raise ConfigError(f"staging must be auto, pinned or pageable, not {mode!r}")
        if mode == "pageable":
            return None
        stream = opts.extra.get("cuda_stream")
        try:
            return self._new_staging(int(opts.device_id), None if stream is None else int(stream))
        except BackendUnavailable as exc:
            if mode == "pinned":
                raise
            log.warning("%s; onnx-cuda copies through pageable memory (slower)", exc)
            return None

    @classmethod
    def _loads(cls) -> Availability:
        return _cuda_provider_loads()

    def _check_providers(self) -> None:
        super()._check_providers()
        self._check_placement(self.model_file)

    def _check_placement(self, path: Path) -> None:
        """Warn (or fail) when ONNX Runtime placed compute nodes on the CPU instead of CUDA.

        ONNX Runtime says which provider runs each node only in its VERBOSE log,
        and a session's log level is fixed for its lifetime (at VERBOSE every
        new shape logs pages at run time). So a probe session with the same
        options is created at VERBOSE with stderr captured, its "Node
        placements" block parsed, and the probe dropped: one more session
        creation at load (``cpu_fallback="off"`` skips it).
        """
        mode = str(self.options.extra.get("cpu_fallback", "warn"))
        if mode == "off":
            return
        so = session_options(self.options)
        so.log_severity_level = 0
        try:
            with placement.capture_stderr() as captured:
                probe = _ort().InferenceSession(str(path), sess_options=so, providers=self._providers())
        except Exception as exc:  # the same options just made the real session: unexpected, but one line
            raise BackendError(f"{self.name}: the node-placement probe session failed: {exc}; pass cpu_fallback=off") from exc
        del probe
        placements = placement.node_placements(captured.text)
        self.node_placement = {k: n for k, (n, _) in placements.items()}
        if not placements:  # ONNX Runtime changed its log: say so rather than pretend all is well
            log.warning("%s: could not read ONNX Runtime's node placement; CPU fallbacks go unreported", self.name)
            return
        found = placement.cpu_fallbacks(placements, self.provider)
        if found is None:
            log.debug("%s: node placement %s", self.name, self.node_placement)
            return
        total = sum(n for n, _ in placements.values())
        msg = (
            f"{self.name}: ONNX Runtime runs {placement.describe(*found, total)} of {Path(path).name} on the CPU, "
            f"not on {self.provider} (it has no kernel for them there); each costs a device round trip per run"
        )
        if mode == "error":
            raise BackendError(msg + "; try the tensorrt backend, or pass cpu_fallback=warn to run anyway")
        log.warning("%s", msg)

    def _new_staging(self, device_id: int, stream: int | None) -> Any:
        from ._cuda_staging import PinnedStaging

        return PinnedStaging(device_id, stream)

    @property
    def staging(self) -> str:
        """``pinned`` (page-locked staging, one stream), ``pageable`` or ``none`` (no IO binding)."""
        if not self._io:
            return "none"
        return str(self._staging.kind) if self._staged else "pageable"

    def _providers(self) -> list[Any]:
        stream = self._staging.stream if self._staging is not None else None
        return [("CUDAExecutionProvider", cuda_provider_options(self.options, stream)), "CPUExecutionProvider"]

    def _setup(self) -> None:
        if not self._io:
            return
        top = int(self.options.max_batch)
        tensors = [*self._inputs, *self._outputs]
        self._staged = self._staging is not None and all(all(isinstance(d, int) for d in t.shape[1:]) for t in tensors)
        if self._staging is not None and not self._staged:
            # the stream stays (the session computes on it); only the copies go through ORT
            log.info("%s: an output's shape is known only after the run; ORT copies it (pageable)", self.name)
        if self._staged:
            self._host = {t.name: self._staging.empty(_dims(t, top), t.dtype) for t in tensors}
        self._batched = {t.name for t in tensors if _batched(t)}
        # a model without a batch axis (every input fixed) runs in one binding
        self._sizes = batch_sizes(self.options.extra.get("batch_sizes"), top) if self._batched else [top]
        for n in self._sizes:
            b = _Binding(self._session, self._inputs, self._outputs, n, self._device_type, int(self.options.device_id))
            self._bindings[n] = b
            if self.options.extra.get("warmup", True):
                # the buffers hold whatever was there: the values do not matter, the shapes do
                self._session.run_with_iobinding(b.binding)
        if self._staged and self.options.extra.get("warmup", True):
            self._staging.synchronize()

    def _max_batch(self) -> int | None:
        return int(self.options.max_batch) if self._io else None

    def _binding_for(self, batch: int) -> _Binding:
        """The bound buffers a batch of ``batch`` runs in: the smallest bound size that holds it."""
        return self._bindings[next(n for n in self._sizes if n >= batch)]

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._io:
            return super()._run(feeds)
        if self._session is None:
            raise BackendError(f"{self.name}: the backend is closed")
        batch = check_feeds(feeds, self._inputs, max_batch=self._max_batch(), backend=self.name)
        with self._lock:
            try:
                if self._staged:
                    return self._run_staged(feeds, batch)
                return self._run_pageable(feeds, batch)
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(f"{self.name}: inference failed: {exc}") from exc

    def _run_staged(self, feeds: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        b = self._binding_for(batch)
        st = self._staging
        st.bind_thread()
        for name, value in b.in_values.items():
            host = self._rows(name, batch)  # only the real rows cross; padding rows keep old values
            np.copyto(host, feeds[name])
            st.to_device(value.data_ptr(), host)
        self._session.run_with_iobinding(b.binding)  # on the staging stream, after the copies
        views = {}
        for name, value in b.out_values.items():
            views[name] = self._rows(name, batch)
            st.to_host(views[name], value.data_ptr())
        st.synchronize()
        if self._alias and self._leases is not None:
            return {name: self._leases.lend(v) for name, v in views.items()}
        return {name: v.copy() for name, v in views.items()}

    def _rows(self, name: str, batch: int) -> np.ndarray:
        """The part of a staging buffer a run of ``batch`` items uses."""
        return self._host[name][:batch] if name in self._batched else self._host[name]

    def _run_pageable(self, feeds: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        b = self._binding_for(batch)
        pad = b.batch - batch
        for name, value in b.in_values.items():
            arr = np.ascontiguousarray(feeds[name])
            if pad and name in self._batched:  # pad with copies of the last row (finite values)
                arr = np.concatenate([arr, np.repeat(arr[-1:], pad, axis=0)])
            value.update_inplace(arr)
        b.binding.synchronize_inputs()
        self._session.run_with_iobinding(b.binding)
        b.binding.synchronize_outputs()

        def real(name: str, arr: np.ndarray) -> np.ndarray:
            return arr[:batch] if pad and name in self._batched else arr

        if len(b.out_values) == len(self._outputs):
            # numpy() copies device memory to a new array, but views CPU memory: copy that
            own = self._device_type == "cpu"
            return {name: real(name, v.numpy()).copy() if own else real(name, v.numpy()) for name, v in b.out_values.items()}
        return {t.name: real(t.name, o) for t, o in zip(self._outputs, b.binding.copy_outputs_to_cpu())}

    def _close_staging(self) -> None:
        self._host, self._staged = {}, False
        if self._leases is not None:
            self._leases.close()  # frees the staging now, or once the last aliased output is gone
            self._leases = None
        self._staging = None

    def close(self) -> None:
        with self._lock:
            self._bindings.clear()
            super().close()
            self._close_staging()


@hookimpl
def register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(CpuBackend)
    register(OnnxCudaBackend)
