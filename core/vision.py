"""Crop rule, model input preprocessing, the mouth mask and compositing.

Pure numpy/OpenCV functions on BGR ``uint8`` images; they run per frame in the
hot path, so they touch only the crop box region of a full frame.

The rules (SyncTalk_2D, see ``docs/avatar-package.md``):

* box from 110-point landmarks: ``x1 = lms[1].x``, ``y1 = lms[52].y``,
  ``x2 = lms[31].x``, ``side = x2 - x1``, box ``(x1, y1, x2, y1 + side)``;
  coordinates are truncated to integers like upstream (``np.int32`` cast);
* crop the box → resize to 328x328 → keep ``[4:324, 4:324]`` (320x320);
* the masked copy blacks out ``cv2.rectangle(img, (5, 5, 310, 305), 0, -1)``,
  which OpenCV draws as columns 5..314 and rows 5..309 inclusive (a ``Rect``'s
  far edge is exclusive), leaving a 5-pixel frame;
* the model output goes into the frame's own 328 crop at ``[4:324, 4:324]``,
  which is resized back to the box size and pasted into the frame.

Boxes that cross the frame edge are legal: the out-of-frame part of a crop is
filled by replicating the nearest edge pixel (``BORDER_REPLICATE``), and only
the in-frame part of a composited box is written back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import cv2
import numpy as np

from .errors import AvatarPackageError, ConfigError

Box = tuple[int, int, int, int]

#: number of points in a SyncTalk_2D (PFLD) landmark file
LMS_POINTS = 110
CROP_SIZE = 328
FACE_SIZE = 320
#: the 320 face sits at ``[FACE_OFFSET:FACE_OFFSET + FACE_SIZE]`` of the 328 crop
FACE_OFFSET = 4
#: a crop box side may be at most this many times the frame's larger side
MAX_BOX_FACTOR = 2
#: ``cv2.rectangle(img, (5, 5, 310, 305), 0, -1)`` as half-open slices
MASK_ROWS = slice(5, 310)
MASK_COLS = slice(5, 315)

#: manifest names of the resize interpolations
INTERPOLATIONS: dict[str, int] = {
    "cubic": cv2.INTER_CUBIC,
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
    "lanczos": cv2.INTER_LANCZOS4,
}
#: upstream inference crops with INTER_CUBIC (its training effectively used bilinear)
DEFAULT_INTERPOLATION = "cubic"

Interp = Union[str, int]


def interpolation_flag(interpolation: Interp) -> int:
    """OpenCV flag for a manifest name (``"cubic"``) or a flag passed through."""
    if isinstance(interpolation, str):
        try:
            return INTERPOLATIONS[interpolation]
        except KeyError:
            raise ConfigError(
                f"unknown interpolation {interpolation!r}; use one of {', '.join(INTERPOLATIONS)}"
            ) from None
    return int(interpolation)


# --------------------------------------------------------------------------- landmarks


def read_lms(path: str | Path) -> np.ndarray:
    """Read a ``.lms`` file (110 lines ``x y``) as float32 ``[110, 2]``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise AvatarPackageError(f"cannot read landmark file {path}: {exc}") from None
    rows = [line.split() for line in text.splitlines() if line.strip()]
    try:
        pts = np.array([[float(v) for v in r] for r in rows], dtype=np.float32)
    except ValueError:
        raise AvatarPackageError(f"landmark file {path} has a non-numeric value; expected 110 lines 'x y'") from None
    if len(rows) != LMS_POINTS or pts.ndim != 2 or pts.shape[1] != 2:
        cols = {len(r) for r in rows}
        raise AvatarPackageError(
            f"landmark file {path} has {len(rows)} points ({'/'.join(map(str, sorted(cols))) or 0} values per line); "
            f"a SyncTalk_2D .lms file has {LMS_POINTS} lines 'x y' — regenerate it with the 110-point detector"
        )
    return pts


def crop_box_from_landmarks(lms: np.ndarray) -> Box:
    """The SyncTalk_2D crop box ``(x1, y1, x2, y2)`` of one frame's landmarks.

    Coordinates are cast to int32 first (truncation toward zero), exactly as
    upstream does, so boxes match those its training saw.
    """
    pts = np.asarray(lms)
    if pts.shape != (LMS_POINTS, 2):
        raise AvatarPackageError(f"landmarks must be [{LMS_POINTS}, 2], got {list(pts.shape)}")
    p = pts.astype(np.int32)
    x1, y1, x2 = int(p[1, 0]), int(p[52, 1]), int(p[31, 0])
    side = x2 - x1
    if side <= 0:
        raise AvatarPackageError(
            f"landmarks give an empty crop box (x1={x1}, x2={x2}); point 31 must lie right of point 1 — "
            "check that the landmark file is the 110-point scheme"
        )
    return (x1, y1, x2, y1 + side)


