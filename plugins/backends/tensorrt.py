"""The ``tensorrt`` backend: a cached TensorRT engine run with pycuda buffers.

Extra: ``pip install 'avatar-sdk[tensorrt]' --extra-index-url https://pypi.nvidia.com``.
This module imports neither TensorRT nor pycuda at import time, so the plugin
always registers and ``avatar plugins`` can say what is missing.

Engines are built from the ONNX model once per (model content, GPU model,
compute capability, TensorRT version, build options) and cached on disk, so a
second start only deserialises (about a second). Builds share a timing cache.
A build holds a lock file beside its engine, so processes that need the same
engine at once build it once: the others wait, then load it.

Run-time design (the why):

* pycuda uses the device's **primary** context (``retain_primary_context``),
  never ``pycuda.autoinit``: autoinit creates a private context, and ONNX
  Runtime, PyTorch and the CUDA runtime inside TensorRT all use the primary
  one; two contexts on one GPU do not share memory or streams. It is retained
  once per device and process and never detached: pycuda's ``detach()`` of a
  primary context that is not current pushes it and releases it without a pop
  (``cuDevicePrimaryCtxRelease`` never pops), which left a stale entry on the
  thread's context stack after every ``close()``.
* The context is pushed before and popped after every call (load, run, close),
  so the backend works from whichever worker thread the engine runs it on.
* Host staging buffers are page-locked (``pagelocked_empty``) so the copies
  are truly asynchronous; device buffers are sized from the optimisation
  profile's max shapes and bound once (``set_tensor_address``). A run is
  H2D copies, ``execute_async_v3`` and D2H copies on one stream the backend
  owns, then one synchronise.
* ``run`` returns copies the caller owns. With ``extra={"alias_outputs": True}``
  it returns views of the page-locked output buffers instead (no copy); they
  are overwritten by the next ``run`` of this backend, and keep the page-locked
  buffers alive after ``close()`` until the last of them is gone.
* A cached engine is used when its profile covers the requested batch
  (:func:`find_covering_engine`), so ``avatar build-engine``'s batch-16 engine
  serves ``avatar run --batch 8``.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import click
import numpy as np

from avatar.errors import BackendError, BackendUnavailable, ConfigError, ModelError
from avatar.hookspecs import hookimpl
from avatar.interfaces import Availability, BackendOptions, TensorInfo

from ._common import (
    ListedTensorsBackend,
    cache_dir,
    check_extra,
    check_feeds,
    cuda_driver_status,
    file_sha256,
    fp16_gate,
    output_psnr,
    prepare_model,
    random_feeds,
)
from ._host_buffers import LeasedBuffers
from ._trt_engine_cache import (
    atomic_write,
    INSTALL,
    BuildOptions,
    DeviceIdentity,
    buffer_plan,
    build_lock,
    cached_or_build,
    check_shape,
    engine_cache_key,
    engine_path,
    find_covering_engine,
    have_module,
    missing_parts,
    profile_shapes,
    recorded,
    timing_cache_path,
    unavailable_message,
)

log = logging.getLogger(__name__)

_EXTRA = {
    "cache_dir": "where engines and the timing cache are kept",
    "opt_batch": "batch size an engine built here is tuned for (default max_batch); a cached engine must be tuned for it when given",
    "profile_max_batch": "largest batch of an engine built here (default max_batch); any cached engine whose profile covers max_batch is used",
    "workspace_mb": "builder workspace limit in MiB (default 4096)",
    "uint8_visual": "feed the visual input as uint8 (normalised in the graph)",
    "tf32": "allow TF32 tensor-core math in fp32 layers (faster, ~1e-3 less exact; default False)",
    "alias_outputs": "return views of the page-locked output buffers (overwritten by the next run; they keep the buffers alive after close)",
    "rebuild": "ignore a cached engine and build again",
    "fp16_min_psnr": "minimum PSNR (dB) of an fp16 engine against the fp32 model on CPU, measured once per engine (default 40; 0 skips)",
}


# --------------------------------------------------------------------------- availability


@functools.lru_cache(maxsize=1)
def _status() -> Availability:
    ok, why, _ = cuda_driver_status()
    parts = missing_parts(have_tensorrt=have_module("tensorrt"), have_pycuda=have_module("pycuda"), driver=(ok, why))
    if parts:
        needs_install = any("not installed" in p for p in parts)
        return Availability(False, "; ".join(parts), INSTALL if needs_install else None)
    # Everything is there on paper; import for real (the PyPI stub installs but does not import).
    for mod in ("tensorrt", "pycuda.driver"):
        try:
            __import__(mod)
        except Exception as exc:
            return Availability(False, f"{mod} is installed but does not import ({exc.__class__.__name__}: {exc})", INSTALL)
    return Availability.ok()


def require() -> None:
    """Raise :class:`BackendUnavailable` with one line when TensorRT cannot run here."""
    a = _status()
    if not a.usable:
        raise BackendUnavailable(unavailable_message(a.reason, a.install))


# --------------------------------------------------------------------------- device helpers


#: device id -> its primary context, retained once per process (see the module docstring)
_RETAINED: dict[int, Any] = {}
_RETAIN_LOCK = threading.Lock()


class _PrimaryContext:
    """The GPU's primary CUDA context, pushed for the duration of a ``with`` block.

    The context is retained once per device and process and never detached:
    ONNX Runtime, PyTorch and TensorRT's CUDA runtime keep the primary context
    alive for the process anyway, and pycuda's ``detach()`` of a primary
    context leaves it on the thread's driver context stack whatever the order
    (``cuDevicePrimaryCtxRelease`` does not pop), a fault in a long-running
    server that opens and closes backends. Balanced push/pop is all we do.
    """

    def __init__(self, device_id: int) -> None:
        import pycuda.driver as cuda

        cuda.init()
        if device_id >= cuda.Device.count():
            raise ConfigError(f"device_id {device_id} does not exist; this machine has {cuda.Device.count()} GPU(s)")
        self.device = cuda.Device(device_id)
        with _RETAIN_LOCK:
            if device_id not in _RETAINED:
                _RETAINED[device_id] = self.device.retain_primary_context()
            self.ctx = _RETAINED[device_id]

    def __enter__(self) -> "_PrimaryContext":
        self.ctx.push()
        return self

    def __exit__(self, *exc: object) -> None:
        import pycuda.driver as cuda

        cuda.Context.pop()

    def identity(self) -> DeviceIdentity:
        import tensorrt as trt

        return DeviceIdentity(self.device.name(), tuple(self.device.compute_capability()), trt.__version__)  # type: ignore[arg-type]


def _trt_logger():  # type: ignore[no-untyped-def]
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


# --------------------------------------------------------------------------- engine building


def build_engine(
    model_path: str | Path,
    build: BuildOptions,
    *,
    cache: str | Path | None = None,
    device_id: int = 0,
    rebuild: bool = False,
) -> Path:
    """Return the cached engine for ``model_path`` and exactly ``build``, building it if needed."""
    require()
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelError(f"model file not found: {model_path}")
    pc = _PrimaryContext(device_id)
    with pc:
        return _build_in_context(model_path, build, cache_dir(cache, "engines"), pc.identity(), rebuild, cache)


def _build_in_context(
    model_path: Path, build: BuildOptions, folder: Path, device: DeviceIdentity, rebuild: bool, cache: Any,
    cover: tuple[int, bool] | None = None,
) -> Path:  # fmt: skip
    """The engine file for ``build``: a covering cached one, the exact cached one, or a new build.

    ``cover``: ``(largest batch the caller runs, whether opt_batch was asked
    for)``; when given, a cached engine whose profile covers that batch is
    used (:func:`find_covering_engine`) before anything is built.
    """
    sha = file_sha256(model_path)
    if cover is not None and not rebuild:
        need, exact_opt = cover
        found = find_covering_engine(
            folder, model_path, sha, device, build, batch=need, opt_batch=build.opt_batch if exact_opt else None
        )
        if found is not None:
            log.info("using cached TensorRT engine %s (its profile covers batch %d)", found, need)
            return found
    key = engine_cache_key(sha, device, build)
    out = engine_path(folder, model_path, key)
    # One process builds while any other that wants the same engine waits on the lock, then finds it.
    make = functools.partial(_build_engine_file, model_path, build, folder, device, key, out, cache)
    _, built = cached_or_build(out, make, rebuild)
    if not built:
        log.info("using cached TensorRT engine %s", out)
    return out


def _build_engine_file(
    model_path: Path, build: BuildOptions, folder: Path, device: DeviceIdentity, key: str, out: Path, cache: Any
) -> None:
    """Build the engine into ``out``, with its meta json and the shared timing cache (called under the build lock)."""
    import tensorrt as trt

    # fp16 comes from our own fp16 ONNX graph built as a strongly typed network, not from
    # BuilderFlag.FP16: TensorRT 11 removed the weak-typing flags, and this way TensorRT and
    # onnx-cuda run the same fp16 graph.
    source = prepare_model(model_path, precision=build.precision, uint8_visual=build.uint8_visual, cache=cache)
    logger = _trt_logger()
    builder = trt.Builder(logger)
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network((1 << int(strong)) if strong is not None else 0)  # always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {model_path}: {errors}")
    inputs = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = tuple(int(d) if int(d) >= 0 else None for d in t.shape)
        inputs.append(TensorInfo(t.name, dims, np.dtype(trt.nptype(t.dtype))))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(build.workspace_mb) << 20)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None and not build.tf32:
        config.clear_flag(tf32)  # TF32 is on by default; fp32 should mean fp32 unless asked
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(inputs, build).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    tc_file = timing_cache_path(folder, device)
    timing = config.create_timing_cache(tc_file.read_bytes() if tc_file.is_file() else b"")
    config.set_timing_cache(timing, False)
    start = time.perf_counter()
    log.warning("building a TensorRT engine for %s (%s, batch up to %d); this takes minutes once", model_path.name, build.precision, build.max_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine for {model_path}; run with -vv for the builder log")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(out, bytes(serialized))
    # Builds of other engines (fp32 beside fp16, another model) share this file: merge, don't overwrite.
    with build_lock(tc_file):
        merged = config.create_timing_cache(tc_file.read_bytes() if tc_file.is_file() else b"")
        merged.combine(config.get_timing_cache(), True)  # ignore_mismatch: keep what still applies
        atomic_write(tc_file, bytes(merged.serialize()))
    meta = {"model": str(model_path), "key": key, "device": asdict(device), "build": asdict(build),
            "build_s": round(time.perf_counter() - start, 1)}  # fmt: skip
    atomic_write(out.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    log.warning("TensorRT engine built in %.0f s: %s", meta["build_s"], out)


def build_options_from(options: BackendOptions) -> BuildOptions:
    """The engine a backend builds when no cached engine covers its ``max_batch``."""
    extra = options.extra
    need = int(options.max_batch)
    opt = int(extra.get("opt_batch", need))
    max_b = int(extra.get("profile_max_batch", max(need, opt)))
    if max_b < need:
        raise ConfigError(f"profile_max_batch={max_b} is smaller than max_batch={need}; the engine must accept every batch run")
    return BuildOptions(
        precision=options.precision,
        min_batch=1,
        opt_batch=opt,
        max_batch=max_b,
        workspace_mb=int(extra.get("workspace_mb", 4096)),
        uint8_visual=bool(extra.get("uint8_visual", False)),
        tf32=bool(extra.get("tf32", False)),
    )


# --------------------------------------------------------------------------- backend


class TensorRTBackend(ListedTensorsBackend):
    """Runs a cached TensorRT engine with page-locked host and fixed device buffers."""

    name = "tensorrt"
    description = "TensorRT engine (cached per GPU and TensorRT version) with pycuda buffers"

    @classmethod
    def availability(cls) -> Availability:
        return _status()

    def __init__(self, model_path: str | Path, options: BackendOptions | None = None) -> None:
        super().__init__(model_path, options)
        require()
        check_extra(self.options.extra, _EXTRA, self.name)
        build = build_options_from(self.options)
        self._alias = bool(self.options.extra.get("alias_outputs", False))
        self._lock = threading.Lock()
        self._closed = False
        self.fp16_psnr: float | None = None
        start = time.perf_counter()
        self._pc = _PrimaryContext(int(self.options.device_id))
        try:
            with self._pc:
                self.engine_file = _build_in_context(
                    self.model_path, build, cache_dir(self.options.extra.get("cache_dir"), "engines"),
                    self._pc.identity(), bool(self.options.extra.get("rebuild", False)), self.options.extra.get("cache_dir"),
                    cover=(int(self.options.max_batch), "opt_batch" in self.options.extra),
                )  # fmt: skip
                self._load(self.engine_file)
                self.fp16_psnr = self._check_fp16(build)
        except BaseException:
            self._free()
            raise
        self.stats.load_s = time.perf_counter() - start

    def _check_fp16(self, build: BuildOptions) -> float | None:
        """Refuse an fp16 engine whose output strays from the fp32 model (as ``onnx-cuda`` does).

        The reference is the ``cpu`` backend on the fp32 model; the PSNR is
        measured on a seeded random batch the first time an engine loads and
        recorded in its meta json.
        """
        limit = float(self.options.extra.get("fp16_min_psnr", 40.0))
        if build.precision != "fp16" or limit <= 0:
            return None

        def measure() -> float:
            from .ort import CpuBackend

            feeds = random_feeds(self._inputs, batch=min(2, self._max_batch), seed=0)
            got = self._run(feeds)
            ref_opts = BackendOptions(extra={"uint8_visual": build.uint8_visual, "cache_dir": self.options.extra.get("cache_dir")})
            with CpuBackend(self.model_path, ref_opts) as ref:
                want = ref.run(feeds)
            return output_psnr([want[t.name] for t in self._outputs], [got[t.name] for t in self._outputs])

        measured = recorded(self.engine_file.with_suffix(".json"), "fp16_psnr_vs_fp32", measure)
        log.info("tensorrt: fp16 engine PSNR against fp32: %.1f dB", measured)
        fp16_gate(self.name, self.model_path, measured, limit)
        return measured

    def _load(self, engine_file: Path) -> None:
        import pycuda.driver as cuda
        import tensorrt as trt

        self._runtime = trt.Runtime(_trt_logger())
        self._engine = self._runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self._engine is None:
            raise BackendError(
                f"TensorRT cannot load the cached engine {engine_file} (corrupt, or built by another TensorRT); "
                "delete it or pass extra={'rebuild': True}"
            )
        self._context = self._engine.create_execution_context()
        self._inputs: list[TensorInfo] = []
        self._outputs: list[TensorInfo] = []
        self._ranges: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(int(d) if int(d) >= 0 else None for d in self._engine.get_tensor_shape(name))
            info = TensorInfo(name, shape, dtype)
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                lo, _opt, hi = self._engine.get_tensor_profile_shape(name, 0)
                self._ranges[name] = (tuple(int(d) for d in lo), tuple(int(d) for d in hi))
                self._set_input_shape(name, self._ranges[name][1])
                self._inputs.append(info)
            else:
                self._outputs.append(info)
        self._max_batch = min(hi[0] for _, hi in self._ranges.values())
        # with every input at its profile max, the context knows each output's max shape
        max_shapes = {t.name: (self._ranges[t.name][1], t.dtype) for t in self._inputs}
        for t in self._outputs:
            max_shapes[t.name] = (tuple(int(d) for d in self._context.get_tensor_shape(t.name)), t.dtype)
        self.buffer_bytes = buffer_plan(max_shapes)
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, Any] = {}
        for name, (shape, dtype) in max_shapes.items():
            self._host[name] = cuda.pagelocked_empty(shape, dtype)
            self._device[name] = cuda.mem_alloc(self.buffer_bytes[name])
            if not self._context.set_tensor_address(name, int(self._device[name])):
                raise BackendError(f"tensorrt: TensorRT refused the device address of tensor '{name}'; run with -vv for the TensorRT log")
        # aliased outputs may outlive close(): the page-locked buffers are freed when the last one is gone
        self._leases = LeasedBuffers(functools.partial(self._free_host, dict(self._host)), "tensorrt page-locked buffers")
        self._stream = cuda.Stream()

    def _set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """``set_input_shape``, whose ``False`` (a shape the profile rejects) must not pass silently."""
        if not self._context.set_input_shape(name, tuple(int(d) for d in shape)):
            lo, hi = self._ranges[name]
            raise BackendError(
                f"tensorrt: the engine rejected shape {tuple(shape)} for input '{name}' "
                f"(optimisation profile 0 accepts {lo} to {hi}); run with -vv for the TensorRT log"
            )

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pycuda.driver as cuda

        if self._closed:
            raise BackendError("tensorrt: the backend is closed")
        batch = check_feeds(feeds, self._inputs, max_batch=self._max_batch, backend=self.name)
        for t in self._inputs:
            check_shape(t.name, feeds[t.name].shape, *self._ranges[t.name])
        with self._lock, self._pc:
            stream = self._stream
            for t in self._inputs:
                host = self._host[t.name][:batch]
                np.copyto(host, feeds[t.name])
                self._set_input_shape(t.name, host.shape)
                cuda.memcpy_htod_async(self._device[t.name], host, stream)
            if not self._context.execute_async_v3(stream.handle):
                raise BackendError("tensorrt: execute_async_v3 failed; run with -vv for the TensorRT log")
            views = {}
            for t in self._outputs:
                n = int(self._context.get_tensor_shape(t.name)[0])
                view = self._host[t.name][:n]
                cuda.memcpy_dtoh_async(view, self._device[t.name], stream)
                views[t.name] = view
            stream.synchronize()
            if self._alias:
                return {k: self._leases.lend(v) for k, v in views.items()}
        return {k: v.copy() for k, v in views.items()}

    def _free_host(self, host: Mapping[str, np.ndarray]) -> None:
        """Free page-locked buffers (on close, or when the last aliased output dies, on any thread)."""
        with self._pc:
            for arr in host.values():
                free = getattr(arr.base, "free", None)  # the HostAllocation behind pagelocked_empty
                if free is not None:
                    free()

    def _free(self) -> None:
        """Release the engine and device memory now, the host buffers once no aliased output is alive."""
        with self._pc:
            for mem in getattr(self, "_device", {}).values():
                mem.free()
            self._device = {}
            self._context = self._engine = self._runtime = None
            self._stream = None
        host, self._host = getattr(self, "_host", {}), {}
        leases = getattr(self, "_leases", None)
        if leases is not None:
            leases.close()
        else:  # _load failed before the buffers were leased
            self._free_host(host)

    def close(self) -> None:
        if self._closed or not hasattr(self, "_pc"):
            return
        self._closed = True
        with self._lock:
            self._free()


# --------------------------------------------------------------------------- CLI


@click.command("build-engine")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--fp16", is_flag=True, help="Build from the float16 graph (inputs and outputs stay float32).")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=16, show_default=True, help="Largest batch the engine accepts.")
@click.option("--opt-batch", type=click.IntRange(1, 1024), default=None, help="Batch size to tune for (default: --max-batch).")
@click.option("--uint8-visual", is_flag=True, help="Take the visual input as uint8 (normalised in the graph).")
@click.option("--tf32", is_flag=True, help="Allow TF32 math in fp32 layers (faster, slightly less exact).")
@click.option("--workspace-mb", type=click.IntRange(16), default=4096, show_default=True, help="Builder workspace limit.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Engine cache folder (default ~/.cache/avatar-sdk/engines).")
@click.option("--device", "device_id", type=click.IntRange(0), default=0, show_default=True, help="GPU index.")
@click.option("--rebuild", is_flag=True, help="Build even if a cached engine exists.")
def build_engine_cmd(
    model: str, fp16: bool, max_batch: int, opt_batch: int | None, uint8_visual: bool, tf32: bool, workspace_mb: int,
    cache_dir: str | None, device_id: int, rebuild: bool,
) -> None:  # fmt: skip
    """Build (or find in the cache) the TensorRT engine for MODEL and print its path."""
    require()
    build = BuildOptions(
        precision="fp16" if fp16 else "fp32", opt_batch=opt_batch or max_batch, max_batch=max_batch,
        workspace_mb=workspace_mb, uint8_visual=uint8_visual, tf32=tf32,
    )  # fmt: skip
    start = time.perf_counter()
    path = build_engine(model, build, cache=cache_dir, device_id=device_id, rebuild=rebuild)
    click.echo(f"{path}  ({time.perf_counter() - start:.1f} s)")


@hookimpl
def register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(TensorRTBackend)


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(build_engine_cmd, "build-engine")
