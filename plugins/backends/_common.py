"""Pure helpers shared by the built-in backends: feed validation, hashing, caches.

Nothing here imports ONNX Runtime, TensorRT or pycuda, so all of it is tested on
machines without a GPU. Backends call :func:`check_feeds` before every run so a
wrong feed fails with a message that names the tensor and says what to pass,
instead of an opaque runtime error from deep inside a provider.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from avatar.errors import BackendError, ConfigError, ModelError
from avatar.compare import psnr, random_feeds  # noqa: F401  (re-exported for the backends)
from avatar.interfaces import Backend, TensorInfo

log = logging.getLogger(__name__)

#: bytes read per hashing step (hashing a 48 MB model takes ~0.1 s)
_HASH_CHUNK = 1 << 20


def check_feeds(
    feeds: Mapping[str, np.ndarray],
    inputs: Sequence[TensorInfo],
    *,
    max_batch: int | None = None,
    backend: str = "backend",
) -> int:
    """Check names, dtypes, trailing shapes and batch size; return the batch size.

    ``max_batch`` is the limit the backend's buffers or engine profile impose
    (``None`` when the backend has none). A dimension of the model that is a
    fixed integer must match exactly; a dynamic one (``None`` or a name) takes
    any size. All inputs must share the same batch size, because one call runs
    one batch.
    """
    if not isinstance(feeds, Mapping):
        raise BackendError(f"{backend}: feeds must be a mapping {{input name: array}}, not {type(feeds).__name__}")
    names = [t.name for t in inputs]
    missing = [n for n in names if n not in feeds]
    extra = [n for n in feeds if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(repr(n) for n in missing)}")
        if extra:
            parts.append(f"unknown {', '.join(repr(n) for n in extra)}")
        raise BackendError(
            f"{backend}: feeds do not match the model inputs ({'; '.join(parts)}); the model takes "
            f"{', '.join(str(t) for t in inputs)} (map names with avatar.read_contract)"
        )
    batch: int | None = None
    batch_name = ""
    fixed_batch: int | None = None
    for info in inputs:
        arr = feeds[info.name]
        if not isinstance(arr, np.ndarray):
            raise BackendError(f"{backend}: input '{info.name}' must be a numpy array, not {type(arr).__name__}")
        want = np.dtype(info.dtype)
        if arr.dtype != want:
            hint = ""
            if arr.dtype == np.uint8 and want == np.float32:
                hint = " (divide uint8 pixels by 255, or convert the model with `avatar convert --uint8-visual`)"
            elif np.issubdtype(arr.dtype, np.floating) and np.issubdtype(want, np.floating):
                hint = f" (pass x.astype(np.{want.name}))"
            raise BackendError(f"{backend}: input '{info.name}' must be {want.name}, got {arr.dtype.name}{hint}")
        if arr.ndim != len(info.shape):
            raise BackendError(
                f"{backend}: input '{info.name}' must have {len(info.shape)} dimensions {_fmt(info.shape)}, "
                f"got shape {tuple(arr.shape)}"
            )
        for axis, (dim, got) in enumerate(zip(info.shape, arr.shape)):
            if axis == 0:
                continue
            if isinstance(dim, int) and dim != got:
                raise BackendError(
                    f"{backend}: input '{info.name}' must have shape {_fmt(info.shape)}, got {tuple(arr.shape)} "
                    f"(dimension {axis} is {got}, the model needs {dim})"
                )
        fixed = info.shape[0] if info.shape else None
        b = int(arr.shape[0]) if arr.ndim else 1
        if isinstance(fixed, int) and fixed != b:
            raise BackendError(
                f"{backend}: the model has a fixed batch of {fixed} (first dimension) but '{info.name}' has {b}; "
                "re-export the model with a dynamic batch axis or pass exactly that many items"
            )
        # Only inputs with a dynamic first axis are batch inputs: a cache
        # [layers, ...] or a scalar next to them (WeNet's encoder) is not.
        if arr.ndim == 0 or isinstance(fixed, int):
            fixed_batch = b if fixed_batch is None else fixed_batch
            continue
        if batch is None:
            batch = b
            batch_name = info.name
        elif b != batch:
            raise BackendError(
                f"{backend}: all batch inputs must have the same batch size; '{batch_name}' has {batch}, "
                f"'{info.name}' has {b}"
            )
    if batch is None:
        batch = fixed_batch or 0
    if batch < 1:
        raise BackendError(f"{backend}: empty batch; pass at least one item")
    if max_batch is not None and batch > max_batch:
        raise BackendError(
            f"{backend}: batch of {batch} exceeds max_batch={max_batch} this backend was loaded with; "
            f"split the batch or load with BackendOptions(max_batch={batch})"
        )
    return batch


def _fmt(shape: Iterable[Any]) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else "B" if i == 0 else "?" for i, d in enumerate(shape)) + "]"


def file_sha256(path: str | Path) -> str:
    """Content hash of a model file (hex). Keys caches so a changed file rebuilds."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_dir(explicit: str | Path | None = None, sub: str = "models") -> Path:
    """Where converted models and engines are cached.

    ``explicit`` (an option) wins, then ``AVATAR_CACHE_DIR``, then
    ``$XDG_CACHE_HOME/avatar-sdk`` (``~/.cache/avatar-sdk``).
    """
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("AVATAR_CACHE_DIR"):
        return Path(os.environ["AVATAR_CACHE_DIR"]).expanduser() / sub
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "avatar-sdk" / sub