# --------------------------------------------------------------------------- crops


def _region(frame: np.ndarray, box: Box) -> np.ndarray:
    """Pixels of ``box``; out-of-frame parts replicate the nearest edge pixel.

    Fully inside, this is a view (no copy).
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    h, w = frame.shape[:2]
    if x2 <= x1 or y2 <= y1:
        raise AvatarPackageError(f"crop box {tuple(box)} is empty")
    if max(x2 - x1, y2 - y1) > MAX_BOX_FACTOR * max(w, h):
        # the replicated region below would be allocated whole: (0, 0, 100000, 100000) is 28 GiB
        raise AvatarPackageError(
            f"crop box {tuple(box)} is more than {MAX_BOX_FACTOR}x the {w}x{h} frame; check the landmarks or boxes"
        )
    if x1 >= 0 and y1 >= 0 and x2 <= w and y2 <= h:
        return frame[y1:y2, x1:x2]
    rows = np.clip(np.arange(y1, y2), 0, h - 1)
    cols = np.clip(np.arange(x1, x2), 0, w - 1)
    return frame[rows[:, None], cols[None, :]]


def crop_328(frame: np.ndarray, box: Box, interpolation: Interp = DEFAULT_INTERPOLATION) -> np.ndarray:
    """The box resized to ``[328, 328, 3]`` uint8 (a new array)."""
    return cv2.resize(_region(frame, box), (CROP_SIZE, CROP_SIZE), interpolation=interpolation_flag(interpolation))


def face_320(frame: np.ndarray, box: Box, interpolation: Interp = DEFAULT_INTERPOLATION) -> np.ndarray:
    """The model's face crop ``[320, 320, 3]`` uint8: ``crop_328(...)[4:324, 4:324]``, contiguous."""
    c = crop_328(frame, box, interpolation)
    return np.ascontiguousarray(c[FACE_OFFSET : FACE_OFFSET + FACE_SIZE, FACE_OFFSET : FACE_OFFSET + FACE_SIZE])


def mask_face(face: np.ndarray) -> np.ndarray:
    """A masked copy of a 320 face: the mouth-and-jaw rectangle set to black."""
    _check_face(face)
    out = face.copy()
    cv2.rectangle(out, (5, 5, 310, 305), (0, 0, 0), -1)
    return out


def _check_face(face: np.ndarray) -> None:
    if face.shape[-3:] != (FACE_SIZE, FACE_SIZE, 3):
        raise ConfigError(f"a face crop must be [{FACE_SIZE}, {FACE_SIZE}, 3], got {list(face.shape)}")


def visual_batch(faces: np.ndarray) -> np.ndarray:
    """Model visual inputs ``[B, 6, 320, 320]`` uint8 from faces ``[B, 320, 320, 3]`` (BGR).

    Channels are ``[face B, G, R, masked B, G, R]``. Values stay uint8; divide by
    255 as late as possible (ideally on the device) to move 4x fewer bytes.
    """
    faces = np.asarray(faces)
    _check_face(faces)
    if faces.ndim != 4:
        raise ConfigError(f"visual_batch takes [B, 320, 320, 3], got {list(faces.shape)}")
    out = np.empty((faces.shape[0], 6, FACE_SIZE, FACE_SIZE), dtype=np.uint8)
    for i in range(len(faces)):  # OpenCV's split into the planes: the bytes of a transpose, at a third of its cost
        planes = [out[i, 0], out[i, 1], out[i, 2]]
        got = cv2.split(np.ascontiguousarray(faces[i]), planes)
        for plane, g in zip(planes, got):
            if g is not plane:  # (OpenCV wrote elsewhere: never for matching planes)
                plane[...] = g
    out[:, 3:] = out[:, :3]  # a plain copy of the face planes: cheaper than transposing again
    out[:, 3:, MASK_ROWS, MASK_COLS] = 0
    return out


def visual_input(face: np.ndarray) -> np.ndarray:
    """One model visual input ``[6, 320, 320]`` uint8 from a 320 face (BGR)."""
    return visual_batch(np.asarray(face)[None])[0]


def normalize(visual: np.ndarray) -> np.ndarray:
    """uint8 visual input(s) to the model's float32 [0, 1].

    A division, not a multiplication by 1/255: it is bit-identical to the
    specification's ``x / 255.0`` and to the ``Div(255)`` that the uint8-input
    graph option puts on the device, so both paths give the same frames.
    """
    return np.divide(visual, np.float32(255.0), dtype=np.float32)


# --------------------------------------------------------------------------- output


#: how :func:`output_to_uint8` turns [0, 1] floats into 8-bit levels
ROUNDINGS = ("nearest", "truncate")


