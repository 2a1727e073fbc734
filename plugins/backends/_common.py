"""Pure helpers shared by the built-in backends: feed validation, hashing, caches.

Nothing here imports ONNX Runtime, TensorRT or pycuda, so all of it is tested on
machines without a GPU. Backends call :func:`check_feeds` before every run so a
wrong feed fails with a message that names the tensor and says what to pass,
instead of an opaque runtime error from deep inside a provider.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from avatar.errors import BackendError, ConfigError
from avatar.interfaces import TensorInfo

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
        b = int(arr.shape[0]) if arr.ndim else 1
        if batch is None:
            batch = b
        elif b != batch:
            raise BackendError(
                f"{backend}: all inputs must have the same batch size; '{inputs[0].name}' has {batch}, "
                f"'{info.name}' has {b}"
            )
        fixed = info.shape[0] if info.shape else None
        if isinstance(fixed, int) and fixed != b:
            raise BackendError(
                f"{backend}: the model has a fixed batch of {fixed} but '{info.name}' has batch {b}; "
                "re-export the model with a dynamic batch axis or pass exactly that many items"
            )
    batch = batch or 0
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


def check_extra(extra: Mapping[str, Any], known: Mapping[str, str], backend: str) -> None:
    """Reject backend options nobody reads (an option that does nothing is a bug)."""
    unknown = sorted(set(extra) - set(known))
    if unknown:
        listing = "; ".join(f"{k}: {v}" for k, v in known.items()) or "none"
        raise ConfigError(f"{backend}: unknown option(s) {', '.join(unknown)}; this backend understands: {listing}")


def psnr(reference: np.ndarray, test: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``test`` against ``reference`` (inf when equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    tst = np.asarray(test, dtype=np.float64)
    mse = float(np.mean((ref - tst) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(peak * peak / mse))


def random_feeds(inputs: Sequence[TensorInfo], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random feeds matching the model (pixels in [0,1] / [0,255], audio ~N(0,1))."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for t in inputs:
        shape = (batch, *[d if isinstance(d, int) else 1 for d in t.shape[1:]])
        dtype = np.dtype(t.dtype)
        if dtype == np.uint8:
            feeds[t.name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        elif len(shape) == 4 and shape[1] == 6:  # a visual input: pixels in [0, 1]
            feeds[t.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return feeds
