"""Precomputed AVE rows from an ``.npy`` file (the specification's ``aud_ave.npy``).

For renders whose features were extracted elsewhere (e.g. by SyncTalk_2D's own
preprocessing with the real encoder). The rows come from the file, not from the
audio: the PCM pushed into the stream is ignored, except that the first push
releases all rows at once (so a streaming pipeline starts immediately) and
``finish`` releases them if nothing was pushed. The number of video frames is
therefore the file's row count; the audio that is muxed is the caller's concern.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from avatar.errors import ConfigError, FeatureError
from avatar.hookspecs import hookimpl
from avatar.interfaces import FeatureSource, RowStream

ROW_SIZE = 512


def load_rows(path: str | Path) -> np.ndarray:
    """Read and validate an ``[N, 512]`` float array; return it as float32."""
    p = Path(path)
    if not p.is_file():
        raise FeatureError(f"feature file not found: {p}; pass path= an .npy file of shape [N, 512] (like aud_ave.npy)")
    try:
        arr = np.load(p, allow_pickle=False, mmap_mode=None)
    except (ValueError, OSError, EOFError) as exc:
        raise FeatureError(
            f"{p.name} is not a readable .npy array ({exc}); save the features with numpy.save(path, rows)"
        ) from exc
    if not isinstance(arr, np.ndarray):  # an .npz archive loads as a mapping
        raise FeatureError(f"{p.name} is an .npz archive; save one array with numpy.save(path, rows)")
    if arr.ndim != 2 or arr.shape[1] != ROW_SIZE:
        shape = "[" + ",".join(str(d) for d in arr.shape) + "]"
        raise FeatureError(
            f"{p.name} has shape {shape}; AVE features must be [N,{ROW_SIZE}] (one 512-value row per 25 fps frame)"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise FeatureError(f"{p.name} holds {arr.dtype.name} values; AVE features must be floating point (float32)")
    if len(arr) == 0:
        raise FeatureError(f"{p.name} holds no rows; it must have at least one [512] row")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise FeatureError(f"{p.name} has {bad} row(s) with NaN or infinite values; re-extract the features")
    return np.ascontiguousarray(arr, dtype=np.float32)


class PrecomputedSource(FeatureSource):
    """Rows read from an ``.npy`` file ``[N, 512]`` at 25 fps; the audio does not change them.

    Options:
        path: the ``.npy`` file (required).
        padding: ``"replicate"`` (default, the specification's) or ``"zero"`` (upstream's).
    """

    name: ClassVar[str] = "npy"
    description: ClassVar[str] = "precomputed AVE rows from an .npy file [N, 512] (e.g. aud_ave.npy)"
    fps: ClassVar[Fraction] = Fraction(25)
    row_shape: ClassVar[tuple[int, ...]] = (ROW_SIZE,)
    window_shape: ClassVar[tuple[int, ...]] = (32, 16, 16)
    default_padding: ClassVar[str] = "replicate"

    def __init__(self, *, path: str | Path | None = None, padding: str | None = None, **options: Any) -> None:
        super().__init__(padding=padding)
        if options:
            raise ConfigError(f"unknown option(s) for feature source 'npy': {', '.join(sorted(options))} (valid: path, padding)")
        if path is None or str(path) == "":
            raise ConfigError("the 'npy' feature source needs path=FILE.npy with [N, 512] AVE rows (like aud_ave.npy)")
        self.path = Path(path)
        self.features = load_rows(self.path)

    def expected_frames(self, samples: int | None) -> int:
        """The file's row count, whatever ``samples`` (the audio's length; None for live audio) is.

        Every row becomes a frame and the audio neither adds nor removes any
        (see the module docstring), so a count derived from the audio, as for
        sources that extract rows from it, would tell sinks (progress total,
        file metadata) a number of frames the render never produces.
        """
        return len(self.features)

    def open_stream(self) -> "PrecomputedStream":
        return PrecomputedStream(self.features)


class PrecomputedStream(RowStream):
    """Releases all rows on the first push (or at finish when nothing was pushed)."""

    def __init__(self, rows: np.ndarray) -> None:
        self._rows = rows
        self._sent = False

    def _take(self) -> np.ndarray:
        if self._sent:
            return np.zeros((0, ROW_SIZE), np.float32)
        self._sent = True
        return self._rows.copy()

    def push(self, pcm: np.ndarray) -> np.ndarray:
        return self._take()

    def finish(self) -> np.ndarray:
        return self._take()


@hookimpl
def register_feature_sources(register) -> None:  # type: ignore[no-untyped-def]
    register(PrecomputedSource)
