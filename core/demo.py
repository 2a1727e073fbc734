"""The out-of-the-box demo: a synthetic avatar, seeded test models, speech-like audio.

Everything is generated locally (no downloads). The model is the shipped demo
model (``avatar/models/demo/``, a quarter-width UNet-328 that ``avatar train``
trained on this synthetic head talking; see :mod:`avatar.demo_model`): its
mouth opens with speech and closes in silence. ``tiny``/``trained=False`` give
the seeded **untrained** test models instead.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000


def synthetic_frames(
    n: int = 50, width: int = 640, height: int = 480, seed: int = 0, mouth: np.ndarray | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """A drawn head that sways and blinks; returns BGR frames and crop boxes [n,4].

    The crop box follows the SyncTalk_2D rule's geometry: a square over the
    lower face, from the cheeks' width and starting just under the eyes.
    ``mouth`` (one value in [0, 1] per frame, see :func:`mouth_opening`) draws
    an open mouth of that size instead of the thin closed one: the recording
    the demo's model was trained on.
    """
    import cv2

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack(
        [120 + 60 * xx / width, 90 + 40 * yy / height, 60 + 30 * (1 - xx / width)], axis=-1
    ).astype(np.uint8)
    noise = rng.integers(0, 6, size=background.shape, dtype=np.uint8)
    frames, boxes = [], []
    for i in range(n):
        t = i / max(n - 1, 1)
        cx = int(width / 2 + 12 * math.sin(2 * math.pi * t))
        cy = int(height / 2 + 6 * math.sin(4 * math.pi * t))
        rx, ry = int(width * 0.17), int(height * 0.3)
        img = cv2.add(background, noise)
        cv2.ellipse(img, (cx, cy + ry + 60), (int(rx * 1.9), 80), 0, 180, 360, (70, 60, 140), -1)  # shoulders
        cv2.ellipse(img, (cx, cy), (rx, ry), 0, 0, 360, (150, 180, 225), -1)  # face (BGR skin)
        cv2.ellipse(img, (cx, cy - int(ry * 0.7)), (int(rx * 1.05), int(ry * 0.45)), 0, 180, 360, (40, 50, 70), -1)
        blink = i % 25 in (11, 12)
        for sx in (-1, 1):
            ex, ey = cx + sx * int(rx * 0.4), cy - int(ry * 0.2)
            cv2.ellipse(img, (ex, ey), (int(rx * 0.16), 2 if blink else int(ry * 0.07)), 0, 0, 360, (250, 250, 250), -1)
            if not blink:
                cv2.circle(img, (ex, ey), int(ry * 0.045), (60, 40, 30), -1)
        cv2.line(img, (cx, cy - int(ry * 0.1)), (cx - 6, cy + int(ry * 0.18)), (120, 140, 190), 3)  # nose
        if mouth is None:
            cv2.ellipse(img, (cx, cy + int(ry * 0.45)), (int(rx * 0.35), int(ry * 0.06)), 0, 0, 360, (90, 90, 170), -1)
        else:
            _draw_mouth(img, (cx, cy + int(ry * 0.6)), rx, ry, float(mouth[i]))
        x1, x2 = cx - int(rx * 0.8), cx + int(rx * 0.8)
        y1 = cy - int(ry * 0.05)
        frames.append(img)
        boxes.append((x1, y1, x2, y1 + (x2 - x1)))
    return frames, np.asarray(boxes, dtype=np.int32)


def _draw_mouth(img: np.ndarray, centre: tuple[int, int], rx: int, ry: int, opening: float) -> None:
    """Lips and a dark opening whose height follows ``opening`` (0 closed .. 1 wide open)."""
    import cv2

    o = float(np.clip(opening, 0.0, 1.0))
    w, h = int(rx * 0.35), int(ry * (0.035 + 0.16 * o))
    cv2.ellipse(img, centre, (w, h + 4), 0, 0, 360, (90, 90, 170), -1)  # lips
    if h > 2:
        cv2.ellipse(img, centre, (max(w - 6, 2), h - 2), 0, 0, 360, (40, 25, 60), -1)  # the opening


def mouth_opening(pcm: np.ndarray, frames: int, fps: float = 25, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Per-frame mouth opening in [0, 1] from the loudness of the audio around each frame (40 ms RMS, dB scaled)."""
    half = int(sample_rate * 0.02)
    out = np.zeros(frames, np.float32)
    for i in range(frames):
        c = int(round(i / fps * sample_rate))
        seg = pcm[max(0, c - half): c + half]
        rms = float(np.sqrt(np.mean(np.square(seg, dtype=np.float64)))) if len(seg) else 0.0
        out[i] = np.clip((20 * np.log10(max(rms, 1e-6)) + 28) / 14, 0, 1)
    return out