def output_to_uint8(out: np.ndarray, *, rounding: str = "nearest") -> np.ndarray:
    """Model output ``[3, 320, 320]`` or ``[B, 3, 320, 320]`` in [0, 1] to HWC uint8 BGR.

    Values are scaled by 255 and clipped to [0, 255]. ``rounding="nearest"``
    (the default) rounds to the nearest level; ``"truncate"`` drops the
    fraction, which is the specification's ``(x * 255).astype(np.uint8)``
    bit for bit. Nearest is the default because truncation maps every value
    to the level at or below it: the output comes out half a level darker on
    average, and only an exact 1.0 reaches white. Choose ``truncate`` to
    compare frames with upstream's output.
    A uint8 output (a model that denormalises in the graph) is only transposed.
    Returns ``[320, 320, 3]`` or ``[B, 320, 320, 3]``, contiguous, new memory.
    """
    if rounding not in ROUNDINGS:
        raise ConfigError(f"output rounding must be one of {', '.join(ROUNDINGS)}, not {rounding!r}")
    out = np.asarray(out)
    if out.ndim not in (3, 4) or out.shape[-3] != 3:
        raise ConfigError(f"model output must be [3, H, W] or [B, 3, H, W], got {list(out.shape)}")
    if out.dtype == np.uint8:
        return _planes_to_hwc(out)
    # scale in the input's own (contiguous) layout, interleave the 4x smaller uint8
    scaled = np.multiply(out, np.float32(255.0), dtype=np.float32)
    if rounding == "nearest":
        scaled += np.float32(0.5)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return _planes_to_hwc(scaled.astype(np.uint8))


def _planes_to_hwc(chw: np.ndarray) -> np.ndarray:
    """uint8 ``[3, H, W]`` or ``[B, 3, H, W]`` to contiguous ``[..., H, W, 3]`` in new memory.

    The bytes of ``transpose`` + ``ascontiguousarray``, interleaved by OpenCV's
    ``merge`` (about 30x cheaper than numpy's strided copy: 0.4 ms a 320 face).
    """
    batch = np.ascontiguousarray(chw if chw.ndim == 4 else chw[None])
    if batch.size == 0:
        hwc = np.ascontiguousarray(batch.transpose(0, 2, 3, 1))
    else:
        hwc = np.empty((batch.shape[0], batch.shape[2], batch.shape[3], 3), np.uint8)
        for i in range(len(batch)):
            view = hwc[i]
            got = cv2.merge([batch[i, 0], batch[i, 1], batch[i, 2]], dst=view)
            if got is not view:  # (OpenCV wrote elsewhere: never for a matching dst)
                view[...] = got
    return hwc if chw.ndim == 4 else hwc[0]


def composite(
    frame: np.ndarray,
    box: Box,
    face: np.ndarray,
    *,
    interpolation: Interp = DEFAULT_INTERPOLATION,
    paste_interpolation: Interp = "cubic",
    crop: np.ndarray | None = None,
    inplace: bool = False,
) -> np.ndarray:
    """Paste a generated 320 face into a full frame; returns the new frame.

    The face goes into the frame's own 328 crop at ``[4:324, 4:324]`` (so the
    4-pixel ring keeps real pixels), the 328 image is resized back to the box
    size with ``paste_interpolation`` (cubic, as upstream) and written into the
    in-frame part of the box. Pixels outside the box are never touched.

    ``frame`` is not modified: the result is a copy the caller owns, unless
    ``inplace=True``, which writes into ``frame`` (must be writable) and
    returns it — use that when the frame is already yours, to save a
    full-frame copy. ``crop`` may pass a precomputed ``crop_328`` of this
    frame and box (made with the same ``interpolation``) to skip recomputing it.
    """
    _check_face(face)
    x1, y1, x2, y2 = (int(v) for v in box)
    h, w = frame.shape[:2]
    base = crop_328(frame, box, interpolation) if crop is None else np.array(crop, dtype=np.uint8, copy=True)
    base[FACE_OFFSET : FACE_OFFSET + FACE_SIZE, FACE_OFFSET : FACE_OFFSET + FACE_SIZE] = face
    back = cv2.resize(base, (x2 - x1, y2 - y1), interpolation=interpolation_flag(paste_interpolation))
    out = frame if inplace else frame.copy()
    # in-frame part of the box, and the matching part of the resized patch
    fx1, fy1, fx2, fy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if fx2 > fx1 and fy2 > fy1:
        out[fy1:fy2, fx1:fx2] = back[fy1 - y1 : fy2 - y1, fx1 - x1 : fx2 - x1]
    return out


def clip_box(box: Box, width: int, height: int) -> Box | None:
    """The in-frame part of ``box``, or ``None`` when it lies entirely outside."""
    x1, y1, x2, y2 = (int(v) for v in box)
    fx1, fy1, fx2, fy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if fx2 <= fx1 or fy2 <= fy1:
        return None
    return (fx1, fy1, fx2, fy2)
