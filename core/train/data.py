"""What training reads from an avatar package: face crops, audio windows, the split.

The audio windows come from the SDK's own feature sources (the same code the
renders use), so training and inference cannot disagree: ``ave`` with the
user's encoder, ``hubert``, ``wenet``, or ``npy`` (precomputed ``[N, 512]``
AVE rows, e.g. the ``aud_ave.npy`` SyncTalk_2D's preprocessing writes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: the model family's audio-window shapes → the UNet's audio branch
MODES = {(32, 16, 16): "ave", (32, 32, 32): "hubert", (256, 16, 32): "wenet"}
#: the mouth box of the 320 face (rows, cols) used for the lower-face weight and the lip-sync signal
MOUTH_ROWS, MOUTH_COLS = slice(150, 300), slice(70, 250)
#: recordings shorter than this are refused unless the caller allows it
MIN_TRAIN_S = 30.0


@dataclass
class TrainData:
    """Faces ``[N,320,320,3]`` uint8 BGR, windows ``[N,*shape]`` float32, and the split."""

    faces: np.ndarray
    windows: np.ndarray
    train: np.ndarray  # frame indices trained on
    held_out: np.ndarray  # frame indices never trained on
    mode: str
    padding: str
    features: str
    feature_options: dict[str, Any] = field(default_factory=dict)
    excluded: list[int] = field(default_factory=list)


def feature_windows(package: Any, features: str, options: Mapping[str, Any]) -> tuple[np.ndarray, Any]:
    """All audio windows of the package's recording through the named feature source."""
    from ..audio import load_audio
    from ..render import make_feature_source

    name = features
    source = make_feature_source(name, options)
    try:
        if Fraction(source.fps) != Fraction(package.fps).limit_denominator(1001):
            raise ConfigError(
                f"the {features} features run at {float(source.fps):g} fps but the avatar at {package.fps:g} fps; "
                f"prepare the video with --fps {float(source.fps):g}"
            )
        audio = package.path / str(package.manifest.source.get("audio", "audio.wav"))
        if name == "npy":
            pcm = np.zeros(1600, np.float32)  # the rows come from the file
        elif audio.is_file():
            pcm = load_audio(audio, source.sample_rate)
        else:
            raise ConfigError(
                f"{package.path} has no recording ({audio.name}); make the package with `avatar prepare`, "
                "or train on precomputed rows: --features npy --features-file aud_ave.npy"
            )
        windows = np.ascontiguousarray(source.windows(pcm), dtype=np.float32)
    finally:
        source.close()
    return windows, source


def load_data(
    package: Any,
    *,
    features: str = "ave",
    feature_options: Mapping[str, Any] | None = None,
    holdout: float = 0.05,
    holdout_start: int | None = None,
    frames: int | None = None,
    allow_short: bool = False,
) -> TrainData:
    """Faces and windows of ``package`` with the held-out frames split off (the last ones)."""
    options = dict(feature_options or {})
    windows, source = feature_windows(package, features, options)
    shape = tuple(windows.shape[1:])
    mode = MODES.get(shape)
    if mode is None:
        raise ConfigError(f"the {features} feature source gives windows {list(shape)}, which no UNet-328 takes")
    faces = package.faces
    n = min(len(faces), len(windows))
    if abs(len(faces) - len(windows)) > 2:
        log.warning("the avatar has %d frames but the audio gives %d windows; training on the first %d",
                    len(faces), len(windows), n)
    if frames is not None:
        n = min(n, frames)
    seconds = n / package.fps
    if seconds < MIN_TRAIN_S and not allow_short:
        raise ConfigError(
            f"{n} frames ({seconds:.1f} s) are too few to train on; at least {MIN_TRAIN_S:.0f} s are needed "
            "(3-5 minutes recommended). Pass --allow-short to train anyway (tests, smoke runs)"
        )
    if holdout_start is None:
        holdout_start = n - max(1, int(round(n * holdout)))
    if not 1 <= holdout_start < n:
        raise ConfigError(f"the held-out frames must start inside 1..{n - 1}, not at {holdout_start}")
    excluded = sorted(int(i) for i in package.manifest.source.get("excluded_frames", []) if 0 <= int(i) < n)
    keep = np.ones(n, bool)
    keep[excluded] = False
    idx = np.arange(n)
    train, held = idx[:holdout_start][keep[:holdout_start]], idx[holdout_start:][keep[holdout_start:]]
    if len(train) < 2 or len(held) < 1:
        raise ConfigError(f"{len(train)} training and {len(held)} held-out frames: too few to train")
    return TrainData(faces, windows[:n], train, held, mode, source.padding, features, options, excluded)


def face_psnr(a: np.ndarray, b: np.ndarray, region: tuple[slice, slice] | None = None) -> float:
    """PSNR (dB) of uint8 images, over a region of the 320 face when given."""
    if region is not None:
        a, b = a[..., region[0], region[1], :], b[..., region[0], region[1], :]
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)
