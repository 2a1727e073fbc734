"""Build avatar packages from the layouts avatars come in.

* :func:`import_synctalk` — a SyncTalk_2D dataset folder: ``full_body_img/N.jpg``
  (0- or 1-based), ``landmarks/N.lms`` (110 points), optional ``aud_ave.npy``.
* :func:`import_spec` — the model I/O specification's layout:
  ``full_body_video.mp4``, ``roi_bounds.npy`` or ``crop_rectangles.json``,
  optional ``rois_320_video.mp4`` (used as the face cache), ``aud_ave.npy``.

Both check the source before encoding anything and name the offending files.
The face cache is made from the source frames as decoded here (``cv2.imread``
for images, ``cv2.VideoCapture`` for videos: the specification's own readers),
so the model input is bit-exact with the specification's preprocessing of
them, however the background frames are stored (``frames_codec``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import vision
from .errors import AvatarPackageError
from .package import (
    DEFAULT_CRF,
    DEFAULT_FRAMES_CODEC,
    DEFAULT_GOP,
    DEFAULT_PRESET,
    _box_problems,
    _load_npy,
    check_ave_features,
    write_package,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SHOW = 5  # how many offending names an error lists


def _names(items: list[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def _numbered(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[int, Path]:
    """``{number: path}`` of the files ``<number><suffix>`` in ``folder``."""
    if not folder.is_dir():
        raise AvatarPackageError(f"{folder} is missing; a SyncTalk_2D dataset has {folder.name}/ with {what}")
    found: dict[int, Path] = {}
    odd: list[str] = []
    for p in folder.iterdir():
        if p.suffix.lower() not in suffixes:
            continue
        if re.fullmatch(r"\d+", p.stem):
            found[int(p.stem)] = p
        else:
            odd.append(p.name)
    if odd:
        raise AvatarPackageError(f"{folder}: file names must be frame numbers (0.jpg, 1.jpg, ...): {_names(sorted(odd))}")
    if not found:
        raise AvatarPackageError(f"{folder} has no {what}")
    return found


def _model_kwargs(model: str | Path | None, audio_encoder: str | Path | None, padding: str | None) -> dict[str, Any]:
    """write_package arguments for packaging a model; the feature type comes from the model."""
    if padding not in (None, "replicate", "zero"):
        raise AvatarPackageError(f"padding must be 'replicate' or 'zero', not {padding!r}")
    feature_type = None
    if model is not None:
        from .contract import read_contract

        feature_type = read_contract(model).feature_type
    return {"model": model, "feature_type": feature_type, "padding": padding, "audio_encoder": audio_encoder}


def _check_boxes_early(boxes: np.ndarray, width: int, height: int, where: str) -> None:
    problems = _box_problems(boxes, width, height)
    if problems:
        raise AvatarPackageError(f"{where}:\n  - " + "\n  - ".join(problems))


#: bytes that may follow an image's end marker without making it suspect (padding some writers add)
_TRAILING_PAD = b"\x00\r\n\t "


def image_truncated(path: Path) -> bool:
    """Whether a JPEG lacks its end-of-image marker or a PNG its IEND chunk.

    A truncated JPEG decodes without an error: libjpeg only warns ("Premature
    end of JPEG file") and fills the missing rows grey, so the check is on the
    file itself. Entropy-coded JPEG data never contains ``FF D9`` (``FF`` is
    stuffed), so a file whose last bytes (before padding) are not ``FF D9`` was cut.
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64))
            tail = f.read().rstrip(_TRAILING_PAD)
    except OSError:
        return True
    if path.suffix.lower() == ".png":
        return not tail.endswith(b"IEND\xaeB`\x82")
    return not tail.endswith(b"\xff\xd9")


def _check_audio_features(aud: Path) -> Path | None:
    """The source's ``aud_ave.npy`` if present, checked to be AVE features ``[rows, 512]``."""
    if not aud.is_file():
        return None
    check_ave_features(aud)
    return aud


