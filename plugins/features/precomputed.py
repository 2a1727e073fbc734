"""Precomputed AVE rows from an ``.npy`` file (the specification's ``aud_ave.npy``).

For renders whose features were extracted elsewhere (e.g. by SyncTalk_2D's own
preprocessing with the real encoder). The rows come from the file, not from the
audio: the PCM pushed into the stream is ignored, except that the first push
releases all rows at once (so a streaming pipeline starts immediately) and
``finish`` releases them if nothing was pushed. The number of video frames is
therefore the file's row count; the audio that is muxed is the caller's concern.

The engine reads the released rows from the file a block at a time as it takes
them (:class:`RowFile`), so the file's length does not change a render's memory.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np

from avatar.errors import ConfigError, FeatureError
from avatar.hookspecs import hookimpl
from avatar.interfaces import FeatureSource, RowStream

ROW_SIZE = 512


#: rows read (and checked) at a time: a long file is never in memory at once
BLOCK_ROWS = 1024


class RowFile:
    """An ``[N, 512]`` float ``.npy`` file, checked once and read a block of rows at a time.

    The file is opened with ``np.load(mmap_mode="r")`` for its header (shape,
    dtype, data offset) only; rows are read with plain file reads, so what a
    render has read does not stay mapped in the process (a memory map's pages
    count in its resident memory until it is closed: an hour's rows, 184 MB).
    """

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if not p.is_file():
            raise FeatureError(f"feature file not found: {p}; pass path= an .npy file of shape [N, 512] (like aud_ave.npy)")
        try:
            arr = np.load(p, allow_pickle=False, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise FeatureError(
                f"{p.name} is not a readable .npy array ({exc}); save the features with numpy.save(path, rows)"
            ) from exc
        if not isinstance(arr, np.ndarray):  # an .npz archive loads as a mapping
            arr.close()
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
        self.path = p
        self.rows = int(arr.shape[0])
        self.dtype = arr.dtype
        self._offset = int(arr.offset) if arr.flags.c_contiguous else None  # (None: Fortran order, read via the map)
        del arr
        bad = sum(int((~np.isfinite(b)).any(axis=1).sum()) for b in self.blocks(check=False))
        if bad:
            raise FeatureError(f"{p.name} has {bad} row(s) with NaN or infinite values; re-extract the features")

    def __len__(self) -> int:
        return self.rows

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as float32."""
        start, stop = max(0, start), min(self.rows, stop)
        n = max(0, stop - start)
        if self._offset is None:
            block = np.array(np.load(self.path, allow_pickle=False, mmap_mode="r")[start:stop])
        else:
            count = n * ROW_SIZE
            block = np.fromfile(self.path, dtype=self.dtype, count=count, offset=self._offset + start * ROW_SIZE * self.dtype.itemsize)
            if block.size != count:
                raise FeatureError(f"{self.path.name} was cut short while it was read; re-extract the features")
            block = block.reshape(n, ROW_SIZE)
        return np.ascontiguousarray(block, dtype=np.float32)

    def blocks(self, check: bool = True) -> Iterator[np.ndarray]:
        """All rows, :data:`BLOCK_ROWS` at a time (``check``: a row that became non-finite is an error)."""
        for i in range(0, self.rows, BLOCK_ROWS):
            block = self.read(i, i + BLOCK_ROWS)
            if check and not np.isfinite(block).all():
                raise FeatureError(f"{self.path.name} changed while it was read: it has NaN or infinite values now")
            yield block


def load_rows(path: str | Path) -> np.ndarray:
    """Read and validate an ``[N, 512]`` array; return it as float32 (all of it: see :class:`RowFile`)."""
    return RowFile(path).read(0, sys.maxsize)


class PrecomputedSource(FeatureSource):
    """Rows read from an ``.npy`` file ``[N, 512]`` at 25 fps; the audio does not change them.

    Options:
        path: the ``.npy`` file (required).
        padding: ``"replicate"`` (default, the specification's) or ``"zero"`` (upstream's).

    The file is checked when the source is made and read a block at a time as
    frames need its rows: a render holds a few blocks, whatever the file's length.
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
        self.features = RowFile(self.path)

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
    """Releases all rows on the first push (or at finish when nothing was pushed).

    :meth:`push` and :meth:`finish` return them as one array; the engine takes
    them through :meth:`push_blocks` / :meth:`finish_blocks`, read from the file
    a block at a time as its windows are taken.
    """

    def __init__(self, rows: RowFile) -> None:
        self._rows = rows
        self._sent = False

    def _blocks(self) -> Iterator[np.ndarray]:
        if self._sent:
            return iter(())
        self._sent = True
        return self._rows.blocks()

    def _all(self) -> np.ndarray:
        return np.concatenate(list(self._blocks()) or [np.zeros((0, ROW_SIZE), np.float32)])

    def push(self, pcm: np.ndarray) -> np.ndarray:
        return self._all()

    def finish(self) -> np.ndarray:
        return self._all()

    def push_blocks(self, pcm: np.ndarray) -> Iterator[np.ndarray]:
        return self._blocks()

    def finish_blocks(self) -> Iterator[np.ndarray]:
        return self._blocks()


@hookimpl
def register_feature_sources(register) -> None:  # type: ignore[no-untyped-def]
    register(PrecomputedSource)
