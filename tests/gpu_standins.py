"""Stand-ins for ``tensorrt`` and ``pycuda.driver``, which cannot be installed here.

They keep the TensorRT backend's code paths executed in CI: every call our
code makes is recorded, and each stand-in enforces what the real library
documents about order and signatures, so a name error, a call on the wrong
object, a missing ``set_input_shape`` or a call without a current CUDA context
fails a test instead of a first run on a GPU.

What is modelled (from the TensorRT 10 Python API reference and pycuda's
``src/cpp/cuda.hpp``):

* pycuda keeps **two** stacks per thread: its own context stack and the CUDA
  driver's. ``Context.push`` pushes both; ``Context.pop`` pops both;
  ``detach()`` of a primary context calls ``cuDevicePrimaryCtxRelease``, which
  never pops the driver stack, and when the context is not current it is
  first pushed onto the driver stack (``cuCtxPushCurrent``). Memory, streams,
  engines and executions need a current context.
* "device" memory is host memory (ctypes buffers) addressed by integers; the
  execution context reads its inputs from the bound addresses and writes its
  outputs there, computing with ONNX Runtime on the CPU, so data really flows
  through the backend's copies. Freed memory is poisoned (0xFF bytes: NaN for
  floats) so reading it shows.
* TensorRT: ``create_network`` takes int flags; ``OnnxParser.parse_from_file``
  fills the network; a profile's shapes must satisfy min <= opt <= max with the
  network's rank; ``build_serialized_network`` needs a profile for every
  dynamic input and a current context; ``set_input_shape`` returns ``False``
  outside the profile; ``set_tensor_address`` takes an int; ``execute_async_v3``
  takes the stream handle as an int and needs every input shape and every
  address set.
"""

from __future__ import annotations

import ctypes
import enum
import json
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np

POISON = 0xFF


class StandinError(AssertionError):
    """Our code used the stand-in the way the real library forbids."""


# --------------------------------------------------------------------------- pycuda.driver


class GpuState:
    """Everything both stand-ins share: memory, streams, the per-thread stacks, a call log."""

    def __init__(self, devices: tuple[tuple[str, tuple[int, int]], ...] = (("NVIDIA Standin H100", (9, 0)),)) -> None:
        self.devices = devices
        self.calls: list[str] = []
        self.memory: dict[int, Any] = {}  # address -> ctypes buffer (live allocations)
        self.pinned: dict[int, "HostAllocation"] = {}
        self.streams: dict[int, Any] = {}  # handle -> pycuda.driver.Stream
        self.retains = [0] * len(devices)
        self.initialised = False
        self._tls = threading.local()

    # the two per-thread stacks
    @property
    def pycuda_stack(self) -> list["Context"]:
        if not hasattr(self._tls, "pycuda"):
            self._tls.pycuda, self._tls.driver = [], []
        return self._tls.pycuda

    @property
    def driver_stack(self) -> list["Context"]:
        self.pycuda_stack  # noqa: B018 - creates both
        return self._tls.driver

    def record(self, call: str) -> None:
        self.calls.append(call)

    def require_context(self, what: str) -> None:
        stack = self.driver_stack
        if not stack or stack[-1].released:
            raise StandinError(f"{what}: no current CUDA context (push the primary context first)")

    def alloc(self, nbytes: int) -> int:
        buf = (ctypes.c_ubyte * max(int(nbytes), 1))()
        addr = ctypes.addressof(buf)
        self.memory[addr] = buf
        return addr

    def region(self, addr: int, nbytes: int, what: str) -> None:
        """Check that ``[addr, addr + nbytes)`` lies in one live allocation."""
        for base, buf in self.memory.items():
            if base <= addr and addr + nbytes <= base + ctypes.sizeof(buf):
                return
        raise StandinError(f"{what}: {nbytes} bytes at {addr:#x} are not inside a live allocation")

    def free(self, addr: int) -> None:
        buf = self.memory.pop(addr)
        ctypes.memset(addr, POISON, ctypes.sizeof(buf))
        self._freed = getattr(self, "_freed", [])
        self._freed.append(buf)  # keep the poisoned bytes mapped, as freed pinned memory often stays


