"""``avatar prepare``: from a raw video to an avatar package (and a training recording).

Order of work: everything cheap is checked first (the file reads, it has a
sound track that is not silent, it is long enough), then a dozen frames spread
over the video are searched for the face (none, two, too small), and only then
does the full pass run: every frame at the target rate through the face mesh,
boxes smoothed, jumps listed, the package written. See docs/prepare-and-train.md.
"""

from __future__ import annotations

import json
import logging
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import vision
from ..errors import AvatarPackageError
from .faces import (
    MEDIAPIPE_VERSION,
    MESH_LEFT,
    MESH_RIGHT,
    MESH_TOP,
    OFFSETS,
    SMOOTH_ORDER,
    SMOOTH_WINDOW,
    FaceFinder,
    check_detections,
    frame_list,
    smooth_boxes,
)
from .video import frame_count, frames_at, probe

log = logging.getLogger(__name__)

#: training refuses recordings shorter than this; prepare refuses them unless asked
MIN_TRAIN_S = 30.0
#: shorter recordings get a warning (upstream users report 3-5 minutes as the useful range)
RECOMMENDED_S = 180.0
#: RMS below this (about -60 dBFS) is a silent track
SILENCE_RMS = 1e-3
AUDIO_FILE = "audio.wav"
SAMPLE_RATE = 16000
#: frames probed for faces before the full pass
PROBE_FRAMES = 12


