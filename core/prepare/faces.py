"""Face boxes from a video: MediaPipe's face mesh mapped to the SyncTalk_2D crop rule.

The model family crops a square over the lower face from three of its 110
PFLD landmarks: ``x1 = lms[1].x``, ``x2 = lms[31].x`` (the jaw contour at the
cheekbones) and ``y1 = lms[52].y`` (the nose bridge). Those landmark weights
are on no package index; MediaPipe 0.10.21's wheel carries a 468-point face
mesh. Points 137 (left cheek contour), 454 (right) and 195 (nose bridge),
with the small offsets below (fractions of the distance between the outer eye
corners, 33-263, so they scale with the face), stand in for them.

**Mirror averaging.** Every frame goes through the mesh twice: as it is and
mirrored left-right (a second mesh, tracking the mirrored video), and each
point is the mean of its own estimate and its mirror vertex's estimate from
the mirrored frame (137 <-> 366, 454 <-> 234, 33 <-> 263, 195 is on the
midline). The mesh's errors are not mirror-symmetric: alone, its right cheek
contour sat 1.4 px right of PFLD's on the sanders held-out frames, making
the box 1.5 px too wide and 0.7 px off centre, which the trained sanders
model pays for (measured: a box 2 px wider costs 0.36 dB of face PSNR, one
shifted 2 px sideways 0.84 dB). The mirrored pass cancels the asymmetric part
of that error (side error -0.1 px) and halves the frame-to-frame scatter of
x2: the model's held-out face PSNR on prepared crops went from 0.70 dB below
the dataset's own crops (same decoded frames: 0.54 dB) to 0.19 dB (0.03 dB).
It doubles the mesh's work (``FaceFinder(mirror=False)`` skips it).

The offsets were fitted, with the mirror averaging, on the sanders dataset's
own landmarks, frames 0-459 in tracking mode: the mean of
``(PFLD coordinate - mesh coordinate) / eye-corner distance``. On the
held-out frames 460-522 the boxes match the dataset's own with a median IoU
of 0.97, worst 0.95 (``tests/test_prepare.py`` checks >= 0.85 / 0.7).

Smoothing is offline and centred (Savitzky-Golay on the box centre and side),
so a moving head is not followed with a lag and a still head does not jitter.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import AvatarPackageError, ConfigError, MissingDependency

log = logging.getLogger(__name__)

#: face-mesh points that stand in for PFLD points 1, 31 (x) and 52 (y)
MESH_LEFT, MESH_RIGHT, MESH_TOP = 137, 454, 195
#: the outer eye corners: their distance is the face's scale for the offsets
MESH_EYES = (33, 263)
#: the used points and their mirror images in the mesh's topology, both ways (left/right pairs swap;
#: 195 is on the midline); checked on sanders: the mesh of a mirrored frame puts each at its partner's place
_PAIRS = ((MESH_LEFT, 366), (MESH_RIGHT, 234), (MESH_TOP, MESH_TOP), MESH_EYES)
MIRROR = {**dict(_PAIRS), **{b: a for a, b in _PAIRS}}
#: offsets as fractions of the eye-corner distance (left, right, top), fitted on sanders frames 0-459
#: with the mirror averaging (without it they were -0.0215, -0.0061, -0.0188)
OFFSETS = (-0.0173, 0.0029, -0.0135)
#: the smallest crop side accepted: the model sees 320x320, a smaller face is upscaled
MIN_SIDE = 96
#: a box whose centre moves more than this fraction of its side from the smoothed track is a jump
JUMP_FRACTION = 0.15
#: Savitzky-Golay window (frames, odd) and polynomial order of the box smoothing
SMOOTH_WINDOW, SMOOTH_ORDER = 9, 2
MEDIAPIPE_VERSION = "0.10.21"


@contextmanager
def _quiet() -> Iterator[None]:
    """Hold back what MediaPipe's C++ side prints to stderr (TFLite/absl chatter) unless debugging."""
    if os.environ.get("AVATAR_DEBUG", "") not in ("", "0"):
        yield
        return
    os.environ.setdefault("GLOG_minloglevel", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def require_mediapipe() -> Any:
    """Import MediaPipe's ``solutions`` API or raise one clear error."""
    try:
        with _quiet():
            import mediapipe as mp

        mp.solutions.face_mesh  # noqa: B018 - absent from MediaPipe >= 0.10.30
    except (ModuleNotFoundError, AttributeError):
        if tuple(sys.version_info[:2]) >= (3, 13):
            major, minor = sys.version_info[0], sys.version_info[1]
            raise ConfigError(
                f"avatar prepare needs MediaPipe {MEDIAPIPE_VERSION}, the last release whose wheel carries its face "
                f"models, and it has wheels for Python 3.9-3.12 only; this is Python {major}.{minor}: run "
                "`avatar prepare` in a Python 3.12 environment (the package it writes works with any Python)"
            ) from None
        raise MissingDependency("mediapipe", "prepare", feature="avatar prepare (face detection and landmarks)") from None
    return mp


@dataclass
class Detection:
    """What the face mesh found in one frame."""

    faces: int
    box: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 (float, unsmoothed)


class FaceFinder:
    """MediaPipe face mesh (tracking mode, up to two faces) → crop boxes.

    ``mirror`` (default) also runs a second mesh on the mirrored frames and
    averages each point with its mirror vertex (see the module's docstring):
    twice the work, boxes closer to upstream's.
    """

    def __init__(self, *, static: bool = False, mirror: bool = True) -> None:
        mp = require_mediapipe()

        def mesh() -> Any:
            return mp.solutions.face_mesh.FaceMesh(
                static_image_mode=static, max_num_faces=2, refine_landmarks=False,
                min_detection_confidence=0.5, min_tracking_confidence=0.5,
            )

        with _quiet():
            self._mesh = mesh()
            self._mirror = mesh() if mirror else None

    def points(self, bgr: np.ndarray) -> tuple[int, dict[int, tuple[float, float]] | None]:
        """How many faces the mesh found and, for exactly one, the used points in pixels (x, y)."""
        import cv2

        h, w = bgr.shape[:2]
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        with _quiet():
            found = self._mesh.process(rgb).multi_face_landmarks or []
        if len(found) != 1:
            return len(found), None
        lm = found[0].landmark
        pts = {k: (lm[k].x * w, lm[k].y * h) for k in MIRROR}
        if self._mirror is not None:
            with _quiet():
                back = self._mirror.process(cv2.flip(rgb, 1)).multi_face_landmarks or []
            if len(back) == 1:  # x in the mirrored frame is w - x in this one (pixel edges, MediaPipe's convention)
                mb = back[0].landmark
                pts = {k: ((x + (1.0 - mb[MIRROR[k]].x) * w) / 2, (y + mb[MIRROR[k]].y * h) / 2) for k, (x, y) in pts.items()}
            else:  # rare (a face at the frame's edge): this frame's box is the single pass's; smoothing evens it out
                log.debug("the mirrored frame shows %d faces; the unmirrored mesh alone is used", len(back))
        return 1, pts

    def __call__(self, bgr: np.ndarray) -> Detection:
        faces, pts = self.points(bgr)
        if pts is None:
            return Detection(faces)
        return Detection(1, box_from_points(pts[MESH_LEFT], pts[MESH_RIGHT], pts[MESH_TOP], pts[MESH_EYES[0]], pts[MESH_EYES[1]]))

    def close(self) -> None:
        self._mesh.close()
        if self._mirror is not None:
            self._mirror.close()

    def __enter__(self) -> "FaceFinder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def box_from_points(
    left: tuple[float, float], right: tuple[float, float], top: tuple[float, float],
    eye_l: tuple[float, float], eye_r: tuple[float, float],
) -> tuple[float, float, float, float]:
    """The SyncTalk_2D square from the mesh points (with the fitted offsets)."""
    scale = float(np.hypot(eye_r[0] - eye_l[0], eye_r[1] - eye_l[1]))
    x1 = left[0] + OFFSETS[0] * scale
    x2 = right[0] + OFFSETS[1] * scale
    y1 = top[1] + OFFSETS[2] * scale
    return (x1, y1, x2, y1 + (x2 - x1))


