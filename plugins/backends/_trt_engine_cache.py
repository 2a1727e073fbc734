"""The TensorRT backend's pure logic: cache keys, profiles, buffer sizes, messages, build locks.

Nothing here imports TensorRT or pycuda, so CI (no GPU) tests every decision
the backend makes before it touches the device: which engine file a build maps
to, which shapes the optimisation profile allows, how many bytes each buffer
needs, what a user reads when something is missing, and how processes that
want the same engine at the same time agree on one build.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from avatar.errors import BackendError, ConfigError, ModelError
from avatar.interfaces import TensorInfo

try:  # POSIX only; TensorRT on Windows is not a target, but importing this module must work there
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

INSTALL = "pip install 'avatar-sdk[tensorrt]' --extra-index-url https://pypi.nvidia.com"
INSTALL_NOTE = (
    "TensorRT's PyPI packages are download stubs that fetch the libraries from NVIDIA's index "
    "(pypi.nvidia.com) at install time; install on a machine that can reach it"
)
#: bump when the engine layout or build recipe changes, so old engines are rebuilt
RECIPE_VERSION = 2


@dataclass(frozen=True)
class BuildOptions:
    """Everything that changes the engine a build produces (besides model, GPU, TensorRT)."""

    precision: str = "fp32"  # fp32 | fp16
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 16
    workspace_mb: int = 4096
    uint8_visual: bool = False
    tf32: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16"):
            raise ConfigError(f"precision must be 'fp32' or 'fp16', not {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(
                f"the batch profile needs 1 <= min <= opt <= max, got min={self.min_batch}, "
                f"opt={self.opt_batch}, max={self.max_batch}"
            )
        if self.workspace_mb < 16:
            raise ConfigError(f"workspace_mb must be at least 16, not {self.workspace_mb}")


@dataclass(frozen=True)
class DeviceIdentity:
    """What makes an engine valid on a GPU: engines are not portable across these."""

    gpu_name: str
    compute_capability: tuple[int, int]
    trt_version: str


def engine_cache_key(model_sha256: str, device: DeviceIdentity, build: BuildOptions) -> str:
    """A short hex key that changes whenever any ingredient of the engine changes."""
    doc = {
        "recipe": RECIPE_VERSION,
        "model": model_sha256,
        "gpu": device.gpu_name,
        "cc": list(device.compute_capability),
        "trt": device.trt_version,
        "build": asdict(build),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def engine_path(cache_dir: Path, model_path: Path, key: str) -> Path:
    """Where the engine for ``key`` lives (the model's stem keeps the folder readable)."""
    return Path(cache_dir) / f"{Path(model_path).stem}.{key}.engine"


def find_covering_engine(
    folder: Path, model_path: Path, model_sha256: str, device: DeviceIdentity, build: BuildOptions,
    *, batch: int, opt_batch: int | None = None,
) -> Path | None:  # fmt: skip
    """A cached engine for this model and GPU whose profile covers batches up to ``batch``, or ``None``.

    The rule that lets ``avatar build-engine`` (batch 1..16 by default) serve
    ``avatar run --batch 8``: everything but the batch profile must match
    ``build`` (precision, uint8 visual, TF32, workspace); the profile must
    accept every batch in ``[build.min_batch, batch]``; with ``opt_batch``
    (the caller asked for a tuned batch) the engine must be tuned for it.
    Among several, the smallest profile wins (the smallest buffers), then the
    tuned batch nearest ``build.opt_batch``. The key is recomputed from each
    meta json's build options and must name an existing engine file, so a meta
    from another model, GPU, TensorRT version or recipe never matches, and a
    build still in progress (its meta is written last) is not picked up.
    """
    best: tuple[tuple[int, int], Path] | None = None
    for meta_path in sorted(Path(folder).glob(f"{glob.escape(Path(model_path).stem)}.*.json")):
        try:
            meta = json.loads(meta_path.read_text())
            cand = BuildOptions(**meta["build"])
        except (OSError, ValueError, TypeError, KeyError, ConfigError):
            continue
        same = (cand.precision, cand.uint8_visual, cand.tf32, cand.workspace_mb)
        if same != (build.precision, build.uint8_visual, build.tf32, build.workspace_mb):
            continue
        if cand.min_batch > build.min_batch or cand.max_batch < batch:
            continue
        if opt_batch is not None and cand.opt_batch != opt_batch:
            continue
        key = engine_cache_key(model_sha256, device, cand)
        path = engine_path(folder, model_path, key)
        if meta.get("key") != key or not path.is_file():
            continue
        rank = (cand.max_batch, abs(cand.opt_batch - build.opt_batch))
        if best is None or rank < best[0]:
            best = (rank, path)
    return best[1] if best else None


def timing_cache_path(cache_dir: Path, device: DeviceIdentity) -> Path:
    """One timing cache per GPU model and TensorRT version, shared by all builds."""
    gpu = "".join(c if c.isalnum() else "-" for c in device.gpu_name).strip("-").lower() or "gpu"
    cc = "".join(map(str, device.compute_capability))
    return Path(cache_dir) / f"timing.{gpu}.sm{cc}.trt{device.trt_version}.cache"


def profile_shapes(inputs: Sequence[TensorInfo], build: BuildOptions) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input: (min, opt, max)}`` shapes for the optimisation profile.

    Only the batch axis may be dynamic: TensorRT needs every other dimension
    fixed, and the UNet-328 and audio-encoder contracts fix them.
    """
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for t in inputs:
        tail = t.shape[1:]
        if not all(isinstance(d, int) for d in tail):
            raise ModelError(
                f"input {t} has a dynamic dimension besides the batch; TensorRT needs the others fixed "
                "(re-export the model with fixed image and audio sizes)"
            )
        fixed = t.shape[0] if t.shape else None
        if isinstance(fixed, int):
            if fixed < build.min_batch or fixed > build.max_batch:
                raise ConfigError(
                    f"input {t} has a fixed batch of {fixed}, outside the requested profile "
                    f"[{build.min_batch}, {build.max_batch}]; pass --max-batch {fixed} or re-export with a dynamic batch"
                )
            shapes[t.name] = tuple((fixed, *tail) for _ in range(3))  # type: ignore[misc]
        else:
            shapes[t.name] = tuple((b, *tail) for b in (build.min_batch, build.opt_batch, build.max_batch))  # type: ignore[misc]
    return shapes


def buffer_bytes(shape: Sequence[int], dtype: Any) -> int:
    """Bytes of a dense tensor; -1 (TensorRT's 'dynamic') is an error here."""
    n = 1
    for d in shape:
        if int(d) < 0:
            raise BackendError(f"cannot size a buffer for shape {tuple(shape)}: it still has a dynamic dimension")
        n *= int(d)
    return n * np.dtype(dtype).itemsize


def buffer_plan(tensors: Mapping[str, tuple[Sequence[int], Any]]) -> dict[str, int]:
    """Bytes to allocate per tensor from its profile-max shape and dtype."""
    return {name: buffer_bytes(shape, dtype) for name, (shape, dtype) in tensors.items()}


def check_shape(name: str, shape: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> None:
    """Raise a clear error when ``shape`` falls outside the profile range ``[lo, hi]``."""
    shape, lo, hi = tuple(shape), tuple(lo), tuple(hi)
    if len(shape) != len(hi):
        raise BackendError(f"tensorrt: input '{name}' must have {len(hi)} dimensions, got shape {shape}")
    if shape[1:] != hi[1:] or shape[1:] != lo[1:]:
        raise BackendError(f"tensorrt: input '{name}' must have shape [B,{','.join(map(str, hi[1:]))}], got {shape}")
    if not lo[0] <= shape[0] <= hi[0]:
        raise BackendError(
            f"tensorrt: batch {shape[0]} of input '{name}' is outside the engine's profile [{lo[0]}, {hi[0]}]; "
            f"split the batch or rebuild with `avatar build-engine --max-batch {shape[0]}`"
        )


def missing_parts(*, have_tensorrt: bool, have_pycuda: bool, driver: tuple[bool, str]) -> list[str]:
    """What keeps the TensorRT backend from running here, one phrase per part."""
    out = []
    if not have_tensorrt:
        out.append("TensorRT (the tensorrt Python package) is not installed")
    if not have_pycuda:
        out.append("pycuda is not installed")
    ok, why = driver
    if not ok:
        out.append(why or "no NVIDIA driver was found")
    return out


def unavailable_message(reason: str, install: str | None) -> str:
    """One line: what is missing and how to fix it."""
    if install:
        fix = f"install with `{install}` ({INSTALL_NOTE})"
    else:
        fix = "use --backend onnx-cuda or cpu, or run on a machine with an NVIDIA GPU and driver"
    return f"tensorrt backend unavailable: {reason}; {fix}"


def have_module(name: str) -> bool:
    """Whether ``name`` is importable, without importing it (cheap)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- cross-process build lock


def lock_path(target: Path) -> Path:
    """The lock file that guards building ``target``: ``<target>.lock`` beside it."""
    target = Path(target)
    return target.with_name(f"{target.name}.lock")


@contextmanager
def build_lock(target: Path) -> Iterator[Path]:
    """Hold an exclusive advisory lock on ``<target>.lock`` for the ``with`` block.

    Engine builds take minutes of GPU time, and several workers started together
    (or ``avatar build-engine`` beside a render) would otherwise all build the
    same engine and race on the shared timing cache. ``fcntl.flock`` locks an
    open file description, so the lock also excludes other threads of this
    process that enter here, and the kernel drops it when the holder dies: a
    crashed build never leaves a stale lock behind.

    We first try without blocking so that a wait can be explained once, at
    WARNING level, before blocking. The lock file is never deleted: a process
    that opened it just before the unlink would lock the orphaned file while a
    third one creates and locks a new file, and two builds would run at once.
    An empty ``.lock`` file per engine is the price.

    Where ``fcntl`` is missing (Windows) or the filesystem refuses locks, the
    block runs unlocked: concurrent builds then only waste time, since every
    file the build writes is replaced atomically.
    """
    lock = lock_path(target)
    if fcntl is None:  # pragma: no cover - Windows
        log.debug("no fcntl on this platform; building %s without a cross-process lock", target)
        yield lock
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise BackendError(
            f"cannot create the engine build lock {lock} ({exc.strerror or exc}); "
            "make the engine cache folder writable or choose another with --cache-dir"
        ) from exc
    try:
        _acquire(fd, lock)
        yield lock
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _acquire(fd: int, lock: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    except OSError as exc:  # e.g. ENOLCK on a network filesystem without lock support
        log.warning("cannot lock %s (%s); building without a cross-process lock", lock, exc.strerror or exc)
        return
    log.warning("waiting for another process building the same TensorRT engine (lock file %s)", lock)
    fcntl.flock(fd, fcntl.LOCK_EX)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What identifies one version of a file: an atomic replace changes the inode."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def cached_or_build(out: Path, build: Callable[[], None], rebuild: bool = False) -> tuple[Path, bool]:
    """Return ``(out, built)``: ``out`` as cached, or after ``build()`` wrote it under the lock.

    ``build`` must write ``out`` (atomically, so a crash never leaves half a
    file) and anything else shared it touches, such as the timing cache; it
    runs with :func:`build_lock` held, so one process builds while the others
    wait and then find the file. An existing file is returned without touching
    the lock, so a cached start never waits behind someone else's build.

    ``rebuild`` asks for a file built *after this call started*: if another
    process replaced ``out`` while we waited for the lock, that fresh build
    satisfies the request and is not repeated (it used the same inputs, since
    the key in the file name covers them). If ``out`` is unchanged when we get
    the lock, we build.
    """
    out = Path(out)
    before = _stamp(out)
    if before is not None and not rebuild:
        return out, False
    with build_lock(out):
        now = _stamp(out)
        if now is not None and (not rebuild or now != before):
            log.info("%s was built by another process while we waited", out)
            return out, False
        build()
        if _stamp(out) is None:
            raise BackendError(f"the engine build finished without writing {out}; run with -vv for the builder log")
    return out, True


# --------------------------------------------------------------------------- engine metadata


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` so that a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def recorded(meta_path: Path, key: str, measure: Callable[[], float]) -> float:
    """``meta[key]`` from an engine's meta json, measured once and recorded when absent.

    An engine's accuracy is a property of the engine file, so it is measured the
    first time the engine loads and read back afterwards (a cached start stays
    about a second). A missing or unreadable meta file is measured and rewritten.
    """
    meta: dict[str, Any] = {}
    try:
        meta = json.loads(meta_path.read_text())
        if isinstance(meta.get(key), (int, float)):
            return float(meta[key])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("engine metadata %s is unreadable (%s); measuring again", meta_path, exc)
        meta = {}
    value = float(measure())
    meta[key] = value
    try:
        atomic_write(meta_path, json.dumps(meta, indent=2).encode())
    except OSError as exc:  # a read-only cache still runs; it measures again next time
        log.warning("cannot record %s in %s: %s", key, meta_path, exc)
    return value

