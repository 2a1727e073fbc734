"""Per-frame audio windows: rows ``[i - before, i - before + count)`` around frame ``i``.

Edge padding is ``replicate`` (the specification: repeat the first/last row) or
``zero`` (upstream SyncTalk_2D training and inference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    from .interfaces import FeatureSource


def window_indices(i: int, n: int, before: int = 8, count: int = 16) -> np.ndarray:
    """Row indices of frame ``i``'s window; out-of-range entries are -1."""
    idx = np.arange(i - before, i - before + count)
    idx[(idx < 0) | (idx >= n)] = -1
    return idx


def window(rows: np.ndarray, i: int, *, padding: str, before: int = 8, count: int = 16) -> np.ndarray:
    """The ``[count, *row_shape]`` window of frame ``i`` over all ``rows``."""
    n = len(rows)
    idx = np.arange(i - before, i - before + count)
    if padding == "replicate":
        return rows[np.clip(idx, 0, n - 1)]
    out = np.zeros((count, *rows.shape[1:]), dtype=rows.dtype)
    ok = (idx >= 0) & (idx < n)
    out[ok] = rows[idx[ok]]
    return out


def make_windows(rows: np.ndarray, source: "FeatureSource") -> np.ndarray:
    """All windows ``[N, *window_shape]`` for ``rows`` using the source's layout."""
    return np.stack(
        [
            window(rows, i, padding=source.padding, before=source.window_before, count=source.window_rows).reshape(
                source.window_shape
            )
            for i in range(len(rows))
        ]
    ) if len(rows) else np.zeros((0, *source.window_shape), np.float32)


class WindowAssembler:
    """Streaming windows: feed rows as they come, get each frame's window once final.

    Window ``i`` is final when row ``i - before + count - 1`` exists or the
    stream has ended; the output equals :func:`make_windows` on all rows.
    """

    def __init__(self, source: "FeatureSource") -> None:
        self.source = source
        # Only rows still needed are kept (live streams run for hours):
        # self._rows[k] is row self._base + k, one array (a window inside it is one slice).
        self._rows: np.ndarray = np.zeros((0, *source.row_shape), np.float32)
        self._base = 0
        self._next = 0
        self._first: np.ndarray | None = None

    @property
    def kept_rows(self) -> int:
        """Rows held for windows not yet made (bounded by the window length, however long the stream)."""
        return len(self._rows)

    def _emit(self, i: int, final_n: int | None) -> np.ndarray:
        s = self.source
        before, count = s.window_before, s.window_rows
        n_known = self._base + len(self._rows) if final_n is None else final_n
        lo = i - before
        if lo >= self._base and lo + count <= n_known:  # away from the edges: one copy of one slice
            return self._rows[lo - self._base : lo - self._base + count].reshape(s.window_shape).copy()
        parts = []
        for j in range(lo, lo + count):
            if 0 <= j < n_known:
                parts.append(self._rows[j - self._base])
            elif s.padding == "replicate":
                parts.append(self._first if j < 0 and self._first is not None else self._rows[n_known - 1 - self._base])
            else:
                parts.append(np.zeros(s.row_shape, np.float32))
        return np.stack(parts).reshape(s.window_shape)

    def push(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Add rows; yield ``(frame index, window)`` for every window now final."""
        rows = np.asarray(rows, dtype=np.float32)
        if len(rows):
            if self._first is None:
                self._first = rows[0]
            # the rows kept from earlier pushes (a window's worth) and the new ones in one array;
            # with none kept (the first push: an offline signal's rows at once) the rows are not copied
            self._rows = np.concatenate([self._rows, rows]) if len(self._rows) else rows
        need_after = self.source.window_rows - self.source.window_before - 1
        while self._next + need_after < self._base + len(self._rows):
            yield self._next, self._emit(self._next, None)
            self._next += 1
        drop = self._next - self.source.window_before - self._base
        if drop > 0:
            self._rows = self._rows[drop:]
            self._base += drop

    def finish(self) -> Iterator[tuple[int, np.ndarray]]:
        """End of rows: yield the remaining windows (padded at the end)."""
        n = self._base + len(self._rows)
        while self._next < n:
            yield self._next, self._emit(self._next, n)
            self._next += 1
