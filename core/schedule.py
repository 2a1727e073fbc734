"""Which avatar frame shows at each output frame: the ping-pong walk.

When the speech is longer than the avatar video, the avatar frames are walked
forward then backward (0, 1, ..., n-1, n-2, ..., 1, 0, 1, ...) so the motion
never jumps. The turning frames are shown once, not twice: a repeated frame
reads as a stall. (Upstream SyncTalk_2D starts its walk at frame 1; here output
frame 0 shows avatar frame 0 unless a render is given ``walk_start=1``.)
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError


def pingpong(i: int, n: int) -> int:
    """Avatar frame for output frame ``i`` of an ``n``-frame avatar (``n = 1``: always 0)."""
    if n < 1:
        raise ConfigError(f"an avatar needs at least one frame, got n={n}")
    if i < 0:
        raise ConfigError(f"output frame index must be >= 0, got {i}")
    if n == 1:
        return 0
    period = 2 * (n - 1)
    k = i % period
    return k if k < n else period - k


def schedule(count: int, n: int, start: int = 0) -> np.ndarray:
    """Avatar frames ``[count]`` (int64) for output frames ``start .. start + count - 1``.

    ``start`` lets a live stream continue the walk where an earlier chunk ended.
    """
    if count < 0:
        raise ConfigError(f"count must be >= 0, got {count}")
    if n < 1:
        raise ConfigError(f"an avatar needs at least one frame, got n={n}")
    if start < 0:
        raise ConfigError(f"start must be >= 0, got {start}")
    i = np.arange(start, start + count, dtype=np.int64)
    if n == 1:
        return np.zeros(count, dtype=np.int64)
    period = 2 * (n - 1)
    k = i % period
    return np.where(k < n, k, period - k)
