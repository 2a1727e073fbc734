"""Accuracy gates for reduced-precision inference, measured on a trained model and real frames.

A reduced precision (bf16, fp16, int8) is only as good as what it does to the
face a *trained* model draws: a seeded random network says nothing (it gave
23.8 dB for bf16 where the trained model gives 53.8 dB). So a gate is measured
once per model, precision and device on an avatar's held-out frames and
recorded beside the model; backends read the record when they load.

The gate (``../shared/data/README.md``): on held-out frames, each frame's face
as the reference and its own audio window,

* face PSNR of the uint8 output against the fp32 output >= 40 dB, **and**
* at most 0.1 dB lost against the real frames (fp32's PSNR minus this one's).

PSNR is the mean over frames of the per-frame PSNR of the 320x320 uint8 face.

Records live in ``MODEL.gates.json`` beside the model when that folder is
writable, else in the avatar-sdk cache (``gates/<sha256>.gates.json``); both
are read. They are keyed by the model file's SHA-256, so a changed model has
no record.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from avatar.errors import AvatarPackageError, ConfigError

from ._common import cache_dir, file_sha256

log = logging.getLogger(__name__)

SCHEMA = "avatar-gates/1"
MIN_PSNR_VS_FP32 = 40.0
MAX_LOSS_DB = 0.1
#: a per-frame PSNR for identical frames (keeps the mean finite)
PSNR_CAP = 100.0
#: held-out frames used when none are given: the last this many with feature rows
DEFAULT_HELDOUT = 62


@dataclass
class GateRecord:
    """One measured gate: a model, a precision, a device, and the two PSNR figures."""

    model_sha256: str
    precision: str
    device: str
    backend: str
    psnr_vs_fp32: float
    psnr_vs_real: float
    fp32_vs_real: float
    frames: list[int]
    data: str
    passed: bool = False
    runtime: str = ""
    cpu: str = ""
    measured: str = ""
    #: the fp32 model the reference output came from (differs from the model for a quantized one)
    reference_sha256: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def loss_db(self) -> float:
        return self.fp32_vs_real - self.psnr_vs_real

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"{self.precision} on {self.device} ({self.backend}) {verdict}: {self.psnr_vs_fp32:.1f} dB against the fp32 "
            f"output (need >= {MIN_PSNR_VS_FP32:.0f}), {self.loss_db:+.2f} dB lost against the real frames "
            f"(need <= {MAX_LOSS_DB}) on frames {self.frames[0]}-{self.frames[-1]} of {self.data}"
        )


def model_sha256(path: str | Path) -> str:
    """Content hash of a model: the ONNX file, or an OpenVINO IR's ``.xml`` and ``.bin`` together."""
    import hashlib

    path = Path(path)
    weights = path.with_suffix(".bin")
    if path.suffix != ".xml" or not weights.is_file():
        return file_sha256(path)
    return hashlib.sha256((file_sha256(path) + file_sha256(weights)).encode()).hexdigest()


def judge(psnr_vs_fp32: float, loss_db: float) -> bool:
    """The verdict from the figures (NaN fails)."""
    return bool(psnr_vs_fp32 >= MIN_PSNR_VS_FP32 and loss_db <= MAX_LOSS_DB)


# --------------------------------------------------------------------------- records


def record_files(model: str | Path, sha: str | None = None) -> list[Path]:
    """Where records for ``model`` may live: beside it, then in the cache."""
    model = Path(model)
    sha = sha or model_sha256(model)
    return [model.with_name(model.name + ".gates.json"), cache_dir(None, "gates") / f"{sha}.gates.json"]


def load_records(model: str | Path, sha: str | None = None) -> list[GateRecord]:
    """Every record of this exact model file (matching SHA-256), oldest first.

    Records are read one by one: one this release cannot read (a field missing
    or of the wrong type) is skipped and named in a warning, the others are
    kept; fields it does not know (from a newer release) are ignored. ``passed``
    is never taken from the file: it is recomputed from the stored figures and
    the current thresholds (:func:`judge`).
    """
    sha = sha or model_sha256(model)
    out: list[GateRecord] = []
    for f in record_files(model, sha):
        if not f.is_file():
            continue
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("ignoring unreadable gate records %s: %s", f, exc)
            continue
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("records"), list):
            log.warning("ignoring gate records %s: not an %s file", f, SCHEMA)
            continue
        for i, row in enumerate(doc["records"]):
            if isinstance(row, dict) and row.get("model_sha256") != sha:
                continue
            try:
                out.append(parse_record(row))
            except ValueError as exc:
                log.warning("skipping gate record %d of %s (%s): %s", i, f, _label(row), exc)
    return sorted(out, key=lambda r: r.measured)


_FIELDS = {f.name: f for f in fields(GateRecord)}
_NUMBERS = ("psnr_vs_fp32", "psnr_vs_real", "fp32_vs_real")
_STRINGS = ("model_sha256", "precision", "device", "backend", "data", "runtime", "cpu", "measured", "reference_sha256")