def ort_log_severity() -> int:
    """The threshold for ONNX Runtime's own log lines in our sessions (0 verbose ... 4 fatal).

    ORT prints its log in colour straight to stderr from C++, past Python's
    logging. Every error it logs also comes back as the exception our backends
    turn into one clear message, so by default only fatal lines pass; with
    ``avatar --debug``, ``AVATAR_DEBUG=1`` or debug logging (``-vv``) its
    warnings and errors show too (e.g. nodes placed on the CPU).
    """
    debug = os.environ.get("AVATAR_DEBUG", "") not in ("", "0")
    return 2 if debug or logging.getLogger("avatar").isEnabledFor(logging.DEBUG) else 4


def option_bool(value: Any, what: str) -> bool:
    """A boolean backend option, strictly: true/1/yes/on or false/0/no/off (text from ``--backend-opt``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what} must be true or false (1/0, yes/no, on/off), not {value!r}")


def check_extra(extra: Mapping[str, Any], known: Mapping[str, str], backend: str) -> None:
    """Reject backend options nobody reads (an option that does nothing is a bug)."""
    unknown = sorted(set(extra) - set(known))
    if unknown:
        listing = "; ".join(f"{k}: {v}" for k, v in known.items()) or "none"
        raise ConfigError(f"{backend}: unknown option(s) {', '.join(unknown)}; this backend understands: {listing}")


@functools.lru_cache(maxsize=1)
def cuda_driver_status() -> tuple[bool, str, int]:
    """(usable, reason, device count) from the NVIDIA driver alone, via ctypes.

    Cheap: loads ``libcuda.so.1`` and calls ``cuInit`` / ``cuDeviceGetCount``;
    creates no context.
    """
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "no NVIDIA driver (libcuda.so.1) was found", 0
    rc = lib.cuInit(0)
    if rc != 0:
        return False, f"the NVIDIA driver is present but cuInit failed (CUresult {rc}; no usable GPU?)", 0
    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value < 1:
        return False, "the NVIDIA driver is present but reports no GPU", 0
    return True, "", count.value


def prepare_model(model_path: str | Path, *, precision: str, uint8_visual: bool, cache: str | Path | None) -> Path:
    """The model file to load: the original, or a cached fp16 / uint8-visual variant.

    The cache key is the source file's SHA-256 and the variant, so a changed
    model is converted again and an unchanged one is converted once.
    """
    path = Path(model_path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"precision must be 'fp32' or 'fp16', not {precision!r}")
    if uint8_visual:
        from avatar.contract import read_contract

        uint8_visual = not read_contract(path).visual_uint8  # already normalised in the graph
    if precision == "fp32" and not uint8_visual:
        return path
    from avatar.models import graph

    variant = "-".join(v for v, on in (("u8", uint8_visual), ("fp16", precision == "fp16")) if on)
    digest = file_sha256(path)[:16]
    out_dir = cache_dir(cache, "models")
    out = out_dir / f"{path.stem}.{digest}.{variant}.onnx"
    if out.is_file():
        log.debug("using cached %s variant %s", variant, out)
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}.onnx")
    src: Path = path
    try:
        if uint8_visual:
            graph.with_uint8_visual(src, tmp)
            src = tmp
        if precision == "fp16":
            graph.to_fp16(src, tmp, keep_io_types=True)
        os.replace(tmp, out)  # atomic: a concurrent loader sees the whole file or none
    finally:
        tmp.unlink(missing_ok=True)
    log.info("converted %s to %s (%s)", path, out, variant)
    return out


def output_psnr(want: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """The worst PSNR (dB) over paired outputs: the fp16 accuracy measure.

    The peak is 1 for an output in [0, 1] (the UNet's sigmoid face) and the
    reference's range otherwise (an audio encoder's features).
    """
    worst = float("inf")
    for w, g in zip(want, got):
        w = np.asarray(w, np.float64)
        in_unit = w.size and float(w.min()) >= 0.0 and float(w.max()) <= 1.0
        peak = 1.0 if in_unit else float(np.ptp(w)) or 1.0
        worst = min(worst, psnr(w, g, peak))
    return worst


def fp16_gate(backend: str, model: Path, measured: float, limit: float) -> None:
    """Refuse an fp16 model whose output is below ``limit`` dB PSNR against fp32."""
    if measured < limit:
        raise BackendError(
            f"{backend}: the fp16 conversion of {model} is too inaccurate ({measured:.1f} dB PSNR "
            f"against fp32, need {limit:.0f} dB); use precision fp32"
        )


class ListedTensorsBackend(Backend):
    """A backend whose input and output metadata are lists it fills at load (``_inputs``, ``_outputs``)."""

    _inputs: list[TensorInfo]
    _outputs: list[TensorInfo]

    @property
    def inputs(self) -> Sequence[TensorInfo]:
        return list(self._inputs)

    @property
    def outputs(self) -> Sequence[TensorInfo]:
        return list(self._outputs)
