"""``avatar train AVATAR_DIR -o MODEL.onnx`` (the [train] extra: PyTorch)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

FEATURES = ("ave", "npy", "hubert", "wenet")


def _options(pairs: tuple[str, ...]) -> dict[str, Any]:
    from avatar.errors import ConfigError

    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ConfigError(f"--feature-opt takes KEY=VALUE, not {p!r}")
        out[key] = value
    return out


@click.command("train")
@click.argument("avatar_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The ONNX model to write.")
@click.option("--features", type=click.Choice(FEATURES), default="ave", show_default=True,
              help="Audio features: ave (with --ave-encoder), npy (precomputed AVE rows, --features-file), hubert, wenet.")
@click.option("--ave-encoder", type=click.Path(exists=True, dir_okay=False), help="AVE audio encoder ONNX (--features ave).")
@click.option("--features-file", type=click.Path(exists=True, dir_okay=False), help="[N,512] AVE rows .npy (--features npy).")
@click.option("--feature-opt", "feature_opts", multiple=True, help="KEY=VALUE option of the feature source (repeatable; "
              "e.g. model_dir=... for hubert, model=... for wenet, padding=zero).")
@click.option("--steps", default=20000, show_default=True, type=click.IntRange(min=1), help="Training steps (batches).")
@click.option("--minutes", type=click.FloatRange(min=0.05), help="Stop after this much training time (then export).")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--anneal", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="Over this last fraction of the run (steps or --minutes) the learning rate falls (cosine) to 5 %.")
@click.option("--mouth-weight", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="Extra L1 weight on the mouth box of the face.")
@click.option("--syncnet-weight", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Train a SyncNet (positive and shifted negative pairs) and add its loss with this weight; 0 = off.")
@click.option("--vgg-weights", type=click.Path(exists=True, dir_okay=False),
              help="VGG19 weights (torchvision's vgg19 state dict, your own file): adds the perceptual loss.")
@click.option("--perceptual-weight", default=0.01, show_default=True, type=click.FloatRange(min=0),
              help="Weight of the perceptual loss (VGG19 conv3_3 features, MSE) when --vgg-weights is given.")
@click.option("--tiny", is_flag=True, help="A quarter-width UNet-328 (1/16 of the compute; the demo's model).")
@click.option("--holdout", default=0.05, show_default=True, type=click.FloatRange(0, 0.5, min_open=True),
              help="Fraction of frames (the last ones) held out for validation, never trained on.")
@click.option("--holdout-start", type=click.IntRange(min=1), help="Hold out the frames from this index on instead.")
@click.option("--frames", type=click.IntRange(min=2), help="Use only the first N frames (quick trials).")
@click.option("--allow-short", is_flag=True, help="Train on a recording under 30 s (tests, smoke runs).")
@click.option("--seed", default=0, show_default=True)
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where checkpoints go (default: MODEL.ckpt/ beside the output).")
@click.option("--checkpoint-every", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--eval-every", default=250, show_default=True, type=click.IntRange(min=1),
              help="Held-out PSNR every N steps.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint (same settings; --steps may grow).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
@click.option("--no-install", is_flag=True, help="Do not write the model into the avatar package.")
def train(avatar_dir: Path, output: Path, features: str, ave_encoder: str | None, features_file: str | None,
          feature_opts: tuple[str, ...], steps: int, minutes: float | None, batch: int, lr: float, anneal: float,
          mouth_weight: float, syncnet_weight: float, vgg_weights: str | None, perceptual_weight: float, tiny: bool,
          holdout: float, holdout_start: int | None, frames: int | None,
          allow_short: bool, seed: int, checkpoint_dir: Path | None, checkpoint_every: int, eval_every: int,
          resume: bool, device: str, no_install: bool) -> None:
    """Train a UNet-328 for the avatar in AVATAR_DIR (made by `avatar prepare`) and export it to ONNX.

    Input = [a random other frame's face, the masked face], target = the frame's
    face, audio = the frame's window from the chosen feature source (the SDK's own,
    so training and rendering agree). The last frames are held out; their PSNR is
    shown while training and recorded at the end with the lip-sync signal. Ctrl-C
    saves a checkpoint and exits 130; --resume continues. The model is written into
    the package, so `avatar run --avatar AVATAR_DIR --audio speech.wav -o out.mp4` works.
    """
    from avatar.errors import ConfigError

    from .checkpoints import require_torch

    require_torch("avatar train")
    from .training import TrainConfig, train_avatar

    options = _options(feature_opts)
    if features == "ave":
        if ave_encoder is None and "encoder" not in options:
            raise ConfigError("--features ave needs --ave-encoder ENCODER.onnx (or --features npy with precomputed rows)")
        if ave_encoder:
            options["encoder"] = ave_encoder
    elif features == "npy":
        if features_file is None:
            raise ConfigError("--features npy needs --features-file ROWS.npy ([N,512] AVE rows)")
        options["path"] = features_file
    config = TrainConfig(steps=steps, batch=batch, lr=lr, anneal=anneal, mouth_weight=mouth_weight, syncnet_weight=syncnet_weight,
                         perceptual_weight=perceptual_weight if vgg_weights else 0.0, vgg_weights=vgg_weights,
                         tiny=tiny, seed=seed, checkpoint_every=checkpoint_every, eval_every=eval_every,
                         minutes=minutes, device=device)
    tty = sys.stderr.isatty()
    last = {"psnr": None}

    def progress(p: Any) -> None:
        if p.psnr is not None:
            last["psnr"] = p.psnr
        psnr = f"{last['psnr']:.2f} dB" if last["psnr"] is not None else "-"
        width = 24
        done = int(width * p.step / max(p.steps, 1))
        line = (f"[{'#' * done}{'.' * (width - done)}] step {p.step}/{p.steps}  loss {p.loss:.4f}  "
                f"held-out PSNR {psnr}  {p.seconds / max(p.step, 1):.2f} s/step")
        if tty:
            click.echo("\r" + line, nl=False, err=True)
        elif p.psnr is not None or p.step == 1:
            click.echo(line, err=True)

    try:
        record = train_avatar(avatar_dir, output, features=features, feature_options=options, config=config,
                              checkpoint_dir=checkpoint_dir, resume=resume, holdout=holdout, holdout_start=holdout_start,
                              frames=frames, allow_short=allow_short, install=not no_install, on_progress=progress)
    finally:
        if tty:
            click.echo("", err=True)
    g = record["gate"]
    click.echo(f"held-out frames {g['held_out_frames'][0]}-{g['held_out_frames'][1]}: face {g['face_psnr_db']:.2f} dB, "
               f"mouth {g['mouth_psnr_db']:.2f} dB (audio 1 s off: {g['mouth_psnr_shifted_db']:.2f} dB, "
               f"lip-sync signal {g['lip_sync_db']:+.2f} dB)", err=True)
    if not no_install:
        click.echo(f"the model is in {avatar_dir}: avatar run --avatar {avatar_dir} --audio speech.wav -o out.mp4", err=True)
    click.echo(str(output))