class Context:
    def __init__(self, state: GpuState, device: int) -> None:
        self._s, self.device, self.released = state, device, False

    def push(self) -> None:
        s = self._s
        s.record("Context.push")
        if self.released:
            raise StandinError("push of a detached context")
        if s.pycuda_stack:  # prepare_context_switch: pycuda keeps the driver stack one deep
            s.driver_stack.pop()
        s.driver_stack.append(self)
        s.pycuda_stack.append(self)

    @staticmethod
    def _current(state: GpuState, except_: "Context | None" = None) -> "Context | None":
        stack = state.pycuda_stack
        while stack:
            top = stack[-1]
            if top is not except_ and not top.released:
                return top
            stack.pop()
        return None

    def detach(self) -> None:
        s = self._s
        s.record("Context.detach")
        if self.released:
            raise StandinError("cannot detach from invalid context")
        active = Context._current(s) is self
        if not active:
            s.driver_stack.append(self)  # cuCtxPushCurrent; the release below does not pop it
        s.retains[self.device] -= 1  # cuDevicePrimaryCtxRelease
        self.released = True
        if active:
            new = Context._current(s, except_=self)
            if new is not None:
                s.driver_stack.append(new)


def _pycuda_module(state: GpuState) -> tuple[types.ModuleType, types.ModuleType]:
    drv = types.ModuleType("pycuda.driver")

    def init() -> None:
        state.record("init")
        state.initialised = True

    class Device:
        def __init__(self, ordinal: int) -> None:
            if not state.initialised:
                raise StandinError("pycuda.driver.init() must come first")
            if not 0 <= ordinal < len(state.devices):
                raise StandinError(f"no device {ordinal}")
            self.ordinal = ordinal

        @staticmethod
        def count() -> int:
            if not state.initialised:
                raise StandinError("pycuda.driver.init() must come first")
            return len(state.devices)

        def name(self) -> str:
            return state.devices[self.ordinal][0]

        def compute_capability(self) -> tuple[int, int]:
            return state.devices[self.ordinal][1]

        def retain_primary_context(self) -> Context:
            state.record("retain_primary_context")
            state.retains[self.ordinal] += 1
            return Context(state, self.ordinal)

    class _ContextAPI:
        @staticmethod
        def pop() -> None:
            state.record("Context.pop")
            if state.pycuda_stack:
                state.driver_stack.pop()
            if not state.pycuda_stack:
                raise StandinError("cannot pop non-current context")
            state.pycuda_stack.pop()
            cur = Context._current(state)
            if cur is not None:
                state.driver_stack.append(cur)

    class DeviceAllocation:
        def __init__(self, nbytes: int) -> None:
            state.require_context("mem_alloc")
            self.nbytes = int(nbytes)
            self._addr: int | None = state.alloc(nbytes)

        def __int__(self) -> int:
            if self._addr is None:
                raise StandinError("use of freed device memory")
            return self._addr

        def free(self) -> None:
            state.record("DeviceAllocation.free")
            if self._addr is not None:
                state.free(self._addr)
                self._addr = None

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        state.record("mem_alloc")
        return DeviceAllocation(nbytes)

    def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
        state.record("pagelocked_empty")
        state.require_context("pagelocked_empty")
        ha = HostAllocation(state, tuple(int(d) for d in shape), np.dtype(dtype))
        arr = np.asarray(ha)
        assert arr.base is ha
        return arr

    class Stream:
        def __init__(self) -> None:
            state.require_context("Stream")
            state.record("Stream")
            self.handle = state.alloc(8)
            state.streams[self.handle] = self

        def synchronize(self) -> None:
            state.record("Stream.synchronize")
            state.require_context("Stream.synchronize")

    def _ptr(x: Any) -> int:
        if isinstance(x, DeviceAllocation) or isinstance(x, int):
            return int(x)
        raise StandinError(f"a device pointer must be a DeviceAllocation or an int, not {type(x).__name__}")

    def _pinned(arr: np.ndarray, what: str) -> None:
        addr = arr.__array_interface__["data"][0]
        for ha in state.pinned.values():
            if ha.addr <= addr and addr + arr.nbytes <= ha.addr + ha.nbytes and not ha.freed:
                if not arr.flags.c_contiguous:
                    raise StandinError(f"{what}: the host array must be contiguous")
                return
        raise StandinError(f"{what}: async copies need page-locked host memory (pagelocked_empty)")

    def memcpy_htod_async(dest: Any, src: np.ndarray, stream: Any = None) -> None:
        state.record("memcpy_htod_async")
        state.require_context("memcpy_htod_async")
        _pinned(src, "memcpy_htod_async")
        d = _ptr(dest)
        state.region(d, src.nbytes, "memcpy_htod_async")
        ctypes.memmove(d, src.ctypes.data, src.nbytes)

    def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: Any = None) -> None:
        state.record("memcpy_dtoh_async")
        state.require_context("memcpy_dtoh_async")
        _pinned(dest, "memcpy_dtoh_async")
        s = _ptr(src)
        state.region(s, dest.nbytes, "memcpy_dtoh_async")
        ctypes.memmove(dest.ctypes.data, s, dest.nbytes)

    drv.init = init
    drv.Device = Device
    drv.Context = _ContextAPI
    drv.mem_alloc = mem_alloc
    drv.pagelocked_empty = pagelocked_empty
    drv.Stream = Stream
    drv.memcpy_htod_async = memcpy_htod_async
    drv.memcpy_dtoh_async = memcpy_dtoh_async
    pkg = types.ModuleType("pycuda")
    pkg.driver = drv  # type: ignore[attr-defined]
    pkg.__path__ = []  # a package, so `import pycuda.driver` resolves through sys.modules
    return pkg, drv


