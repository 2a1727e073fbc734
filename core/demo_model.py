"""How the demo's trained model was made: ``python -m avatar.demo_model WORKDIR``.

1. a synthetic recording: the demo's drawn head, 30 s, whose mouth opening
   follows the loudness of the speech-like audio it is recorded with
   (:func:`avatar.demo.mouth_opening`), written as an avatar package with its
   ``audio.wav`` (what ``avatar prepare`` makes from a real video);
2. ``avatar train`` on it: the quarter-width UNet-328 (``--tiny``), AVE
   features from the demo's seeded tiny audio encoder, fixed seed and a fixed
   number of steps;
3. the exported ONNX model and the encoder are copied to
   ``avatar/models/demo/`` (package data), where ``avatar demo`` and
   ``avatar serve --demo`` find them. No PyTorch is needed to use them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

#: the committed model, its encoder and its training record (package data)
DEMO_DIR = Path(__file__).parent / "models" / "demo"
MODEL = DEMO_DIR / "unet_demo.onnx"
ENCODER = DEMO_DIR / "ave_encoder_demo.onnx"
RECORD = DEMO_DIR / "unet_demo.json"
SECONDS = 30.0
#: the training arguments (after AVATAR_DIR -o MODEL), fixed so a rerun reproduces the model
TRAIN_ARGS = ["--tiny", "--steps", "400", "--batch", "4", "--lr", "2e-3", "--mouth-weight", "4",
              "--eval-every", "50", "--checkpoint-every", "50", "--seed", "0"]


def available() -> bool:
    return MODEL.is_file() and ENCODER.is_file()


def build_recording(workdir: str | Path, seconds: float = SECONDS, seed: int = 1) -> Path:
    """The synthetic talking recording as an avatar package with ``audio.wav``; returns its path."""
    from .demo import mouth_opening, speechlike_audio, synthetic_frames, write_wav
    from .package import write_package

    workdir = Path(workdir)
    pcm = speechlike_audio(seconds, seed=seed)
    n = int(seconds * 25)
    frames, boxes = synthetic_frames(n, seed=0, mouth=mouth_opening(pcm, n))
    pkg = write_package(workdir / "recording", iter(frames), boxes, fps=25, name="demo recording (synthetic)",
                        source={"importer": "demo_model", "audio": "audio.wav", "seconds": seconds, "seed": seed},
                        overwrite=True)
    write_wav(pkg / "audio.wav", pcm)
    return pkg


def main(argv: list[str] | None = None) -> None:
    from .cli import main as cli_main
    from .models.synthetic import make_audio_encoder

    args = list(sys.argv[1:] if argv is None else argv)
    workdir = Path(args[0] if args else ".avatar-demo-model")
    extra = args[1:]
    workdir.mkdir(parents=True, exist_ok=True)
    encoder = make_audio_encoder(workdir / "ave_encoder_demo.onnx", seed=0, tiny=True)
    pkg = build_recording(workdir)
    model = workdir / "unet_demo.onnx"
    try:
        cli_main(["train", str(pkg), "-o", str(model), "--ave-encoder", str(encoder), *TRAIN_ARGS, *extra])
    except SystemExit as exc:
        if exc.code:
            raise
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, MODEL)
    shutil.copyfile(encoder, ENCODER)
    shutil.copyfile(model.with_suffix(".json"), RECORD)
    sys.stdout.write(f"demo model written to {MODEL}\n")


if __name__ == "__main__":
    main()