def import_synctalk(
    src: str | Path,
    dst: str | Path,
    *,
    fps: float = 25,
    name: str | None = None,
    limit: int | None = None,
    crop_interpolation: str = vision.DEFAULT_INTERPOLATION,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    gop: int = DEFAULT_GOP,
    frames_codec: str = DEFAULT_FRAMES_CODEC,
    overwrite: bool = False,
    model: str | Path | None = None,
    audio_encoder: str | Path | None = None,
    padding: str | None = None,
) -> Path:
    """Import a SyncTalk_2D dataset folder into an avatar package at ``dst``.

    Numbering may start at 0 or 1 (detected); gaps, frames without landmarks,
    landmarks without frames and malformed ``.lms`` files are errors naming the
    files, and so are truncated images (which OpenCV would decode with grey
    rows and only a warning). ``limit`` imports only the first N frames (quick
    previews, tests). ``aud_ave.npy`` is copied in when present (whole,
    regardless of ``limit``) and must be AVE features ``[rows, 512]``. The face
    cache is made from the decoded JPEGs themselves; ``frames_codec``
    (``h264``/``ffv1``) chooses how the background frames are stored.
    ``model`` / ``audio_encoder`` (ONNX files) are packaged with the avatar so
    that ``avatar run --avatar`` needs nothing else; the model's feature type is
    read from it, ``padding`` (``replicate``/``zero``) records its window padding.
    ``overwrite`` replaces ``dst`` only when it is an existing avatar package;
    ``dst`` may never be ``src``, inside it, contain it, or be the current
    directory (see :func:`avatar.package.write_package`).
    """
    src = Path(src)
    if not src.is_dir():
        raise AvatarPackageError(f"{src} is not a directory; pass a SyncTalk_2D dataset folder")
    imgs = _numbered(src / "full_body_img", IMAGE_SUFFIXES, "frame images (0.jpg, 1.jpg, ...)")
    lms = _numbered(src / "landmarks", (".lms",), "landmark files (0.lms, 1.lms, ...)")
    first = min(imgs)
    if first not in (0, 1):
        raise AvatarPackageError(f"{src / 'full_body_img'}: numbering starts at {first}; expected 0 or 1")
    expected = range(first, first + len(imgs))
    gaps = [f"{i}.jpg" for i in range(first, max(imgs) + 1) if i not in imgs]
    if gaps:
        raise AvatarPackageError(
            f"{src / 'full_body_img'}: {len(gaps)} frame(s) missing from the numbering {first}..{max(imgs)}: {_names(gaps)}"
        )
    no_lms = [f"landmarks/{i}.lms" for i in expected if i not in lms]
    extra = [f"landmarks/{i}.lms" for i in sorted(lms) if i not in imgs]
    if no_lms or extra:
        parts = [f"{len(imgs)} frames but {len(lms)} landmark files"]
        if no_lms:
            parts.append(f"missing: {_names(no_lms)}")
        if extra:
            parts.append(f"without a frame: {_names(extra)}")
        raise AvatarPackageError(f"{src}: " + "; ".join(parts) + " — re-run the landmark detection")
    if limit is not None and limit < 1:
        raise AvatarPackageError(f"limit must be at least 1, got {limit}")
    used = list(expected)[: limit or None]
    cut = [imgs[i].name for i in used if image_truncated(imgs[i])]
    if cut:
        raise AvatarPackageError(
            f"{src / 'full_body_img'}: {len(cut)} image(s) truncated (no end-of-image marker): {_names(cut)}; "
            "replace them (re-extract the frames) or remove them and their landmarks"
        )
    boxes = np.array([vision.crop_box_from_landmarks(vision.read_lms(lms[i])) for i in used], dtype=np.int32)

    import cv2

    def frames() -> Iterator[np.ndarray]:
        for i in used:
            img = cv2.imread(str(imgs[i]), cv2.IMREAD_COLOR)
            if img is None:
                raise AvatarPackageError(f"cannot decode image {imgs[i]}; replace or remove it")
            yield img

    first_img = cv2.imread(str(imgs[used[0]]), cv2.IMREAD_COLOR)
    if first_img is None:
        raise AvatarPackageError(f"cannot decode image {imgs[used[0]]}")
    _check_boxes_early(boxes, first_img.shape[1], first_img.shape[0], f"{src}: bad crop boxes from the landmarks")
    aud = _check_audio_features(src / "aud_ave.npy")
    source: dict[str, Any] = {
        "importer": "synctalk",
        "path": str(src.resolve()),
        "first_index": first,
        "source_frames": len(imgs),
    }
    if limit is not None:
        source["limit"] = limit
    return write_package(
        dst,
        frames(),
        boxes,
        fps,
        name or src.resolve().name,
        crop_interpolation=crop_interpolation,
        audio_features=aud,
        source=source,
        crf=crf,
        preset=preset,
        gop=gop,
        frames_codec=frames_codec,
        overwrite=overwrite,
        source_dir=src,
        **_model_kwargs(model, audio_encoder, padding),
    )


