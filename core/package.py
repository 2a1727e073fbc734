"""The avatar package: a directory holding one avatar's frames, crop boxes and caches.

Layout (see ``docs/avatar-package.md`` for the full description)::

    avatar.json            manifest (format version, name, fps, size, crop rule, ...)
    frames.mp4             full frames, H.264 yuv420p, CRF 14, fixed short GOP
    boxes.npy              int32 [N, 4] crop boxes (x1, y1, x2, y2)
    aud_ave.npy            optional: the recording's own audio features
    <model>.onnx           optional: the UNet-328 trained for this avatar
    <encoder>.onnx         optional: the AVE audio encoder to use with it
    cache/faces320.npy     uint8 [N, 320, 320, 3] face crops (memory-mapped)
    cache/faces320.json    how the face cache was made (to detect a stale cache)

Frames are decoded on demand by :class:`FrameStore` within a memory budget; the
visual model inputs depend only on the avatar frame, so they come from the face
cache, never from decoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from . import vision
from .errors import AvatarPackageError, ConfigError
from .framestore import DEFAULT_MEMORY_BUDGET_MB, FrameStore, H264Writer, _decode_all

__all__ = ["AvatarPackage", "FrameStore", "Manifest", "read_manifest", "write_package"]

log = logging.getLogger(__name__)

FORMAT_NAME = "avatar-package"
FORMAT_VERSION = 1
MANIFEST = "avatar.json"
FRAMES = "frames.mp4"
BOXES = "boxes.npy"
FACES = "cache/faces320.npy"
FACES_META = "cache/faces320.json"
#: smaller boxes than this cannot carry a usable face
MIN_BOX_SIDE = 16
DEFAULT_CRF = 14
DEFAULT_GOP = 12
DEFAULT_PRESET = "veryfast"


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """The contents of ``avatar.json``."""

    name: str
    fps: float
    frame_count: int
    width: int
    height: int
    crop_interpolation: str = vision.DEFAULT_INTERPOLATION
    #: optional UNet-328 shipped with the avatar (file name inside the package)
    model: str | None = None
    #: the model's feature type (``ave``, ``hubert``, ``wenet``) and window edge padding
    feature_type: str | None = None
    padding: str | None = None
    #: optional AVE audio-encoder ONNX shipped with the avatar (file name)
    audio_encoder: str | None = None
    #: optional AVE features of the recording's own audio (file name, ``[frames, 512]``)
    audio_features: str | None = None
    #: where the avatar came from (importer, source path, numbering, ...)
    source: dict[str, Any] = field(default_factory=dict)
    video: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if float(d["fps"]).is_integer():
            d["fps"] = int(d["fps"])
        crop = {"rule": "synctalk-110", "interpolation": d.pop("crop_interpolation")}
        model_keys = ("feature_type", "padding", "audio_encoder")
        model = {"file": d.pop("model"), **{k: d.pop(k) for k in model_keys}}
        aud = d.pop("audio_features")
        return {
            "format": FORMAT_NAME,
            "version": d.pop("version"),
            **d,
            "crop": crop,
            "boxes": BOXES,
            "model": model if any(model.values()) else None,
            "audio_features": {"file": aud, "feature_type": "ave"} if aud else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: Path) -> "Manifest":
        if d.get("format") != FORMAT_NAME:
            raise AvatarPackageError(f"{where} is not an avatar package manifest (format={d.get('format')!r})")
        version = d.get("version")
        if version != FORMAT_VERSION:
            raise AvatarPackageError(
                f"{where} has format version {version!r}; this avatar-sdk reads version {FORMAT_VERSION} — "
                "upgrade avatar-sdk or re-import the avatar with `avatar import`"
            )
        try:
            return cls(
                name=str(d["name"]),
                fps=float(d["fps"]),
                frame_count=int(d["frame_count"]),
                width=int(d["width"]),
                height=int(d["height"]),
                crop_interpolation=str(d.get("crop", {}).get("interpolation", vision.DEFAULT_INTERPOLATION)),
                model=(d.get("model") or {}).get("file"),
                feature_type=(d.get("model") or {}).get("feature_type"),
                padding=(d.get("model") or {}).get("padding"),
                audio_encoder=(d.get("model") or {}).get("audio_encoder"),
                audio_features=(d.get("audio_features") or {}).get("file"),
                source=dict(d.get("source", {})),
                video=dict(d.get("video", {})),
                version=int(version),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AvatarPackageError(f"{where} is missing or has a bad field ({exc}); re-import the avatar") from None


def read_manifest(path: str | Path) -> Manifest:
    """Read and check ``avatar.json`` of the package directory ``path``."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise AvatarPackageError(f"{path} is not an avatar package: {MANIFEST} is missing (make one with `avatar import`)")
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise AvatarPackageError(f"cannot read {f}: {exc}") from None
    return Manifest.from_dict(data, f)


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
    overwrite: bool = False,
    source_dir: str | Path | None = None,
) -> Path:
    """Write an avatar package and return its path.

    ``frames`` are BGR uint8 full frames, one per row of ``boxes`` (int
    ``[N, 4]``: x1, y1, x2, y2). ``faces=True`` builds the face cache from the
    *stored* frames right away (so ``faces[i] == face_320(frame(i))`` exactly,
    and a rebuilt cache is identical); an iterable of 320x320 BGR images uses
    those instead (e.g. an existing ROI video); ``False`` leaves the cache to be
    built on first use. ``model``, ``audio_encoder`` and
    ``audio_features`` files are copied in (``feature_type``/``padding``
    describe the model). The package is assembled in a temporary directory beside ``dst`` and
    moved into place only when complete, then validated.

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
    _check_destination(dst, overwrite=overwrite, source_dir=source_dir)
    rate = fps_fraction(fps)
    n = len(boxes)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    except OSError as exc:
        raise AvatarPackageError(f"cannot create {dst}: {exc}; choose a writable output directory") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a package is an ordinary directory
    writer: H264Writer | None = None
    try:
        (tmp / "cache").mkdir()
        face_iter = iter(faces) if not isinstance(faces, bool) else None
        face_store = None
        if face_iter is not None:
            face_store = np.lib.format.open_memmap(tmp / FACES, mode="w+", dtype=np.uint8, shape=(n, 320, 320, 3))
        count = 0
        size: tuple[int, int] = (0, 0)
        for frame in frames:
            if count >= n:
                raise AvatarPackageError(f"more frames than boxes ({n}); every frame needs a crop box")
            if writer is None:
                size = (frame.shape[1], frame.shape[0])
                writer = H264Writer(tmp / FRAMES, *size, rate, crf=crf, preset=preset, gop=gop)
            elif (frame.shape[1], frame.shape[0]) != size:
                raise AvatarPackageError(f"frame {count} is {frame.shape[1]}x{frame.shape[0]}, frame 0 is {size[0]}x{size[1]}")
            writer.write(frame)
            if face_store is not None and face_iter is not None:
                face = next(face_iter, None)
                if face is None:
                    raise AvatarPackageError(f"the face images end after {count} frames; there are {n} boxes")
                vision._check_face(face)
                face_store[count] = face
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
        if face_store is not None:
            face_store.flush()
            del face_store
            _write_faces_meta(tmp, crop_interpolation, n, "supplied", boxes)
        copied: dict[str, str | None] = {}
        for key, f in (("model", model), ("audio_encoder", audio_encoder), ("audio_features", audio_features)):
            copied[key] = None
            if f is not None:
                f = Path(f)
                if not f.is_file():
                    raise AvatarPackageError(f"{key.replace('_', ' ')} file {f} not found")
                target = "aud_ave.npy" if key == "audio_features" else f.name
                if (tmp / target).exists():
                    raise AvatarPackageError(f"{f.name}: two packaged files would have the same name; rename one")
                shutil.copy2(f, tmp / target)
                copied[key] = target
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
            video={"file": FRAMES, "codec": "h264", "pix_fmt": "yuv420p", "crf": crf, "gop": gop, "fps": str(rate)},
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        _check_destination(dst, overwrite=overwrite, source_dir=source_dir)  # again: encoding took a while
        _move_into_place(tmp, dst)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with AvatarPackage.open(dst) as pkg:  # validates
        if faces is True:
            pkg.build_faces()
    return dst


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


def _move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished package ``tmp`` to ``dst``, replacing an old package there."""
    if dst.exists() and any(dst.iterdir()):
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


