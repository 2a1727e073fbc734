"""The avatar package: a directory holding one avatar's frames, crop boxes and caches.

Layout (see ``docs/avatar-package.md`` for the full description)::

    avatar.json            manifest (format version, name, fps, size, crop rule, ...)
    frames.mp4             full frames, H.264 yuv420p, CRF 14, fixed short GOP
      (or frames.mkv)      ... or lossless FFV1 (``frames_codec="ffv1"``)
    boxes.npy              int32 [N, 4] crop boxes (x1, y1, x2, y2)
    aud_ave.npy            optional: the recording's own audio features
    <model>.onnx           optional: the UNet-328 trained for this avatar
    <encoder>.onnx         optional: the AVE audio encoder to use with it
    cache/faces320.npy     uint8 [N, 320, 320, 3] face crops (memory-mapped)
    cache/faces320.json    how the face cache was made (to detect a stale cache)

Frames are decoded on demand by :class:`FrameStore` within a memory budget; the
visual model inputs depend only on the avatar frame, so they come from the face
cache, never from decoding. The importers build that cache from the *source*
frames (the decoded JPEGs or video), so the model sees exactly the
specification's preprocessing of them, whatever codec stores the frames.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from . import partials, vision
from .errors import AvatarPackageError, ConfigError
from .framestore import DEFAULT_MEMORY_BUDGET_MB, FRAME_CODECS, FrameStore, FrameWriter, _decode_all
from .manifest import BOXES, FORMAT_NAME, FORMAT_VERSION, FRAMES, MANIFEST, Manifest, member, read_manifest

__all__ = ["AvatarPackage", "FrameStore", "Manifest", "read_manifest", "write_package"]
# the format constants lived here before avatar.manifest: re-exported for callers that knew them here
__all__ += ["BOXES", "FORMAT_NAME", "FORMAT_VERSION", "FRAMES", "MANIFEST"]

log = logging.getLogger(__name__)

FACES = "cache/faces320.npy"
FACES_META = "cache/faces320.json"
FACE_BYTES = vision.FACE_SIZE * vision.FACE_SIZE * 3
#: partial files and directories a dead writer may leave (see :mod:`avatar.partials`)
FACES_PARTIAL = "faces320.*.partial.npy"
#: smaller boxes than this cannot carry a usable face
MIN_BOX_SIDE = 16
#: a box side above this many times the frame's larger side is refused (no face is that big;
#: a hostile box must not size a multi-GiB crop)
MAX_BOX_FACTOR = vision.MAX_BOX_FACTOR
DEFAULT_CRF = 14
DEFAULT_GOP = 12
DEFAULT_PRESET = "veryfast"
DEFAULT_FRAMES_CODEC = "h264"
#: the rows of an AVE feature file
AVE_DIM = 512


def fps_fraction(fps: float | Fraction | str) -> Fraction:
    """A frame rate as an exact fraction; floats snap to the nearest fraction with
    a denominator up to 1001 (``29.97002997`` → ``30000/1001``, ``25.0`` → ``25``)."""
    try:
        f = Fraction(fps) if not isinstance(fps, float) else Fraction(fps).limit_denominator(1001)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"bad frame rate {fps!r}") from None
    if f <= 0:
        raise ConfigError(f"frame rate must be positive, got {fps!r}")
    return f


# --------------------------------------------------------------------------- writing


def write_package(
    dst: str | Path,
    frames: Iterable[np.ndarray],
    boxes: np.ndarray,
    fps: float | Fraction | str,
    name: str,
    *,
    crop_interpolation: str = vision.DEFAULT_INTERPOLATION,
    faces: bool | Iterable[np.ndarray] = True,
    model: str | Path | None = None,
    feature_type: str | None = None,
    padding: str | None = None,
    audio_features: str | Path | None = None,
    audio_encoder: str | Path | None = None,
    source: Mapping[str, Any] | None = None,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    gop: int = DEFAULT_GOP,
    frames_codec: str = DEFAULT_FRAMES_CODEC,
    overwrite: bool = False,
    source_dir: str | Path | None = None,
) -> Path:
    """Write an avatar package and return its path.

    ``frames`` are BGR uint8 full frames, one per row of ``boxes`` (int
    ``[N, 4]``: x1, y1, x2, y2). ``faces=True`` builds the face cache from
    *these* frames as they pass (``faces[i] == face_320(frames[i])`` exactly:
    the model sees the specification's preprocessing of the source frame, not
    of its lossy re-encode); an iterable of 320x320 BGR images uses those
    instead (e.g. an existing ROI video); ``False`` leaves the cache to be
    built from the stored frames on first use. ``frames_codec`` stores the
    frames as ``h264`` (yuv420p, ``crf``/``preset``/``gop``; small, lossy) or
    ``ffv1`` (lossless, large; a rebuilt face cache is then exact too).
    ``model``, ``audio_encoder`` and ``audio_features`` files are copied in
    (``feature_type``/``padding`` describe the model). The package is
    assembled in a temporary directory beside ``dst`` and moved into place only
    when complete, then validated; a full disk or an interrupt leaves nothing
    behind, and the partials of a writer that was killed are removed by the
    next write or open.

    ``dst`` must not exist, be an empty directory, or — with ``overwrite`` — an
    existing avatar package (a directory with ``avatar.json``), which is then
    replaced. Anything else is refused with :class:`AvatarPackageError`: a
    regular file, a non-empty directory that is not an avatar package, the
    current directory or one of its parents, and (``source_dir``, the folder an
    importer reads from) the source itself, a folder inside it or one that
    contains it.
    """
    dst = Path(dst)
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise AvatarPackageError(f"boxes must be a non-empty [N, 4] array, got {list(boxes.shape)}")
    boxes = boxes.astype(np.int32)
    vision.interpolation_flag(crop_interpolation)
    if frames_codec not in FRAME_CODECS:
        raise AvatarPackageError(f"unknown frame codec {frames_codec!r}; use one of {', '.join(FRAME_CODECS)}")
    _check_destination(dst, overwrite=overwrite, source_dir=source_dir)
    rate = fps_fraction(fps)
    n = len(boxes)
    frames_file, lossless = FRAME_CODECS[frames_codec]
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with partials.dir_lock(dst.parent):
            _sweep_beside(dst)
            tmp, held = partials.make_partial_dir(dst.parent, f".{dst.name}.partial-")
    except OSError as exc:
        raise AvatarPackageError(f"cannot create {dst}: {exc}; choose a writable output directory") from None
    writer: FrameWriter | None = None
    face_out: partials.NpyWriter | None = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a package is an ordinary directory
        (tmp / "cache").mkdir()
        face_iter = iter(faces) if not isinstance(faces, bool) else None
        if faces is not False:
            partials.check_space(tmp, n * FACE_BYTES, dst / FACES)
            fd = os.open(tmp / FACES, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            face_out = partials.NpyWriter(
                fd, dst / FACES, (n, vision.FACE_SIZE, vision.FACE_SIZE, 3), closefd=True
            )
        count = 0
        size: tuple[int, int] = (0, 0)
        for frame in frames:
            if count >= n:
                raise AvatarPackageError(f"more frames than boxes ({n}); every frame needs a crop box")
            if writer is None:
                size = (frame.shape[1], frame.shape[0])
                _check_box_sizes(boxes, *size)
                writer = FrameWriter(tmp / frames_file, *size, rate, codec=frames_codec, crf=crf, preset=preset, gop=gop)
            elif (frame.shape[1], frame.shape[0]) != size:
                raise AvatarPackageError(f"frame {count} is {frame.shape[1]}x{frame.shape[0]}, frame 0 is {size[0]}x{size[1]}")
            writer.write(frame)
            if face_out is not None:
                if face_iter is None:  # from the source frame itself, before any lossy storage
                    face = vision.face_320(frame, tuple(boxes[count]), crop_interpolation)
                else:
                    face = next(face_iter, None)
                    if face is None:
                        raise AvatarPackageError(f"the face images end after {count} frames; there are {n} boxes")
                    vision._check_face(face)
                face_out.write(face)
            count += 1
        if writer is None:
            raise AvatarPackageError("no frames to write")
        writer.close()
        writer = None
        if count != n:
            raise AvatarPackageError(f"{count} frames but {n} boxes; they must correspond one to one")
        if face_iter is not None and next(face_iter, None) is not None:
            raise AvatarPackageError(f"more face images than the {n} frames")
        np.save(tmp / BOXES, boxes)
        video = {"file": frames_file, "codec": frames_codec, "lossless": lossless, "fps": str(rate)}
        if frames_codec == "h264":
            video.update({"pix_fmt": "yuv420p", "crf": crf, "gop": gop})
        else:
            video.update({"pix_fmt": "bgr0", "gop": 1})
        if face_out is not None:
            face_out.finish()
            face_out.close()
            face_out = None
            made_from = "source" if face_iter is None else "supplied"
            _write_faces_meta(tmp, crop_interpolation, n, made_from, boxes, frames_file)
        copied = _copy_files(tmp, model=model, audio_encoder=audio_encoder, audio_features=audio_features)
        manifest = Manifest(
            name=name,
            fps=float(rate),
            frame_count=n,
            width=size[0],
            height=size[1],
            crop_interpolation=crop_interpolation,
            model=copied["model"],
            feature_type=feature_type,
            padding=padding,
            audio_encoder=copied["audio_encoder"],
            audio_features=copied["audio_features"],
            source=dict(source or {}),
            video=video,
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        with AvatarPackage.open(tmp):  # validates: an invalid package is never moved into place
            pass
        with partials.dir_lock(dst.parent):  # one writer at a time moves a package into place
            _check_destination(dst, overwrite=overwrite, source_dir=source_dir)  # again: encoding took a while
            _move_into_place(tmp, dst)
    except OSError as exc:  # a full disk, a vanished directory: one line, nothing left behind
        raise AvatarPackageError(partials.no_space_message(dst, exc)) from None
    finally:
        if face_out is not None:
            face_out.close()
        if writer is not None:
            writer.abort()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        os.close(held)
    return dst


def _copy_files(tmp: Path, **files: str | Path | None) -> dict[str, str | None]:
    """Copy the model, encoder and feature files into the package; their names there."""
    copied: dict[str, str | None] = {}
    for key, f in files.items():
        copied[key] = None
        if f is None:
            continue
        f = Path(f)
        if not f.is_file():
            raise AvatarPackageError(f"{key.replace('_', ' ')} file {f} not found")
        target = "aud_ave.npy" if key == "audio_features" else f.name
        if target in (MANIFEST, BOXES, "cache", *(name for name, _ in FRAME_CODECS.values())) or (tmp / target).exists():
            raise AvatarPackageError(f"{f.name}: two packaged files would have the same name; rename one")
        if key == "audio_features":
            check_ave_features(f)
        shutil.copy2(f, tmp / target)
        copied[key] = target
    return copied


def check_ave_features(path: Path) -> np.ndarray:
    """Load AVE features ``[rows, 512]`` (float) safely, or raise one clear error."""
    a = _load_npy(path, "AVE audio features")
    if a.ndim != 2 or a.shape[1] != AVE_DIM or len(a) == 0 or a.dtype.kind != "f":
        raise AvatarPackageError(
            f"{path} is not AVE features: it is {a.dtype} {list(a.shape)}, AVE features are float [frames, {AVE_DIM}]; "
            "remove it or make it with the AVE audio encoder"
        )
    return a


def _load_npy(path: Path, what: str, mmap: bool = True) -> np.ndarray:
    """``np.load`` without pickles, every failure one :class:`AvatarPackageError`."""
    try:
        a = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise AvatarPackageError(f"{path} is not a readable {what} array (.npy without objects): {exc}") from None
    if not isinstance(a, np.ndarray):
        raise AvatarPackageError(f"{path} is not a single .npy array ({what})")
    return a


def _check_box_sizes(boxes: np.ndarray, width: int, height: int) -> None:
    problems = _box_problems(boxes, width, height)
    if problems:
        raise AvatarPackageError("bad crop boxes:\n  - " + "\n  - ".join(problems))


def _sweep_beside(dst: Path) -> None:
    """Under the parent's lock: remove dead writers' partials of ``dst``, restore an orphaned old package."""
    gone = partials.sweep(dst.parent, f".{dst.name}.partial-*")
    if gone:
        log.info("removed %d unfinished import(s) of %s left by a process that died", len(gone), dst)
    olds = sorted(dst.parent.glob(f".{dst.name}.old-*"))
    if olds and not dst.exists() and _looks_like_package(olds[-1]):
        os.replace(olds[-1], dst)  # killed between the two renames of a replacement: the old package comes back
        olds = olds[:-1]
        log.warning("restored %s, which an interrupted replacement had moved aside", dst)
    if olds and dst.exists():
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)


def _is_relative_to(path: Path, other: Path) -> bool:
    """``path`` is ``other`` or lies inside it (both resolved)."""
    return path == other or other in path.parents


def _check_destination(dst: Path, *, overwrite: bool, source_dir: str | Path | None) -> None:
    """Refuse every destination whose replacement could destroy something that is not an avatar package."""
    try:
        real = dst.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError) as exc:
        raise AvatarPackageError(f"cannot resolve the output path {dst}: {exc}") from None
    if _is_relative_to(cwd, real):
        raise AvatarPackageError(
            f"{dst} is the current directory or one of its parents; write the package to a new directory "
            "(e.g. -o my-avatar)"
        )
    if source_dir is not None:
        src = Path(source_dir).resolve()
        if _is_relative_to(real, src) or _is_relative_to(src, real):
            raise AvatarPackageError(
                f"{dst} is the import source {source_dir}, inside it or contains it; "
                "write the package to a directory outside the source"
            )
    if dst.is_symlink():
        raise AvatarPackageError(f"{dst} is a symbolic link; pass the directory it points to, or another path")
    if not dst.exists():
        return
    if not dst.is_dir():
        raise AvatarPackageError(f"{dst} exists and is not a directory; choose another output path")
    try:
        empty = not any(dst.iterdir())
    except OSError as exc:
        raise AvatarPackageError(f"cannot read {dst}: {exc}") from None
    if empty:
        return
    if not overwrite:
        raise AvatarPackageError(
            f"{dst} already exists and is not empty; choose another path, "
            "or pass overwrite (--force) to replace an avatar package"
        )
    if not _looks_like_package(dst):
        raise AvatarPackageError(
            f"{dst} is not empty and is not an avatar package (no valid {MANIFEST}); refusing to replace it — "
            "overwrite (--force) only replaces an existing avatar package; choose another path"
        )


def _looks_like_package(path: Path) -> bool:
    """A directory whose ``avatar.json`` is an avatar-package manifest (any version)."""
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without the wrapper (glibc < 2.28, some musl builds)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished package ``tmp`` to ``dst``, replacing an old package there.

    The replacement is one atomic exchange where the system offers it, so a
    reader opening ``dst`` meanwhile finds the old package or the new one,
    never no package; the old one then lies at ``tmp`` and is removed.
    """
    if dst.exists() and any(dst.iterdir()):
        if _exchange(tmp, dst):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old)  # an empty directory may be replaced by a rename; the old package is moved aside
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)  # replaces an empty directory atomically