@dataclass
class Track:
    """Smoothed integer boxes plus the frames whose raw box jumped."""

    boxes: np.ndarray  # int32 [N, 4]
    jumps: list[int] = field(default_factory=list)


def smooth_boxes(raw: Iterable[tuple[float, float, float, float]]) -> Track:
    """Centred smoothing of the box centre and side; jumps are flagged, not followed.

    A jump is a frame whose raw centre is further than ``JUMP_FRACTION`` of the
    side from the smoothed track (a detection error, a cut): it is listed and
    its box is replaced by the track through its neighbours.
    """
    from scipy.signal import savgol_filter

    r = np.asarray(list(raw), dtype=np.float64).reshape(-1, 4)
    cx, cy = (r[:, 0] + r[:, 2]) / 2, (r[:, 1] + r[:, 3]) / 2
    side = r[:, 2] - r[:, 0]
    track = np.stack([cx, cy, side], axis=1)
    n = len(track)

    def smooth(a: np.ndarray) -> np.ndarray:
        win = min(SMOOTH_WINDOW, n if n % 2 else n - 1)
        if win <= SMOOTH_ORDER:
            return a.copy()
        return savgol_filter(a, win, SMOOTH_ORDER, axis=0, mode="interp")

    # a robust first pass: a running median finds the jumps, which then do not pull the smoothing
    from scipy.ndimage import median_filter

    med = median_filter(track, size=(min(SMOOTH_WINDOW, n), 1), mode="nearest")
    dist = np.hypot(track[:, 0] - med[:, 0], track[:, 1] - med[:, 1])
    jump = (dist > JUMP_FRACTION * med[:, 2]) | (np.abs(track[:, 2] - med[:, 2]) > JUMP_FRACTION * med[:, 2])
    fixed = track.copy()
    if jump.any() and not jump.all():
        good = np.flatnonzero(~jump)
        for k in range(3):
            fixed[jump, k] = np.interp(np.flatnonzero(jump), good, track[good, k])
    s = smooth(fixed)
    half = s[:, 2] / 2
    boxes = np.stack([s[:, 0] - half, s[:, 1] - half, s[:, 0] + half, s[:, 1] + half], axis=1)
    out = np.rint(boxes).astype(np.int32)
    out[:, 3] = out[:, 1] + (out[:, 2] - out[:, 0])  # exactly square after rounding
    return Track(out, [int(i) for i in np.flatnonzero(jump)])