def prepare(
    video: str | Path,
    dst: str | Path,
    *,
    fps: float = 25,
    name: str | None = None,
    allow_short: bool = False,
    synctalk_dir: str | Path | None = None,
    overwrite: bool = False,
    frames_codec: str = "h264",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Make an avatar package at ``dst`` from ``video``; return a summary (warnings, excluded frames).

    The package holds the frames at ``fps``, the smoothed crop boxes, the
    face cache, the recording's audio (``audio.wav``, 16 kHz mono, for
    ``avatar train``) and in ``avatar.json``'s ``source`` how it was made.
    ``allow_short`` accepts a recording under 30 s (enough to render, too short
    to train well; ``avatar train`` refuses it unless told the same).
    ``synctalk_dir`` also writes SyncTalk_2D's dataset layout there.
    """
    from ..audio import load_audio
    from ..demo import write_wav
    from ..errors import AudioError
    from ..package import write_package

    video = Path(video)
    info = probe(video)
    where = video.name
    warnings: list[str] = []
    # --- cheap checks first
    if not info.has_audio:
        raise AvatarPackageError(
            f"{where} has no sound track; training needs the speech recorded with the video "
            "(record with sound, or mux it in: ffmpeg -i video.mp4 -i speech.wav -c:v copy -shortest out.mp4)"
        )
    try:
        pcm = load_audio(video, SAMPLE_RATE)
    except AudioError as exc:
        raise AvatarPackageError(f"{where}: cannot use its sound track: {exc}") from None
    rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64))))
    if rms < SILENCE_RMS:
        raise AvatarPackageError(
            f"{where}: the sound track is silent (RMS {20 * np.log10(max(rms, 1e-12)):.0f} dBFS); "
            "training needs the speech that goes with the mouth movements"
        )
    duration = min(info.duration_s, len(pcm) / SAMPLE_RATE) if info.duration_s else len(pcm) / SAMPLE_RATE
    if duration < MIN_TRAIN_S and not allow_short:
        raise AvatarPackageError(
            f"{where} is {duration:.1f} s long; training needs at least {MIN_TRAIN_S:.0f} s of talking "
            f"(3-5 minutes recommended). Pass --allow-short to prepare it anyway (renders, tests)"
        )
    if duration < RECOMMENDED_S:
        warnings.append(f"{where} is {duration:.0f} s long; 3-5 minutes of talking train a much better model")
    n = frame_count(duration, fps)
    # --- a quick look for the face before the long pass
    probe_idx = sorted({int(round(i)) for i in np.linspace(0, n - 1, min(PROBE_FRAMES, n))})
    with FaceFinder(static=True) as finder:
        sample = {k: finder(img) for k, img in frames_at(video, fps, times=[i / fps for i in probe_idx])}
    check_detections([sample[k] for k in range(len(probe_idx)) if k in sample],
                     [probe_idx[k] for k in range(len(probe_idx)) if k in sample], fps, where)
    # --- the full pass: every frame through the face mesh
    raw, found, idx = [], [], []
    with FaceFinder() as finder:
        for i, img in frames_at(video, fps):
            if i >= n:
                break
            if (img.shape[1], img.shape[0]) != (info.width, info.height):
                raise AvatarPackageError(f"{where}: frame {i} is {img.shape[1]}x{img.shape[0]}, not {info.width}x{info.height}")
            d = finder(img)
            found.append(d)
            idx.append(i)
            raw.append(d.box)
            if progress:
                progress(i + 1, n)
    if not found:
        raise AvatarPackageError(f"{where}: no frame could be decoded")
    n = len(found)
    check_detections(found, idx, fps, where)
    track = smooth_boxes(raw)  # type: ignore[arg-type]
    if track.jumps:
        warnings.append(f"the face box jumps in {len(track.jumps)} frame(s): {frame_list(track.jumps, fps)}; "
                        "they are left out of training")
    source: dict[str, Any] = {
        "importer": "prepare",
        "path": str(video.resolve()),
        "source_fps": info.source_fps,
        "source_codec": info.codec,
        "duration_s": round(duration, 3),
        "detector": f"mediapipe {MEDIAPIPE_VERSION} face_mesh (tracking, averaged with the mirrored frame), "
                    f"points {MESH_LEFT}/{MESH_RIGHT}/{MESH_TOP}, offsets {list(OFFSETS)} x eye-corner distance",
        "smoothing": {"method": "savitzky-golay", "window": SMOOTH_WINDOW, "order": SMOOTH_ORDER},
        "excluded_frames": track.jumps,
        "audio": AUDIO_FILE,
        "short": duration < MIN_TRAIN_S,
    }

    def frames() -> Any:
        for i, img in frames_at(video, fps):
            if i >= n:
                return
            yield img

    out = write_package(dst, frames(), track.boxes, fps=Fraction(fps).limit_denominator(1001),
                        name=name or video.stem, source=source, overwrite=overwrite, frames_codec=frames_codec)
    # the recording's sound, cut to the frames, for `avatar train`
    write_wav(out / AUDIO_FILE, pcm[: int(round(n / fps * SAMPLE_RATE))])
    if synctalk_dir is not None:
        write_synctalk(Path(synctalk_dir), video, fps, n, track.boxes, out / AUDIO_FILE)
    for w in warnings:
        log.warning("%s", w)
    return {"package": out, "frames": n, "duration_s": duration, "excluded_frames": track.jumps, "warnings": warnings}


def write_synctalk(root: Path, video: Path, fps: float, n: int, boxes: np.ndarray, wav: Path) -> Path:
    """SyncTalk_2D's dataset layout: ``full_body_img/N.jpg``, ``landmarks/N.lms``, ``aud.wav``.

    Upstream's training reads only landmark points 1, 31 (x) and 52 (y) of the
    110 (its crop rule); the files written here carry the prepared box in those
    points and, elsewhere, points on the box's outline (they are not PFLD
    landmarks, and upstream's inference-time tools that need all 110 will not
    work from them).
    """
    import cv2

    if root.exists() and any(root.iterdir()):
        raise AvatarPackageError(f"{root} exists and is not empty; choose a new folder for the SyncTalk_2D layout")
    (root / "full_body_img").mkdir(parents=True, exist_ok=True)
    (root / "landmarks").mkdir(exist_ok=True)
    for i, img in frames_at(video, fps):
        if i >= n:
            break
        cv2.imwrite(str(root / "full_body_img" / f"{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        x1, y1, x2, y2 = (int(v) for v in boxes[i])
        pts = np.empty((110, 2), np.int64)
        pts[:, 0] = np.linspace(x1, x2, 110).astype(np.int64)
        pts[:, 1] = y2
        pts[1] = (x1, (y1 + y2) // 2)
        pts[31] = (x2, (y1 + y2) // 2)
        pts[52] = ((x1 + x2) // 2, y1)
        (root / "landmarks" / f"{i}.lms").write_text("".join(f"{x} {y}\n" for x, y in pts))
        if vision.crop_box_from_landmarks(pts.astype(np.float64)) != (x1, y1, x2, y2):
            raise AvatarPackageError(f"internal: landmarks for frame {i} do not reproduce its box")
    shutil.copyfile(wav, root / "aud.wav")
    (root / "prepared.json").write_text(json.dumps({"from": str(video.resolve()), "fps": fps, "frames": n}, indent=2))
    return root