def speechlike_audio(seconds: float = 6.0, seed: int = 0) -> np.ndarray:
    """Voiced, syllable-shaped audio (additive formant synthesis) at 16 kHz.

    Not speech, but it has what the mel features care about: a pitched source,
    moving formants and syllable-rate loudness changes with pauses.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 125 + 15 * np.sin(2 * np.pi * 0.7 * t) + 5 * np.sin(2 * np.pi * 5.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    vowels = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480], [570, 840, 2410]])
    syll = 0.18
    idx = rng.integers(0, len(vowels), size=int(seconds / syll) + 2)
    seg = np.minimum((t / syll).astype(int), len(idx) - 1)
    frac = (t / syll) % 1.0
    formants = vowels[idx[seg]] * (1 - frac[:, None]) + vowels[idx[np.minimum(seg + 1, len(idx) - 1)]] * frac[:, None]
    out = np.zeros(n)
    for k in range(1, 40):
        fk = k * f0
        gain = sum(np.exp(-0.5 * ((fk - formants[:, j]) / (60 + 40 * j)) ** 2) / (j + 1) for j in range(3))
        out += gain * np.sin(k * phase) / k**0.5
    envelope = np.clip(np.sin(np.pi * frac), 0, 1) ** 0.6
    pauses = (rng.random(len(idx)) < 0.15)[seg]
    envelope[pauses] = 0.0
    out *= envelope
    out += 0.002 * rng.standard_normal(n)
    return (0.6 * out / (np.abs(out).max() + 1e-9)).astype(np.float32)


def build_demo(
    workdir: str | Path, *, frames: int = 50, seconds: float = 6.0, tiny: bool = False, seed: int = 0,
    trained: bool = True,
) -> dict[str, Path]:
    """Create (or reuse) the demo avatar package, models and audio in ``workdir``.

    By default the model is the shipped trained demo model (a quarter-width
    UNet-328 trained with ``avatar train`` on this head talking, see
    :mod:`avatar.demo_model`); ``trained=False`` gives the seeded untrained
    full-size UNet-328, ``tiny`` the untrained tiny test model. ``paths["kind"]``
    says which (``"trained"``, ``"untrained"``, ``"tiny"``).
    """
    from .demo_model import ENCODER, MODEL, available
    from .models.synthetic import make_audio_encoder, make_unet
    from .package import write_package

    kind = "tiny" if tiny else ("trained" if trained and available() else "untrained")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = {"frames": frames, "seconds": seconds, "kind": kind, "seed": seed, "version": 2}
    stamp_file = workdir / "demo.json"
    paths = {
        "avatar": workdir / ("avatar_trained" if kind == "trained" else "avatar"),
        "model": MODEL if kind == "trained" else workdir / ("unet_tiny.onnx" if tiny else "unet.onnx"),
        "encoder": ENCODER if kind == "trained" else workdir / ("ave_encoder_tiny.onnx" if tiny else "ave_encoder.onnx"),
        "audio": workdir / "speech.wav",
    }
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp and all(p.exists() for p in paths.values()):
        return {**paths, "kind": kind}  # type: ignore[dict-item]
    log.info("building the demo in %s", workdir)
    # the trained model learned this head with the open-mouth drawing: its avatar shows the mouth closed
    imgs, boxes = synthetic_frames(frames, seed=seed, mouth=np.zeros(frames) if kind == "trained" else None)
    write_package(paths["avatar"], iter(imgs), boxes, fps=25, name="demo (synthetic)", overwrite=True)
    if kind != "trained":
        make_unet(paths["model"], mode="ave", seed=seed, tiny=tiny)
        make_audio_encoder(paths["encoder"], seed=seed, tiny=tiny)
    write_wav(paths["audio"], speechlike_audio(seconds, seed=seed))
    stamp_file.write_text(json.dumps(stamp))
    return {**paths, "kind": kind}  # type: ignore[dict-item]


def describe_model(kind: str) -> str:
    """One line on what the demo's model is, for the demo's output."""
    if kind == "trained":
        return ("the demo model: a quarter-width UNet-328 trained with `avatar train` on 30 s of this cartoon head "
                "talking (python -m avatar.demo_model); it knows this cartoon's mouth only — train your own with "
                "`avatar prepare` + `avatar train`")
    return ("an untrained seeded test model: the mouth region changes with the audio but does not look like a mouth; "
            "drop --untrained/--tiny for the trained demo model")


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM mono WAV (stdlib ``wave``)."""
    import wave

    data = (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(data)