# --------------------------------------------------------------------------- spec layout


def _decode_video(path: Path, limit: int | None = None) -> Iterator[np.ndarray]:
    """The frames of a video as the specification reads them (``cv2.VideoCapture``, BGR).

    The same reader as the specification's preprocessing, so faces computed
    from (or taken as) these frames are bit-exact with it by construction.
    """
    import cv2

    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not cap.isOpened():
            raise AvatarPackageError(f"cannot decode {path}: OpenCV's FFmpeg reader cannot open it")
        k = 0
        while limit is None or k < limit:
            ok, img = cap.read()
            if not ok:
                return
            yield img
            k += 1
    finally:
        cap.release()


def _video_info(path: Path) -> tuple[int, int, int, Fraction | None]:
    """(frames, width, height, fps) of a video; frames counted by demuxing."""
    import av

    try:
        with av.open(str(path)) as c:
            st = c.streams.video[0]
            n = sum(1 for p in c.demux(st) if p.pts is not None)
            rate = st.average_rate or st.guessed_rate
            return n, st.codec_context.width, st.codec_context.height, Fraction(rate) if rate else None
    except (av.FFmpegError, IndexError) as exc:
        raise AvatarPackageError(f"cannot read video {path}: {exc}") from None


def read_crop_rectangles(path: str | Path) -> np.ndarray:
    """Boxes ``[N, 4]`` from a ``crop_rectangles.json``.

    Accepts ``{"<frame>": {"rect": [x1, y1, x2, y2]}, ...}`` (the spec author's
    tools), ``{"<frame>": [x1, y1, x2, y2]}`` and a plain list of either.
    Frame keys may start at 0 or 1 and must be contiguous.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AvatarPackageError(f"cannot read {path}: {exc}") from None

    def rect(v: Any, key: object) -> list[int]:
        r = v.get("rect", v.get("bounds", v)) if isinstance(v, dict) else v
        if isinstance(r, dict):
            r = [r.get("x1"), r.get("y1"), r.get("x2"), r.get("y2")]
        try:
            out = [int(round(float(x))) for x in r]
        except (TypeError, ValueError):
            out = []
        if len(out) != 4:
            raise AvatarPackageError(f"{path}: entry {key} is not a rectangle [x1, y1, x2, y2]: {v!r}")
        return out

    if isinstance(data, list):
        return np.array([rect(v, i) for i, v in enumerate(data)], dtype=np.int32).reshape(-1, 4)
    if not isinstance(data, dict) or not data:
        raise AvatarPackageError(f"{path}: expected a list or a frame-keyed object of rectangles")
    try:
        keys = sorted(int(k) for k in data)
    except ValueError:
        raise AvatarPackageError(f"{path}: keys must be frame numbers") from None
    first = keys[0]
    if first not in (0, 1) or keys != list(range(first, first + len(keys))):
        missing = [str(i) for i in range(first, keys[-1] + 1) if i not in set(keys)]
        raise AvatarPackageError(f"{path}: frame keys must run 0.. or 1.. without gaps; missing {_names(missing)}")
    return np.array([rect(data[str(k)], k) for k in keys], dtype=np.int32).reshape(-1, 4)


def import_spec(
    src: str | Path,
    dst: str | Path,
    *,
    fps: float | None = None,
    name: str | None = None,
    limit: int | None = None,
    rois: bool = True,
    crop_interpolation: str = vision.DEFAULT_INTERPOLATION,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    gop: int = DEFAULT_GOP,
    frames_codec: str = DEFAULT_FRAMES_CODEC,
    overwrite: bool = False,
    model: str | Path | None = None,
    audio_encoder: str | Path | None = None,
    padding: str | None = None,
) -> Path:
    """Import the specification's layout into an avatar package at ``dst``.

    Boxes come from ``roi_bounds.npy`` ``[N, 4]`` or, failing that,
    ``crop_rectangles.json`` (in the folder or its ``cache/``). With ``rois``
    (default) the frames of ``rois_320_video.mp4`` become the face cache, so
    the model sees exactly the faces the source was prepared with; otherwise
    (or when the video is absent) faces are computed with the crop rule from
    the decoded full-body frames. Videos are decoded with ``cv2.VideoCapture``,
    the specification's reader, so either way the model input is bit-exact with
    the specification's preprocessing of the decoded frames.
    ``model_inputs_video.mp4`` is only count-checked: the masked copy is a fixed
    function of the face. ``fps`` defaults to the full-body video's rate.
    ``model``, ``audio_encoder``, ``padding``, ``frames_codec`` and ``overwrite``
    as in :func:`import_synctalk`.
    """
    src = Path(src)
    video = src / "full_body_video.mp4"
    if not video.is_file():
        raise AvatarPackageError(f"{video} is missing; the specification's layout has full_body_video.mp4")
    if (src / "roi_bounds.npy").is_file():
        box_file = src / "roi_bounds.npy"
        boxes = _load_npy(box_file, "crop boxes", mmap=False)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.dtype.kind not in "iuf" or not np.isfinite(boxes).all():
            raise AvatarPackageError(
                f"{box_file} must be finite numbers [frames, 4] (x1, y1, x2, y2), it is {boxes.dtype} {list(boxes.shape)}"
            )
        boxes = np.rint(boxes).astype(np.int32)
    else:
        cands = [src / "crop_rectangles.json", src / "cache" / "crop_rectangles.json"]
        box_file = next((c for c in cands if c.is_file()), None)  # type: ignore[assignment]
        if box_file is None:
            raise AvatarPackageError(f"{src} has neither roi_bounds.npy nor crop_rectangles.json; one gives the crop boxes")
        boxes = read_crop_rectangles(box_file)
    n_video, width, height, rate = _video_info(video)
    if n_video != len(boxes):
        raise AvatarPackageError(f"{video.name} has {n_video} frames but {box_file.name} has {len(boxes)} boxes")
    roi_video = src / "rois_320_video.mp4"
    use_rois = rois and roi_video.is_file()
    for extra in ([roi_video] if use_rois else []) + [src / "model_inputs_video.mp4"]:
        if extra.is_file():
            n, w, h, _ = _video_info(extra)
            if n != n_video:
                raise AvatarPackageError(f"{extra.name} has {n} frames but {video.name} has {n_video}")
            if (w, h) != (320, 320):
                raise AvatarPackageError(f"{extra.name} is {w}x{h}; it must be 320x320")
    if limit is not None:
        if limit < 1:
            raise AvatarPackageError(f"limit must be at least 1, got {limit}")
        boxes = boxes[:limit]
    _check_boxes_early(boxes, width, height, f"{box_file}: bad crop boxes")
    if fps is None:
        if rate is None:
            raise AvatarPackageError(f"{video.name} does not state its frame rate; pass fps")
        fps_value: float | Fraction = rate
    else:
        fps_value = fps
    aud = _check_audio_features(src / "aud_ave.npy")
    source: dict[str, Any] = {
        "importer": "spec",
        "path": str(src.resolve()),
        "boxes": box_file.name,
        "faces": roi_video.name if use_rois else "computed",
        "source_frames": n_video,
    }
    if limit is not None:
        source["limit"] = limit
    return write_package(
        dst,
        _decode_video(video, limit),
        boxes,
        fps_value,
        name or src.resolve().name,
        crop_interpolation=crop_interpolation,
        faces=_decode_video(roi_video, limit) if use_rois else True,
        audio_features=aud,
        source=source,
        crf=crf,
        preset=preset,
        gop=gop,
        frames_codec=frames_codec,
        overwrite=overwrite,
        source_dir=src,
        **_model_kwargs(model, audio_encoder, padding),
    )