def _write_faces_meta(root: Path, interpolation: str, n: int, made_from: str, boxes: np.ndarray) -> None:
    """Write ``faces320.json`` atomically: what the cache was made from (to detect a stale one)."""
    meta = {
        "interpolation": interpolation,
        "frame_count": n,
        "made_from": made_from,
        "boxes_sha256": _boxes_digest(boxes),
        "frames": _frames_identity(root / FRAMES, digest=True),
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
    (built on first access when absent or stale); ``frame(i)`` decodes through
    a :class:`FrameStore` bounded by ``memory_budget_mb``. Use as a context
    manager or call :meth:`close`.
    """

    def __init__(self, path: Path, manifest: Manifest, *, memory_budget_mb: float) -> None:
        self.path = path
        self.manifest = manifest
        self.store = FrameStore(path / FRAMES, memory_budget_mb=memory_budget_mb)
        self._faces: np.ndarray | None = None
        self._faces_lock = threading.Lock()
        f = path / BOXES
        if not f.is_file():
            raise AvatarPackageError(f"{f} is missing; re-import the avatar")
        self.boxes: np.ndarray = np.load(f).astype(np.int32)
        self.boxes.setflags(write=False)

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
    def model_path(self) -> Path | None:
        return self.path / self.manifest.model if self.manifest.model else None

    @property
    def audio_encoder_path(self) -> Path | None:
        return self.path / self.manifest.audio_encoder if self.manifest.audio_encoder else None

    @property
    def audio_features(self) -> np.ndarray | None:
        """The recording's own audio features (``aud_ave.npy``), if packaged."""
        a = self.manifest.audio_features
        return np.load(self.path / a) if a else None

    def validate(self) -> None:
        """Raise :class:`AvatarPackageError` listing every problem found."""
        problems: list[str] = []
        m, n = self.manifest, self.manifest.frame_count
        try:
            vision.interpolation_flag(m.crop_interpolation)
        except ConfigError as exc:
            problems.append(f"manifest crop interpolation: {exc}")
        b = self.boxes
        if b.ndim != 2 or b.shape[1:] != (4,):
            problems.append(f"{BOXES} must be [N, 4], it is {list(b.shape)}")
        else:
            if len(b) != n:
                problems.append(f"{BOXES} has {len(b)} boxes but the manifest says {n} frames")
            problems += _box_problems(b, m.width, m.height)
        frames = len(self.store)
        if frames != n:
            problems.append(f"{FRAMES} has {frames} frames but the manifest says {n}")
        if (self.store.width, self.store.height) != (m.width, m.height):
            problems.append(f"{FRAMES} is {self.store.width}x{self.store.height}, the manifest says {m.width}x{m.height}")
        faces = self.path / FACES
        if faces.is_file():
            shape = np.load(faces, mmap_mode="r").shape
            if shape != (n, 320, 320, 3):
                problems.append(f"{FACES} is {list(shape)}, expected [{n}, 320, 320, 3]; delete it to rebuild it")
        for key, name in (("model", m.model), ("audio_encoder", m.audio_encoder), ("audio_features", m.audio_features)):
            if name and not (self.path / name).is_file():
                problems.append(f"the manifest names {key} file {name!r} but it is missing")
        if m.padding not in (None, "replicate", "zero"):
            problems.append(f"model padding must be 'replicate' or 'zero', not {m.padding!r}")
        if m.model and m.feature_type and not problems:
            problems += _model_problems(self.path / m.model, m.feature_type)
        if m.audio_features:
            f = self.path / m.audio_features
            if f.is_file() and np.load(f, mmap_mode="r").ndim != 2:
                problems.append(f"{f.name} must be a [frames, 512] array")
        if problems:
            raise AvatarPackageError(f"avatar package {self.path} is invalid:\n  - " + "\n  - ".join(problems))

    # frames
    def frame(self, i: int) -> np.ndarray:
        """Full frame ``i``, BGR uint8 (read-only view; copy before modifying)."""
        return self.store.frame(i)

    def frames(self, indices: Iterable[int]) -> Iterator[np.ndarray]:
        return self.store.frames(indices)

    # faces and model inputs
    @property
    def faces(self) -> np.ndarray:
        """uint8 ``[N, 320, 320, 3]`` memory-mapped face cache (built when absent or stale).

        Several processes may open the same package at once: each builder
        writes its own temporary file and renames it into place, and a builder
        that finds a current cache made by another process meanwhile uses that.
        """
        with self._faces_lock:  # the engine may ask from several threads
            if self._faces is None:
                if not self._faces_current():
                    self._build_faces(reuse_current=True)
                self._faces = np.load(self.path / FACES, mmap_mode="r")
            return self._faces

    def _faces_current(self) -> bool:
        """Whether the face cache exists and was made from the current frames, boxes and crop rule."""
        f, meta_f = self.path / FACES, self.path / FACES_META
        if not f.is_file():
            return False
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
            now = _frames_identity(self.store.path, digest=False)
        except OSError:
            return False
        if made.get("size") != now["size"]:
            return False
        if made.get("mtime_ns") == now["mtime_ns"]:
            return True
        # touched or copied without its times: the same content still counts as current
        try:
            same = made.get("sha256") == _file_digest(self.store.path)
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
        """(Re)build the face cache by decoding every frame once; returns its path."""
        return self._build_faces(reuse_current=False)

    def _build_faces(self, *, reuse_current: bool) -> Path:
        self._faces = None
        dst = self.path / FACES
        shape = (self.frame_count, 320, 320, 3)
        try:
            dst.parent.mkdir(exist_ok=True)
            # a file of our own: another process may be building the same cache right now
            fd, name = tempfile.mkstemp(prefix="faces320.", suffix=".partial.npy", dir=dst.parent)
            os.close(fd)
        except OSError as exc:
            raise AvatarPackageError(f"cannot write the face cache {dst}: {exc}; make the package writable") from None
        tmp = Path(name)
        store: np.ndarray | None = None
        try:
            try:
                store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            except OSError as exc:
                raise AvatarPackageError(f"cannot write the face cache {dst}: {exc}; free disk space") from None
            log.info("building the face cache of %s (%d frames)", self.path, self.frame_count)
            # one sequential pass (no per-GOP seeks, no LRU churn)
            count = 0
            for i, frame in enumerate(_decode_all(self.store.path)):
                if i >= self.frame_count:
                    break
                store[i] = vision.face_320(frame, tuple(self.boxes[i]), self.crop_interpolation)
                count += 1
            if count != self.frame_count:
                raise AvatarPackageError(f"{FRAMES} decoded to {count} frames, expected {self.frame_count}; re-import")
            store.flush()
            del store
            store = None
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is an ordinary package file
            if reuse_current and self._faces_current():
                log.info("another process built the face cache of %s meanwhile; using it", self.path)
                _unlink(tmp)
                return dst
            try:
                os.replace(tmp, dst)  # atomic: readers see the old file or the new one, never a partial one
                _write_faces_meta(self.path, self.crop_interpolation, self.frame_count, "package-frames", self.boxes)
            except OSError as exc:
                msg = f"cannot write the face cache {dst}: {exc}; make the package writable"
                raise AvatarPackageError(msg) from None
        except BaseException:
            del store
            _unlink(tmp)
            raise
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


def _box_problems(boxes: np.ndarray, width: int, height: int, limit: int = 5) -> list[str]:
    """Non-square, tiny and fully out-of-frame boxes (at most ``limit`` of each kind)."""
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
