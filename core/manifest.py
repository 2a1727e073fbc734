"""The avatar package manifest (``avatar.json``): its schema, reading and writing.

The manifest is checked against one JSON Schema (:data:`SCHEMA`, Draft 2020-12)
with the maintained ``jsonschema`` validator. A declarative schema rather than
hand-written checks: it is the single definition of the format, it is printed
in ``docs/avatar-package.md`` and can be used unchanged by the implementations
in other languages that the specification mentions (Go, JavaScript), and
``jsonschema.exceptions.best_match`` turns any number of violations into one
error with its JSON path. One deliberate tightening of JSON Schema's rules:
an ``integer`` must be a JSON integer (``720``, not ``720.0``), as this SDK
always writes it.

Every file a manifest names must stay inside the package (a package is a unit a
user may download from someone else): :func:`member` refuses absolute paths,
``..`` and symbolic links that lead out of it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from .errors import AvatarPackageError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "SCHEMA", "Manifest", "member", "read_manifest"]

FORMAT_NAME = "avatar-package"
FORMAT_VERSION = 1
MANIFEST = "avatar.json"
FRAMES = "frames.mp4"
BOXES = "boxes.npy"
#: the manifest names of the resize interpolations (``avatar.vision.INTERPOLATIONS``;
#: spelled out so that reading a manifest does not import OpenCV)
INTERPOLATION_NAMES = ("area", "cubic", "lanczos", "linear", "nearest")
DEFAULT_INTERPOLATION = "cubic"
#: frame sizes above this are refused (16K): a hostile manifest must not size allocations
MAX_SIDE = 16384

# a file inside the package; that it stays inside is checked by member() (one readable message)
_FILE = {"type": "string", "minLength": 1, "maxLength": 255}
_FILE_OR_NULL = {**_FILE, "type": ["string", "null"]}
_INT = {"type": "integer"}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "avatar-package manifest (avatar.json), version 1",
    "type": "object",
    "required": ["format", "version", "name", "fps", "frame_count", "width", "height"],
    "properties": {
        "format": {"const": FORMAT_NAME},
        "version": {"const": FORMAT_VERSION},
        "name": {"type": "string"},
        "fps": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
        "frame_count": {**_INT, "minimum": 1},
        "width": {**_INT, "minimum": 2, "maximum": MAX_SIDE},
        "height": {**_INT, "minimum": 2, "maximum": MAX_SIDE},
        "crop": {
            "type": "object",
            "properties": {
                "rule": {"const": "synctalk-110"},
                "interpolation": {"enum": list(INTERPOLATION_NAMES)},
            },
        },
        "boxes": {"const": BOXES},
        # "type": [..., "null"] rather than anyOf: one plain error ("'x' is not of type 'object', 'null'")
        "model": {
            "type": ["object", "null"],
            "properties": {
                "file": _FILE_OR_NULL,
                "feature_type": {"enum": ["ave", "hubert", "wenet", None]},
                "padding": {"enum": ["replicate", "zero", None]},
                "audio_encoder": _FILE_OR_NULL,
            },
        },
        "audio_features": {
            "type": ["object", "null"],
            "required": ["file"],
            "properties": {"file": _FILE, "feature_type": {"const": "ave"}},
        },
        "video": {
            "type": "object",
            "properties": {
                "file": _FILE,
                "codec": {"enum": ["h264", "ffv1"]},
                "lossless": {"type": "boolean"},
                "crf": {**_INT, "minimum": 0, "maximum": 51},
                "gop": {**_INT, "minimum": 1},
            },
        },
        "source": {"type": "object"},
    },
}


def _validator() -> Any:
    import jsonschema

    def strict_integer(checker: Any, instance: object) -> bool:
        return isinstance(instance, int) and not isinstance(instance, bool)

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("integer", strict_integer)
    return jsonschema.validators.extend(base, type_checker=checker)(SCHEMA)


def check_manifest(data: object, where: Path | str) -> None:
    """Raise one :class:`AvatarPackageError` for the first problem of the manifest ``data``."""
    if not isinstance(data, dict):
        raise AvatarPackageError(f"{where} is not an avatar package manifest (a JSON object is expected)")
    if data.get("format") != FORMAT_NAME:
        raise AvatarPackageError(f"{where} is not an avatar package manifest (format={data.get('format')!r})")
    version = data.get("version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise AvatarPackageError(
            f"{where} has format version {version!r}; this avatar-sdk reads version {FORMAT_VERSION} — "
            "upgrade avatar-sdk or re-import the avatar with `avatar import`"
        )
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(data))
    if error is not None:
        at = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        raise AvatarPackageError(
            f"{where}: {at or 'the manifest'}: {error.message}; fix the manifest or re-import the avatar"
        )


def member(root: Path, name: str, what: str) -> Path:
    """``root / name``, refused unless it stays inside the package ``root`` (symbolic links resolved)."""
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in name or not name:
        raise AvatarPackageError(f"the manifest's {what} {name!r} is not a path inside the package; refusing to use it")
    path = root / rel
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise AvatarPackageError(f"the manifest's {what} {name!r} leads outside the package {root}; refusing to use it")
    return path


@dataclass(frozen=True)
class Manifest:
    """The contents of ``avatar.json``."""

    name: str
    fps: float
    frame_count: int
    width: int
    height: int
    crop_interpolation: str = DEFAULT_INTERPOLATION
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
    #: how the background frames are stored (``file``, ``codec``, ``lossless``, ...)
    video: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def frames_file(self) -> str:
        """The frame video's file name inside the package (``frames.mp4`` or ``frames.mkv``)."""
        return str(self.video.get("file", FRAMES))

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
    def from_dict(cls, d: Mapping[str, Any], where: Path | str) -> "Manifest":
        check_manifest(d, where)
        model = d.get("model") or {}
        return cls(
            name=d["name"],
            fps=float(d["fps"]),
            frame_count=d["frame_count"],
            width=d["width"],
            height=d["height"],
            crop_interpolation=d.get("crop", {}).get("interpolation", DEFAULT_INTERPOLATION),
            model=model.get("file"),
            feature_type=model.get("feature_type"),
            padding=model.get("padding"),
            audio_encoder=model.get("audio_encoder"),
            audio_features=(d.get("audio_features") or {}).get("file"),
            source=dict(d.get("source", {})),
            video=dict(d.get("video", {})),
            version=d["version"],
        )


def read_manifest(path: str | Path) -> Manifest:
    """Read and check ``avatar.json`` of the package directory ``path``."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise AvatarPackageError(f"{path} is not an avatar package: {MANIFEST} is missing (make one with `avatar import`)")
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise AvatarPackageError(f"cannot read {f}: {exc}; fix the manifest or re-import the avatar") from None
    return Manifest.from_dict(data, f)