def parse_record(row: Any) -> GateRecord:
    """One record from its JSON object; ``passed`` recomputed. Raises ValueError when it cannot be read."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    known = {k: v for k, v in row.items() if k in _FIELDS}
    missing = [n for n, f in _FIELDS.items() if f.default is MISSING and f.default_factory is MISSING and n not in known]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    for k in _NUMBERS:
        v = known[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{k} is not a number: {v!r}")
        known[k] = float(v)
    for k in _STRINGS:
        if k in known and not isinstance(known[k], str):
            raise ValueError(f"{k} is not a string: {known[k]!r}")
    frames = known["frames"]
    if not isinstance(frames, list) or not frames or not all(type(x) is int for x in frames):
        raise ValueError(f"frames is not a list of frame numbers: {frames!r}")
    if not isinstance(known.get("notes", {}), dict):
        raise ValueError("notes is not an object")
    stored = known.pop("passed", None)
    rec = GateRecord(**known)
    rec.passed = judge(rec.psnr_vs_fp32, rec.loss_db)
    if stored is not None and stored is not rec.passed:
        log.warning("gate record %s: the file says passed=%r, its figures say %r (%s); going by the figures",
                    _label(row), stored, rec.passed, rec.summary())
    unknown = sorted(set(row) - set(_FIELDS))
    if unknown:
        log.debug("gate record %s: ignoring fields %s", _label(row), ", ".join(unknown))
    return rec


def _label(row: Any) -> str:
    if not isinstance(row, dict):
        return "?"
    return f"{row.get('precision', '?')} on {row.get('device', '?')}"


def find_record(model: str | Path, precision: str, device: str, sha: str | None = None) -> GateRecord | None:
    """The newest record for this model, precision and device (``None``: never measured)."""
    found = [r for r in load_records(model, sha) if r.precision == precision and r.device == device]
    return found[-1] if found else None


def save_record(model: str | Path, record: GateRecord) -> Path:
    """Add ``record`` beside the model (or, if that folder is read-only, in the cache); return the file."""
    beside, cached = record_files(model, record.model_sha256)
    for f in (beside, cached):
        if f is beside and not _writable(f.parent):
            continue
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            doc = json.loads(f.read_text()) if f.is_file() else {"schema": SCHEMA, "records": []}
            doc["records"] = [
                r for r in doc.get("records", [])
                if (r.get("model_sha256"), r.get("precision"), r.get("device")) != (record.model_sha256, record.precision, record.device)
            ] + [asdict(record)]  # fmt: skip
            tmp = f.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, f)
            return f
        except OSError as exc:
            log.info("cannot write gate records to %s (%s); trying the cache", f, exc)
    raise ConfigError(f"cannot write gate records beside {model} nor in {cached.parent}")


def _writable(folder: Path) -> bool:
    """Whether to write into ``folder``: writable, and not marked read-only (root could write there anyway)."""
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def measure_command(model: str | Path, precision: str, backend: str, device: str) -> str:
    """The command that measures this gate (named in warnings)."""
    dev = f" --device {device}" if device != "CPU" else ""
    return f"avatar gate {model} --avatar AVATAR_PKG --backend {backend} --precision {precision}{dev}"


# --------------------------------------------------------------------------- data


@dataclass
class FrameData:
    """Faces, model inputs and audio windows of some avatar frames (each frame its own reference)."""

    indices: list[int]
    faces: np.ndarray  # uint8 [N, 320, 320, 3], the real frames' faces
    audio: np.ndarray  # float32 [N, *audio shape]
    source: str

    def visual(self, sl: slice = slice(None)) -> np.ndarray:
        from avatar import vision

        return vision.normalize(vision.visual_batch(self.faces[sl]))


def _frame_source(path: Path) -> tuple[Callable[[Sequence[int]], np.ndarray], np.ndarray, str, int]:
    """(faces of indices, feature rows, padding, frame count) of a SyncTalk_2D folder or an avatar package."""
    from avatar import vision

    if (path / "full_body_img").is_dir():  # the dataset itself: the real JPEG frames
        import cv2

        rows_f = path / "aud_ave.npy"
        if not rows_f.is_file():
            raise AvatarPackageError(f"{path} has no aud_ave.npy; the gate needs the recording's own feature rows")

        def faces(idx: Sequence[int]) -> np.ndarray:
            out = []
            for i in idx:
                img = cv2.imread(str(path / "full_body_img" / f"{i}.jpg"), cv2.IMREAD_COLOR)
                if img is None:
                    raise AvatarPackageError(f"cannot read {path / 'full_body_img' / f'{i}.jpg'}")
                box = vision.crop_box_from_landmarks(vision.read_lms(path / "landmarks" / f"{i}.lms"))
                out.append(vision.face_320(img, box))
            return np.stack(out)

        count = len(list((path / "full_body_img").glob("*.jpg")))
        return faces, np.load(rows_f), "replicate", count
    from avatar.package import AvatarPackage

    pkg = AvatarPackage.open(path)
    rows = pkg.audio_features
    if rows is None:
        raise AvatarPackageError(
            f"avatar package {path} has no audio features (aud_ave.npy); import it from a dataset that has them"
        )
    return (lambda idx: np.asarray(pkg.faces[np.asarray(idx)])), rows, pkg.manifest.padding or "replicate", pkg.frame_count


def usable_frames(path: str | Path) -> int:
    """How many frames of an avatar have feature rows (the frames a gate or a calibration can use)."""
    _, rows, _, count = _frame_source(Path(path))
    return min(count, len(rows))


def parse_frames(spec: str | None, usable: int) -> list[int]:
    """``START:END`` (end exclusive) or ``None`` for the last :data:`DEFAULT_HELDOUT` usable frames."""
    if spec is None:
        return list(range(max(0, usable - DEFAULT_HELDOUT), usable))
    try:
        a, b = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ConfigError(f"frames must be START:END, e.g. 460:522; got {spec!r}") from None
    if not 0 <= a < b <= usable:
        raise ConfigError(f"frames {spec} are outside 0:{usable} (frames that have feature rows)")
    return list(range(a, b))


def load_frames(path: str | Path, audio_shape: Sequence[int], *, frames: str | None = None,
                indices: Sequence[int] | None = None) -> FrameData:  # fmt: skip
    """Faces and audio windows of an avatar's frames: ``indices``, or the ``frames`` range (held-out by default)."""
    from avatar.windows import window

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not an avatar package or a SyncTalk_2D dataset folder")
    faces, rows, padding, count = _frame_source(path)
    usable = min(count, len(rows))
    idx = list(indices) if indices is not None else parse_frames(frames, usable)
    rows_per = int(np.prod(audio_shape)) // rows.shape[-1] if rows.ndim == 2 else 0
    if rows_per < 1 or rows_per * rows.shape[-1] != int(np.prod(audio_shape)):
        raise ConfigError(f"feature rows {list(rows.shape)} do not make the model's audio input {list(audio_shape)}")
    audio = np.stack([window(rows, i, padding=padding, count=rows_per, before=rows_per // 2).reshape(audio_shape) for i in idx])
    return FrameData(idx, faces(idx), audio.astype(np.float32), str(path))


# --------------------------------------------------------------------------- measuring


def face_psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """Mean per-frame PSNR (dB) of uint8 faces ``[N, H, W, 3]`` (identical frames count as 100 dB)."""
    ref = reference.astype(np.float64)
    diff = ref - test.astype(np.float64)
    mse = np.mean(diff.reshape(len(ref), -1) ** 2, axis=1)
    vals = np.where(mse > 0, 10.0 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), PSNR_CAP)
    return float(np.mean(np.minimum(vals, PSNR_CAP)))


def render_faces(run: Callable[[dict[str, np.ndarray]], np.ndarray], names: tuple[str, str], data: FrameData,
                 batch: int = 4) -> np.ndarray:  # fmt: skip
    """uint8 faces a model draws for ``data`` (``run`` maps feeds to the output array)."""
    from avatar import vision

    out = []
    for s in range(0, len(data.indices), batch):
        sl = slice(s, s + batch)
        out.append(vision.output_to_uint8(run({names[0]: data.visual(sl), names[1]: data.audio[sl]})))
    return np.concatenate(out)


def measure(model: Path, reference_model: Path, data: FrameData, *, precision: str, device: str, backend: str,
            run: Callable[[dict[str, np.ndarray]], np.ndarray], reference_run: Callable[[dict[str, np.ndarray]], np.ndarray],
            names: tuple[str, str], runtime: str = "", notes: dict[str, Any] | None = None) -> GateRecord:  # fmt: skip
    """Measure one gate: the candidate's faces against the fp32 reference's and against the real faces."""
    from avatar.bench import cpu_model

    ref = render_faces(reference_run, names, data)
    got = render_faces(run, names, data)
    vs32, vs_real, base = face_psnr(ref, got), face_psnr(data.faces, got), face_psnr(data.faces, ref)
    return GateRecord(
        model_sha256=model_sha256(model), precision=precision, device=device, backend=backend,
        psnr_vs_fp32=round(vs32, 3), psnr_vs_real=round(vs_real, 4), fp32_vs_real=round(base, 4),
        frames=[data.indices[0], data.indices[-1]], data=data.source, passed=judge(vs32, base - vs_real),
        runtime=runtime, cpu=f"{cpu_model()} ({platform.machine()})",
        measured=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        reference_sha256=model_sha256(reference_model), notes=dict(notes or {}),
    )  # fmt: skip
