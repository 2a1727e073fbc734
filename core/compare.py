"""Seeded model inputs and output comparisons, shared by backends, tests and the benchmark."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .interfaces import TensorInfo


def psnr(reference: np.ndarray, test: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``test`` against ``reference`` (inf when equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    tst = np.asarray(test, dtype=np.float64)
    mse = float(np.mean((ref - tst) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(peak * peak / mse))


def random_feeds(inputs: Sequence[TensorInfo], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random feeds matching a model: pixels in [0, 1] (0..255 for uint8), audio ~N(0, 1).

    Dynamic non-batch axes get size 1. The same ``seed`` gives the same arrays in
    every process, so every backend sees identical inputs.
    """
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