def _boxes_digest(boxes: np.ndarray) -> str:
    b = np.ascontiguousarray(boxes, dtype=np.int32)
    return hashlib.sha256(repr(b.shape).encode() + b.tobytes()).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _frames_identity(path: Path, digest: bool) -> dict[str, Any]:
    st = path.stat()
    out: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if digest:
        out["sha256"] = _file_digest(path)
    return out


def _write_faces_meta(root: Path, interpolation: str, n: int, made_from: str, boxes: np.ndarray, frames_file: str) -> None:
    """Write ``faces320.json`` atomically: what the cache was made from (to detect a stale one).

    ``made_from``: ``source`` (the importer's decoded source frames), ``supplied``
    (face images given by the source, e.g. an ROI video) or ``package-frames``
    (rebuilt from the stored frames).
    """
    meta = {
        "interpolation": interpolation,
        "frame_count": n,
        "made_from": made_from,
        "boxes_sha256": _boxes_digest(boxes),
        "frames": _frames_identity(root / frames_file, digest=True),
    }
    _atomic_write_text(root / FACES_META, json.dumps(meta) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        _unlink(Path(tmp))
        raise


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


# --------------------------------------------------------------------------- reading


class AvatarPackage:
    """An opened avatar package (see the module docstring for the layout).

    ``boxes`` is int32 ``[N, 4]``; ``faces`` the memory-mapped face cache
    (built on first access when absent, stale or truncated); ``frame(i)``
    decodes through a :class:`FrameStore` bounded by ``memory_budget_mb``. Use
    as a context manager or call :meth:`close`. Every file the manifest names
    must lie inside the package; opening refuses the package otherwise.
    """

    def __init__(self, path: Path, manifest: Manifest, *, memory_budget_mb: float) -> None:
        self.path = path
        self.manifest = manifest
        m = manifest
        # resolved once, here: nothing outside the package is ever opened (a package may come from anyone)
        self.frames_path = member(path, m.frames_file, "video file")
        self._model = member(path, m.model, "model file") if m.model else None
        self._encoder = member(path, m.audio_encoder, "audio encoder file") if m.audio_encoder else None
        self._features = member(path, m.audio_features, "audio features file") if m.audio_features else None
        self.store = FrameStore(self.frames_path, memory_budget_mb=memory_budget_mb)
        self._faces: np.ndarray | None = None
        self._faces_lock = threading.Lock()
        self.boxes: np.ndarray = _read_boxes(path / BOXES)
        self._sweep_partials()

    @classmethod
    def open(
        cls, path: str | Path, *, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, validate: bool = True
    ) -> "AvatarPackage":
        """Open the package directory ``path``; ``validate`` checks it first (cheap: no decoding)."""
        path = Path(path)
        pkg = cls(path, read_manifest(path), memory_budget_mb=memory_budget_mb)
        if validate:
            pkg.validate()
        return pkg

    def _sweep_partials(self) -> None:
        """Best effort: remove what writers killed mid-way left in and beside this package."""
        cache = self.path / "cache"
        parent = self.path.parent
        try:
            if any(cache.glob(FACES_PARTIAL)):
                with partials.dir_lock(cache):
                    if partials.sweep(cache, FACES_PARTIAL):
                        log.info("removed unfinished face caches of %s left by a process that died", self.path)
            if any(parent.glob(f".{self.path.name}.partial-*")) or any(parent.glob(f".{self.path.name}.old-*")):
                with partials.dir_lock(parent):
                    _sweep_beside(self.path)
        except OSError as exc:  # a read-only package: nothing to clean, nothing to fail
            log.debug("cannot clean partial files of %s: %s", self.path, exc)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def frame_count(self) -> int:
        return self.manifest.frame_count

    @property
    def width(self) -> int:
        return self.manifest.width

    @property
    def height(self) -> int:
        return self.manifest.height

    @property
    def fps(self) -> float:
        return self.manifest.fps

    @property
    def crop_interpolation(self) -> str:
        return self.manifest.crop_interpolation

    @property
    def frames_lossless(self) -> bool:
        """Whether the stored frames decode to exactly the imported ones (FFV1)."""
        return bool(self.manifest.video.get("lossless", False))

    @property
    def model_path(self) -> Path | None:
        return self._model

    @property
    def audio_encoder_path(self) -> Path | None:
        return self._encoder

    @property
    def audio_features(self) -> np.ndarray | None:
        """The recording's own audio features (``aud_ave.npy``, float ``[rows, 512]``), if packaged."""
        return np.array(check_ave_features(self._features)) if self._features else None

    def validate(self) -> None:
        """Raise :class:`AvatarPackageError` listing every problem found."""
        problems: list[str] = []
        m, n = self.manifest, self.manifest.frame_count
        b = self.boxes
        if b.ndim != 2 or b.shape[1:] != (4,):
            problems.append(f"{BOXES} must be [N, 4], it is {list(b.shape)}")
        else:
            if len(b) != n:
                problems.append(f"{BOXES} has {len(b)} boxes but the manifest says {n} frames")
            problems += _box_problems(b, m.width, m.height)
        frames = len(self.store)
        name = m.frames_file
        if frames != n:
            problems.append(f"{name} has {frames} frames but the manifest says {n}")
        if (self.store.width, self.store.height) != (m.width, m.height):
            problems.append(f"{name} is {self.store.width}x{self.store.height}, the manifest says {m.width}x{m.height}")
        faces = self.path / FACES
        if faces.is_file():
            shape = partials.npy_complete(faces)
            if shape is None:
                log.warning("the face cache %s is truncated or unreadable; it will be rebuilt", faces)
            elif shape != (n, 320, 320, 3):
                problems.append(f"{FACES} is {list(shape)}, expected [{n}, 320, 320, 3]; delete it to rebuild it")
        for key, f in (("model", self._model), ("audio_encoder", self._encoder), ("audio_features", self._features)):
            if f is not None and not f.is_file():
                problems.append(f"the manifest names {key} file {f.name!r} but it is missing")
        if self._model and m.feature_type and not problems:
            problems += _model_problems(self._model, m.feature_type)
        if self._features and self._features.is_file():
            try:
                check_ave_features(self._features)
            except AvatarPackageError as exc:
                problems.append(str(exc))
        if problems:
            raise AvatarPackageError(f"avatar package {self.path} is invalid:\n  - " + "\n  - ".join(problems))

    # frames
    def frame(self, i: int, *, writable: bool = False) -> np.ndarray:
        """Full frame ``i``, BGR uint8: read-only, or with ``writable`` a new array the caller owns."""
        return self.store.frame(i, writable=writable)

    def frames(self, indices: Iterable[int]) -> Iterator[np.ndarray]:
        return self.store.frames(indices)

    # faces and model inputs
    @property
    def faces(self) -> np.ndarray:
        """uint8 ``[N, 320, 320, 3]`` memory-mapped face cache (built when absent, stale or truncated).

        Several processes may open the same package at once: each builder
        writes its own temporary file and renames it into place, and a builder
        that finds a current cache made by another process meanwhile uses that.
        """
        with self._faces_lock:  # the engine may ask from several threads
            if self._faces is None:
                if not self._faces_current():
                    self._build_faces(reuse_current=True)
                self._faces = np.load(self.path / FACES, mmap_mode="r", allow_pickle=False)
            return self._faces

    def _faces_current(self) -> bool:
        """Whether the face cache is complete and was made from the current frames, boxes and crop rule."""
        f, meta_f = self.path / FACES, self.path / FACES_META
        if partials.npy_complete(f) != (self.frame_count, vision.FACE_SIZE, vision.FACE_SIZE, 3):
            return False  # absent, truncated (a full disk, a killed copy) or of another shape
        try:
            meta = json.loads(meta_f.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(meta, dict):
            return False
        if meta.get("made_from") == "supplied":
            return True  # faces given by the source (e.g. an ROI video): keep them
        if meta.get("interpolation") != self.crop_interpolation or meta.get("frame_count") != self.frame_count:
            return False
        if meta.get("boxes_sha256") != _boxes_digest(self.boxes):
            return False
        made = meta.get("frames")
        if not isinstance(made, dict):
            return False  # made by an older avatar-sdk: rebuilt once
        try:
            now = _frames_identity(self.frames_path, digest=False)
        except OSError:
            return False
        if made.get("size") != now["size"]:
            return False
        if made.get("mtime_ns") == now["mtime_ns"]:
            return True
        # touched or copied without its times: the same content still counts as current
        try:
            same = made.get("sha256") == _file_digest(self.frames_path)
        except OSError:
            return False
        if same:  # remember the new time so that the next opening skips the hash (best effort)
            meta["frames"] = {**made, "mtime_ns": now["mtime_ns"]}
            try:
                _atomic_write_text(meta_f, json.dumps(meta) + "\n")
            except OSError as exc:
                log.debug("cannot update %s: %s", meta_f, exc)
        return same

    def build_faces(self) -> Path:
        """(Re)build the face cache from the stored frames (one decode of each); returns its path.

        With H.264 storage the rebuilt faces are the preprocessing of the
        re-encoded frames, no longer bit-exact with the source the importer
        read (a warning says so); with FFV1 storage they are identical.
        """
        return self._build_faces(reuse_current=False)

    def _build_faces(self, *, reuse_current: bool) -> Path:
        self._faces = None
        dst = self.path / FACES
        shape = (self.frame_count, vision.FACE_SIZE, vision.FACE_SIZE, 3)
        fd = -1
        try:
            dst.parent.mkdir(exist_ok=True)
            with partials.dir_lock(dst.parent):
                partials.sweep(dst.parent, FACES_PARTIAL)
                # a file of our own: another process may be building the same cache right now
                fd, name = tempfile.mkstemp(prefix="faces320.", suffix=".partial.npy", dir=dst.parent)
                partials.claim_fd(fd)  # held until we finish: a dead builder's file is swept by the next
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            raise AvatarPackageError(f"cannot write the face cache {dst}: {exc}; make the package writable") from None
        tmp = Path(name)
        out: partials.NpyWriter | None = None
        try:
            partials.check_space(dst.parent, self.frame_count * FACE_BYTES, dst)
            out = partials.NpyWriter(fd, dst, shape)  # messages name the cache, not our temporary file
            if not self.frames_lossless:
                log.warning(
                    "building the face cache of %s from its H.264 frames: the model inputs are not bit-exact "
                    "with the imported source (re-import, or import with --frames-codec ffv1, for exact ones)",
                    self.path,
                )
            log.info("building the face cache of %s (%d frames)", self.path, self.frame_count)
            count = 0  # one sequential pass (no per-GOP seeks, no LRU churn)
            for i, frame in enumerate(_decode_all(self.frames_path)):
                if i >= self.frame_count:
                    break
                out.write(vision.face_320(frame, tuple(self.boxes[i]), self.crop_interpolation))
                count += 1
            if count != self.frame_count:
                raise AvatarPackageError(
                    f"{self.manifest.frames_file} decoded to {count} frames, expected {self.frame_count}; re-import"
                )
            out.finish()
            out.close()
            out = None
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is an ordinary package file
            if reuse_current and self._faces_current():
                log.info("another process built the face cache of %s meanwhile; using it", self.path)
                _unlink(tmp)
                return dst
            os.replace(tmp, dst)  # atomic: readers see the old file or the new one, never a partial one
            _write_faces_meta(
                self.path, self.crop_interpolation, self.frame_count, "package-frames", self.boxes,
                self.manifest.frames_file,
            )
        except OSError as exc:
            _unlink(tmp)
            raise AvatarPackageError(partials.no_space_message(dst, exc)) from None
        except BaseException:
            _unlink(tmp)
            raise
        finally:
            if out is not None:
                out.close()
            os.close(fd)
        return dst

    def visual_inputs(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """Model visual inputs ``[B, 6, 320, 320]`` uint8 for avatar frames ``indices``."""
        idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        return vision.visual_batch(self.faces[idx])

    def composite(self, i: int, face: np.ndarray) -> np.ndarray:
        """Avatar frame ``i`` with a generated 320 face pasted in (a new frame)."""
        return vision.composite(self.frame(i), tuple(self.boxes[i]), face, interpolation=self.crop_interpolation)

    def close(self) -> None:
        self.store.close()
        self._faces = None

    def __enter__(self) -> "AvatarPackage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AvatarPackage({str(self.path)!r}, {self.frame_count} frames {self.width}x{self.height} @ {self.fps:g} fps)"


def _read_boxes(f: Path) -> np.ndarray:
    """``boxes.npy`` as read-only int32, refusing pickles, non-integers and values int32 cannot hold."""
    if not f.is_file():
        raise AvatarPackageError(f"{f} is missing; re-import the avatar")
    b = _load_npy(f, "crop boxes", mmap=False)
    if b.dtype.kind not in "iu":
        raise AvatarPackageError(f"{f} holds {b.dtype} values; crop boxes are integers (x1, y1, x2, y2) — re-import")
    if b.size and (int(b.min()) < -(2**31) or int(b.max()) >= 2**31):
        raise AvatarPackageError(f"{f} has coordinates beyond the int32 range; re-import the avatar")
    out = b.astype(np.int32)
    out.setflags(write=False)
    return out


def _box_problems(boxes: np.ndarray, width: int, height: int, limit: int = 5) -> list[str]:
    """Non-square, tiny, oversized and fully out-of-frame boxes (at most ``limit`` of each kind)."""
    x1, y1, x2, y2 = boxes.T.astype(np.int64)
    w, h = x2 - x1, y2 - y1
    out: list[str] = []

    def report(bad: np.ndarray, what: str, fix: str) -> None:
        idx = np.flatnonzero(bad)
        if len(idx):
            shown = ", ".join(f"frame {i} {tuple(int(v) for v in boxes[i])}" for i in idx[:limit])
            more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
            out.append(f"{len(idx)} box(es) {what}: {shown}{more}; {fix}")

    report(w != h, "not square", "the crop rule makes square boxes — recompute them from the landmarks")
    report(np.minimum(w, h) < MIN_BOX_SIDE, f"smaller than {MIN_BOX_SIDE} px", "check the landmarks of those frames")
    report((x2 <= 0) | (y2 <= 0) | (x1 >= width) | (y1 >= height), f"entirely outside the {width}x{height} frame",
           "check the landmarks or the frame size")
    limit_side = MAX_BOX_FACTOR * max(width, height)
    report(np.maximum(w, h) > limit_side, f"larger than {limit_side} px ({MAX_BOX_FACTOR}x the frame)",
           "check the landmarks or the frame size")
    return out


def _model_problems(model: Path, feature_type: str) -> list[str]:
    from .contract import read_contract

    try:
        c = read_contract(model)
    except Exception as exc:  # ModelError and friends: report, do not crash validation
        return [f"model {model.name}: {exc}"]
    if c.feature_type != feature_type:
        return [
            f"the manifest says feature type {feature_type!r} but {model.name} takes {c.feature_type!r} audio windows "
            f"{c.audio_window_shape}; fix the manifest's model.feature_type"
        ]
    return []