def frame_list(frames: list[int], fps: float, limit: int = 8) -> str:
    """``12 (0.48 s), 13 (0.52 s), ... and 40 more`` for error messages."""
    shown = ", ".join(f"{i} ({i / fps:.2f} s)" for i in frames[:limit])
    return shown + (f" and {len(frames) - limit} more" if len(frames) > limit else "")


def check_detections(found: list[Detection], indices: list[int], fps: float, where: str) -> None:
    """One error for frames without a face, with two faces, or with a face too small."""
    none = [i for i, d in zip(indices, found) if d.faces == 0]
    many = [i for i, d in zip(indices, found) if d.faces > 1]
    if many:
        raise AvatarPackageError(
            f"{where}: more than one face in {len(many)} frame(s): {frame_list(many, fps)}; "
            "the avatar must be the only face in the picture (crop the video)"
        )
    if none:
        raise AvatarPackageError(
            f"{where}: no face found in {len(none)} frame(s): {frame_list(none, fps)}; "
            "the face must be visible, frontal and lit in every frame (cut those parts out)"
        )
    small = [i for i, d in zip(indices, found) if d.box is not None and d.box[2] - d.box[0] < MIN_SIDE]
    if small:
        sides = [int(d.box[2] - d.box[0]) for d in found if d.box is not None and d.box[2] - d.box[0] < MIN_SIDE]
        raise AvatarPackageError(
            f"{where}: the face is too small in {len(small)} frame(s): {frame_list(small, fps)} "
            f"(crop side {min(sides)} px, at least {MIN_SIDE} px needed; the model sees 320x320): "
            "film closer or use a higher resolution"
        )