class HostAllocation:
    """pycuda's page-locked allocation: the ``base`` of a ``pagelocked_empty`` array."""

    def __init__(self, state: GpuState, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self._s, self.shape, self.dtype = state, shape, dtype
        self.nbytes = int(np.prod(shape)) * dtype.itemsize
        self.addr = state.alloc(self.nbytes)
        self.freed = False
        state.pinned[self.addr] = self

    @property
    def __array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.addr, False), "version": 3}

    def free(self) -> None:
        self._s.record("HostAllocation.free")
        self._s.require_context("HostAllocation.free")
        if not self.freed:
            self.freed = True
            self._s.free(self.addr)


# --------------------------------------------------------------------------- tensorrt


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT32 = "int32"
    INT64 = "int64"
    UINT8 = "uint8"
    BOOL = "bool"


_ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 6: DataType.INT32, 7: DataType.INT64, 2: DataType.UINT8, 9: DataType.BOOL}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


def _tensorrt_module(state: GpuState) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.13.0.35"  # type: ignore[attr-defined]

    class Logger:
        VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = range(5)

        def __init__(self, min_severity: int = 2) -> None:
            self.min_severity = min_severity

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0  # deprecated and ignored in TensorRT 10
        STRONGLY_TYPED = 1

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    class BuilderFlag(enum.Enum):
        FP16 = 0
        TF32 = 7

    class ITensor:
        def __init__(self, name: str, shape: tuple[int, ...], dtype: DataType) -> None:
            self.name, self.shape, self.dtype = name, shape, dtype

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []
            self.source: str | None = None

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, i: int) -> ITensor:
            return self.inputs[i]

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_output(self, i: int) -> ITensor:
            return self.outputs[i]

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            if not isinstance(network, INetworkDefinition) or not isinstance(logger, Logger):
                raise StandinError("OnnxParser(network, logger)")
            self.network, self.errors = network, []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> str:
            return self.errors[i]

        def parse_from_file(self, model: str) -> bool:
            state.record("OnnxParser.parse_from_file")
            if not isinstance(model, str):
                raise StandinError("parse_from_file takes the path as a str")
            import onnx

            try:
                m = onnx.load(model)
            except Exception as exc:
                self.errors.append(f"cannot parse {model}: {exc}")
                return False
            init = {i.name for i in m.graph.initializer}

            def tensors(values: Any) -> list[ITensor]:
                out = []
                for v in values:
                    if v.name in init:
                        continue
                    tt = v.type.tensor_type
                    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
                    out.append(ITensor(v.name, dims, _ONNX_TO_TRT[tt.elem_type]))
                return out

            self.network.inputs, self.network.outputs = tensors(m.graph.input), tensors(m.graph.output)
            self.network.source = model
            return True

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - the real keyword names
            state.record("IOptimizationProfile.set_shape")
            lo, mid, hi = (tuple(int(d) for d in x) for x in (min, opt, max))
            if not (len(lo) == len(mid) == len(hi)) or not all(a <= b <= c for a, b, c in zip(lo, mid, hi)):
                raise StandinError(f"set_shape({input!r}): need min <= opt <= max of one rank, got {lo}, {mid}, {hi}")
            self.shapes[input] = (lo, mid, hi)

        def get_shape(self, input: str) -> list[tuple[int, ...]]:  # noqa: A002
            return list(self.shapes[input])

    class ITimingCache:
        def __init__(self, entries: set[str]) -> None:
            self.entries = set(entries)

        def combine(self, input_cache: "ITimingCache", ignore_mismatch: bool) -> bool:
            state.record("ITimingCache.combine")
            if not isinstance(input_cache, ITimingCache) or not isinstance(ignore_mismatch, bool):
                raise StandinError("combine(input_cache: ITimingCache, ignore_mismatch: bool)")
            self.entries |= input_cache.entries
            return True

        def serialize(self) -> bytes:
            return json.dumps(sorted(self.entries)).encode()

    class IBuilderConfig:
        def __init__(self) -> None:
            self.pools: dict[Any, int] = {}
            self.cleared: set[Any] = set()
            self.profiles: list[IOptimizationProfile] = []
            self.timing: ITimingCache | None = None

        def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
            if not isinstance(pool, MemoryPoolType) or not isinstance(pool_size, int):
                raise StandinError("set_memory_pool_limit(pool: MemoryPoolType, pool_size: int)")
            self.pools[pool] = pool_size

        def clear_flag(self, flag: BuilderFlag) -> None:
            if not isinstance(flag, BuilderFlag):
                raise StandinError("clear_flag takes a BuilderFlag")
            self.cleared.add(flag)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            state.record("IBuilderConfig.add_optimization_profile")
            if not profile.shapes:
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
            state.record("IBuilderConfig.create_timing_cache")
            if not isinstance(serialized_timing_cache, (bytes, bytearray, memoryview)):
                raise StandinError("create_timing_cache takes a buffer")
            data = bytes(serialized_timing_cache)
            return ITimingCache(set(json.loads(data)) if data else set())

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            state.record("IBuilderConfig.set_timing_cache")
            if not isinstance(cache, ITimingCache) or not isinstance(ignore_mismatch, bool):
                raise StandinError("set_timing_cache(cache: ITimingCache, ignore_mismatch: bool)")
            self.timing = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self.timing

    class Builder:
        def __init__(self, logger: Logger) -> None:
            if not isinstance(logger, Logger):
                raise StandinError("Builder(logger)")
            state.record("Builder")

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            if not isinstance(flags, int):
                raise StandinError("create_network takes int flags")
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
            state.record("Builder.build_serialized_network")
            state.require_context("build_serialized_network")
            if network.source is None:
                raise StandinError("build_serialized_network before the parser filled the network")
            if not config.profiles:
                raise StandinError("a network with dynamic inputs needs an optimisation profile")
            profile = config.profiles[0]
            for t in network.inputs:
                if -1 in t.shape and t.name not in profile.shapes:
                    raise StandinError(f"dynamic input {t.name!r} has no shape in the profile")
                for s in profile.shapes.get(t.name, ()):
                    if len(s) != len(t.shape) or any(d != -1 and d != e for d, e in zip(t.shape, s)):
                        raise StandinError(f"profile shape {s} does not fit input {t.name!r} {t.shape}")
            if config.timing is not None:
                config.timing.entries.add(f"tactics:{Path(network.source).name}")
            doc = {
                "source": network.source,
                "inputs": [(t.name, t.shape, t.dtype.value, profile.shapes.get(t.name, (t.shape,) * 3)) for t in network.inputs],
                "outputs": [(t.name, t.shape, t.dtype.value) for t in network.outputs],
            }
            return b"STANDIN-ENGINE" + json.dumps(doc).encode()

    class ICudaEngine:
        def __init__(self, doc: dict) -> None:
            self.doc = doc
            self.io: list[tuple[str, tuple[int, ...], DataType, TensorIOMode]] = [
                (n, tuple(s), DataType(d), TensorIOMode.INPUT) for n, s, d, _ in doc["inputs"]
            ] + [(n, tuple(s), DataType(d), TensorIOMode.OUTPUT) for n, s, d in doc["outputs"]]
            self.profile = {n: tuple(tuple(x) for x in p) for n, _, _, p in doc["inputs"]}

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def _find(self, name: str) -> tuple:
            for t in self.io:
                if t[0] == name:
                    return t
            raise StandinError(f"no tensor named {name!r}")

        def get_tensor_name(self, index: int) -> str:
            return self.io[index][0]

        def get_tensor_dtype(self, name: str) -> DataType:
            return self._find(name)[2]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self._find(name)[1]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return self._find(name)[3]

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            if profile_index != 0 or self._find(name)[3] is not TensorIOMode.INPUT:
                raise StandinError("get_tensor_profile_shape(input name, profile 0)")
            return list(self.profile[name])

        def create_execution_context(self) -> "IExecutionContext":
            state.record("ICudaEngine.create_execution_context")
            state.require_context("create_execution_context")
            return IExecutionContext(self)

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}
            self._session: Any = None

        def set_input_shape(self, name: str, shape: Any) -> bool:
            state.record("IExecutionContext.set_input_shape")
            if self.engine.get_tensor_mode(name) is not TensorIOMode.INPUT:
                raise StandinError(f"set_input_shape on output {name!r}")
            shape = tuple(int(d) for d in shape)
            lo, _, hi = self.engine.profile[name]
            if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                return False  # TensorRT logs an error and returns false
            self.shapes[name] = shape
            return True

        def _inputs_set(self) -> bool:
            return all(n in self.shapes for n, *_r, m in self.engine.io if m is TensorIOMode.INPUT)

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            n, shape, _, mode = self.engine._find(name)
            if mode is TensorIOMode.INPUT:
                return self.shapes.get(name, shape)
            if not self._inputs_set():
                return shape  # still -1 where unknown
            batch = next(iter(self.shapes.values()))[0]
            return tuple(batch if d == -1 else d for d in shape)

        def set_tensor_address(self, name: str, memory: int) -> bool:
            state.record("IExecutionContext.set_tensor_address")
            self.engine._find(name)
            if type(memory) is not int:
                raise StandinError(f"set_tensor_address takes an int address, not {type(memory).__name__}")
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            state.record("IExecutionContext.execute_async_v3")
            state.require_context("execute_async_v3")
            if type(stream_handle) is not int or stream_handle not in state.streams:
                raise StandinError("execute_async_v3 takes a live stream's handle as an int")
            if not self._inputs_set():
                raise StandinError("execute_async_v3 before set_input_shape for every input")
            missing = [n for n, *_ in self.engine.io if n not in self.addresses]
            if missing:
                raise StandinError(f"execute_async_v3 before set_tensor_address for {missing}")
            import onnxruntime

            if self._session is None:
                self._session = onnxruntime.InferenceSession(self.engine.doc["source"], providers=["CPUExecutionProvider"])
            feeds = {}
            for n, _, dt, mode in self.engine.io:
                if mode is TensorIOMode.INPUT:
                    shape, dtype = self.shapes[n], np.dtype(dt.value)
                    nbytes = int(np.prod(shape)) * dtype.itemsize
                    state.region(self.addresses[n], nbytes, f"input {n}")
                    feeds[n] = np.frombuffer((ctypes.c_ubyte * nbytes).from_address(self.addresses[n]), dtype).reshape(shape).copy()
            outs = self._session.run([n for n, *_r, m in self.engine.io if m is TensorIOMode.OUTPUT], feeds)
            for (n, *_r), out in zip([t for t in self.engine.io if t[3] is TensorIOMode.OUTPUT], outs):
                out = np.ascontiguousarray(out)
                state.region(self.addresses[n], out.nbytes, f"output {n}")
                ctypes.memmove(self.addresses[n], out.ctypes.data, out.nbytes)
            return True

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            if not isinstance(logger, Logger):
                raise StandinError("Runtime(logger)")

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
            state.record("Runtime.deserialize_cuda_engine")
            state.require_context("deserialize_cuda_engine")
            data = bytes(serialized_engine)
            if not data.startswith(b"STANDIN-ENGINE"):
                return None
            return ICudaEngine(json.loads(data[len(b"STANDIN-ENGINE") :]))

    def nptype(dtype: DataType) -> type:
        return np.dtype(dtype.value).type

    for obj in (Logger, NetworkDefinitionCreationFlag, MemoryPoolType, BuilderFlag, Builder, OnnxParser, Runtime):
        setattr(trt, obj.__name__, obj)
    trt.DataType, trt.TensorIOMode, trt.nptype = DataType, TensorIOMode, nptype  # type: ignore[attr-defined]
    return trt


def install(monkeypatch: Any) -> GpuState:
    """Put fresh stand-ins in ``sys.modules`` for one test; return their shared state."""
    import sys

    state = GpuState()
    pkg, drv = _pycuda_module(state)
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)
    monkeypatch.setitem(sys.modules, "tensorrt", _tensorrt_module(state))
    return state
