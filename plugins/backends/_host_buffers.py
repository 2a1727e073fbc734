"""Host staging buffers that cannot be freed under a caller's feet.

``alias_outputs`` hands callers views of page-locked output buffers instead of
copies. Page-locked memory is freed explicitly (``cudaFreeHost``,
``HostAllocation.free``), not by numpy's reference counting, so a view kept
past ``close()`` would read freed memory. :class:`LeasedBuffers` closes that
hole: every aliased array it lends keeps a lease object alive (numpy keeps the
object that exposes ``__array_interface__`` as the array's ``base``, and every
view of the array keeps that base), and the buffers are freed only when the
owner has closed *and* the last lease is gone. Nothing here imports CUDA.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)


class _Lease:
    """Exposes one array's memory to numpy and keeps it (and its owner's buffers) alive."""

    __slots__ = ("_array", "__weakref__")

    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    @property
    def __array_interface__(self) -> dict[str, Any]:
        return self._array.__array_interface__


class LeasedBuffers:
    """Frees host buffers with ``free()`` once closed and no lent view is alive."""

    def __init__(self, free: Callable[[], None], what: str = "host buffers") -> None:
        self._free: Callable[[], None] | None = free
        self._what = what
        self._live = 0
        self._closed = False
        self._lock = threading.RLock()  # a lease may die (and call back) on any thread

    @property
    def live(self) -> int:
        """How many lent arrays (or views of them) are still alive."""
        return self._live

    @property
    def freed(self) -> bool:
        return self._free is None

    def lend(self, array: np.ndarray) -> np.ndarray:
        """An array over the same memory as ``array`` that keeps the buffers alive while it (or a view) lives."""
        lease = _Lease(array)
        out = np.asarray(lease)
        if out.base is not lease:  # the lease must be what keeps the memory alive, or close() could free it under a view
            raise RuntimeError("numpy did not keep the lease as the lent array's base")
        with self._lock:
            self._live += 1
        weakref.finalize(lease, self._returned)
        return out

    def _returned(self) -> None:
        with self._lock:
            self._live -= 1
            now = self._closed and self._live == 0
        if now:
            self._release()

    def close(self) -> None:
        """Free now, or when the last lent array dies. Idempotent."""
        with self._lock:
            self._closed = True
            now = self._live == 0
        if now:
            self._release()
        elif self._free is not None:
            log.debug("%s: %d aliased output(s) still alive; freeing when the last one is gone", self._what, self._live)

    def _release(self) -> None:
        with self._lock:
            free, self._free = self._free, None
        if free is not None:
            free()
