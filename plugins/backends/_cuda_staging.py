"""Page-locked host staging and one CUDA stream for ``onnx-cuda``'s bound buffers.

Why: a copy from pageable (ordinary numpy) memory is not a DMA transfer — the
driver first copies it into a page-locked bounce buffer of its own, and the
copy cannot be asynchronous. Staging the batch in page-locked memory we own
makes both directions a direct DMA, and issuing the copies and ONNX Runtime's
kernels on **one** stream (passed to ORT as ``user_compute_stream``) orders
them without any cross-stream synchronisation: H2D copies, the model, D2H
copies, then one ``cudaStreamSynchronize``.

The CUDA runtime comes from ``cuda-bindings`` (NVIDIA's official Python
bindings; imported only when ``onnx-cuda`` loads). Its ``runtime`` module links
the CUDA runtime statically, so its major version must be one the driver
supports: ``cuda-bindings`` 13.x (what the package pins, matching the CUDA 13
build of ``onnxruntime-gpu`` it pins) needs a CUDA 13 driver (580 or newer).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Sequence

import numpy as np

from avatar.errors import BackendError, BackendUnavailable

log = logging.getLogger(__name__)

INSTALL = "pip install cuda-bindings"
#: what to do when the installed cuda-bindings is newer than the driver's CUDA
MATCH_DRIVER = (
    "avatar-sdk's GPU dependencies are built for CUDA 13: update the NVIDIA driver to 580 or newer "
    "(or use --backend cpu)"
)


class PinnedStaging:
    """Page-locked host buffers and one stream on device ``device_id``.

    ``stream``: an existing ``cudaStream_t`` handle (an int) to use instead of a
    new one; it is not destroyed by :meth:`close`.
    """

    kind = "pinned"

    def __init__(self, device_id: int, stream: int | None = None) -> None:
        try:
            from cuda.bindings import runtime as rt
        except ImportError as exc:
            raise BackendUnavailable(f"cuda-bindings is not installed ({exc}); install with `{INSTALL}`") from None
        self._rt = rt
        self.device_id = int(device_id)
        self._own_stream = stream is None
        self._buffers: list[int] = []
        self._check(rt.cudaSetDevice(self.device_id), "cudaSetDevice", unavailable=True)
        if stream is None:
            self._stream = self._check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")
        else:
            self._stream = rt.cudaStream_t(int(stream))
        self._h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost

    @property
    def stream(self) -> int:
        """The stream's handle, for ONNX Runtime's ``user_compute_stream``."""
        return int(self._stream)

    def _check(self, result: Sequence[Any], what: str, unavailable: bool = False) -> Any:
        err, *values = result
        if err != self._rt.cudaError_t.cudaSuccess:
            _, name = self._rt.cudaGetErrorName(err)
            _, text = self._rt.cudaGetErrorString(err)
            msg = f"onnx-cuda: {what} failed: {name.decode()} ({text.decode()})"
            if unavailable:
                import cuda.bindings

                msg += f"; cuda-bindings {cuda.bindings.__version__} may be newer than the driver's CUDA ({MATCH_DRIVER})"
                raise BackendUnavailable(msg)
            raise BackendError(msg)
        return values[0] if len(values) == 1 else tuple(values)

    def empty(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A page-locked numpy array, freed by :meth:`close` (views must not outlive it)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr = int(self._check(self._rt.cudaHostAlloc(nbytes, self._rt.cudaHostAllocDefault), f"cudaHostAlloc({nbytes} bytes)"))
        self._buffers.append(ptr)
        return np.frombuffer((ctypes.c_ubyte * nbytes).from_address(ptr), dtype).reshape(shape)

    def bind_thread(self) -> None:
        """Make the device current on the calling thread (the engine runs us on a worker)."""
        self._check(self._rt.cudaSetDevice(self.device_id), "cudaSetDevice")

    def to_device(self, dst_ptr: int, src: np.ndarray) -> None:
        """Queue an H2D copy of the page-locked ``src`` into device memory at ``dst_ptr``."""
        self._check(self._rt.cudaMemcpyAsync(dst_ptr, src.ctypes.data, src.nbytes, self._h2d, self._stream), "H2D copy")

    def to_host(self, dst: np.ndarray, src_ptr: int) -> None:
        """Queue a D2H copy from device memory at ``src_ptr`` into the page-locked ``dst``."""
        self._check(self._rt.cudaMemcpyAsync(dst.ctypes.data, src_ptr, dst.nbytes, self._d2h, self._stream), "D2H copy")

    def synchronize(self) -> None:
        self._check(self._rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Free the host buffers and the stream this object made. Idempotent."""
        rt = self._rt
        for ptr in self._buffers:
            rt.cudaFreeHost(ptr)
        self._buffers = []
        if self._own_stream and self._stream is not None:
            rt.cudaStreamDestroy(self._stream)
        self._stream = None

