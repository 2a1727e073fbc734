"""The fidelity gate of a trained model, and putting the model into its avatar package.

The gate runs the exported ONNX file itself (ONNX Runtime, the renders'
runtime) on the held-out frames: face PSNR against the real frames, and the
lip-sync signal — mouth-box PSNR with the true audio minus with the audio of
one second earlier (a model that ignores the audio scores 0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .. import vision
from ..errors import AvatarPackageError
from .data import MOUTH_COLS, MOUTH_ROWS, TrainData, face_psnr

RECORD = "training.json"


def _run(session: Any, names: tuple[str, str, str], faces: np.ndarray, windows: np.ndarray) -> np.ndarray:
    out = []
    for k in range(0, len(faces), 8):
        visual = vision.normalize(vision.visual_batch(np.asarray(faces[k:k + 8])))
        y = session.run([names[2]], {names[0]: visual, names[1]: windows[k:k + 8].astype(np.float32)})[0]
        out.append(vision.output_to_uint8(y))
    return np.concatenate(out)


def gate(model: str | Path, data: TrainData, fps: float) -> dict[str, Any]:
    """Held-out face PSNR and the lip-sync signal of the ONNX ``model``."""
    import onnxruntime as ort

    from ..contract import read_contract

    c = read_contract(model)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = (c.visual.name, c.audio.name, c.output.name)
    held = data.held_out
    real = np.asarray(data.faces[held])
    shift = int(round(fps))
    true = _run(session, names, real, data.windows[held])
    shifted = _run(session, names, real, data.windows[np.clip(held - shift, 0, None)])
    mouth = (MOUTH_ROWS, MOUTH_COLS)
    m_true, m_shift = face_psnr(true, real, mouth), face_psnr(shifted, real, mouth)
    return {
        "held_out_frames": [int(held[0]), int(held[-1])],
        "face_psnr_db": round(face_psnr(true, real), 3),
        "mouth_psnr_db": round(m_true, 3),
        "mouth_psnr_shifted_db": round(m_shift, 3),
        "lip_sync_db": round(m_true - m_shift, 3),
        "shift_frames": shift,
    }


def install_model(package_dir: str | Path, model: str | Path, *, feature_type: str, padding: str,
                  audio_encoder: str | Path | None, record: dict[str, Any]) -> Path:
    """Copy ``model`` (and the encoder) into the package and name them in ``avatar.json``.

    ``avatar run --avatar DIR`` then needs no ``--model``. The training record
    goes beside them as ``training.json``.
    """
    from ..manifest import check_manifest
    from ..package import _atomic_write_text

    root = Path(package_dir)
    manifest = root / "avatar.json"
    try:
        d = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise AvatarPackageError(f"cannot update {manifest}: {exc}") from None
    shutil.copyfile(model, root / "unet.onnx")
    entry: dict[str, Any] = {"file": "unet.onnx", "feature_type": feature_type, "padding": padding, "audio_encoder": None}
    if audio_encoder is not None:
        if Path(audio_encoder).resolve() != (root / "ave_encoder.onnx").resolve():
            shutil.copyfile(audio_encoder, root / "ave_encoder.onnx")
        entry["audio_encoder"] = "ave_encoder.onnx"
    d["model"] = entry
    check_manifest(d, manifest)
    _atomic_write_text(root / RECORD, json.dumps(record, indent=2) + "\n")
    _atomic_write_text(manifest, json.dumps(d, indent=2) + "\n")
    return root / "unet.onnx"
