"""The PyTorch reference plugin: ``avatar export unet``, ``avatar export audio-encoder``, ``avatar train``.

It turns SyncTalk_2D checkpoints (``.pth`` state dicts) into the ONNX models the
rest of the SDK runs, and proves each export with a parity check against
PyTorch. It registers commands only (no feature source, backend or sink).

Importing this module never imports torch: the networks
(:mod:`.networks`), checkpoint loading (:mod:`.checkpoints`) and the exporter
(:mod:`.export`) load when a command runs, and a missing torch becomes one
line that says ``pip install 'avatar-sdk[torch]'``.
"""

from __future__ import annotations

from typing import Any

import click

from avatar.errors import ModelError
from avatar.hookspecs import hookimpl

MODES = ("ave", "hubert", "wenet")


def _report(result: Any) -> None:
    """Print the parity line; a failed check is an error (exit 1), the file stays for inspection."""
    click.echo(str(result))
    if not result.ok:
        raise ModelError(
            f"{result.path} does not reproduce PyTorch (max abs diff {result.max_abs_diff:.1e} > "
            f"{result.tolerance:.0e}); do not use it - report the torch/onnxruntime versions, or "
            "raise --tolerance if the difference is acceptable"
        )


def _common(fn: Any) -> Any:
    fn = click.option("--tolerance", type=float, default=1e-4, show_default=True,
                      help="Largest acceptable |ONNX Runtime - PyTorch| on the parity inputs.")(fn)
    fn = click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True,
                      help="ONNX opset of the written model (17 or newer).")(fn)
    return fn


@click.group("export")
def export_group() -> None:
    """Export SyncTalk_2D PyTorch checkpoints to ONNX (needs torch)."""


@export_group.command("unet")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--mode", type=click.Choice(MODES), default="ave", show_default=True,
              help="Audio branch the checkpoint was trained with (AVE and HuBERT checkpoints look alike).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="model.onnx", show_default=True,
              help="ONNX file to write.")
@click.option("--names", default="input,audio,output", show_default=True,
              help="Visual input, audio input and output tensor names, comma-separated.")
@_common
def export_unet_cmd(checkpoint: str, mode: str, output: str, names: str, opset: int, tolerance: float) -> None:
    """Export a UNet-328 checkpoint (CHECKPOINT.pth, a state dict) to ONNX and check parity."""
    from .checkpoints import require_torch

    require_torch()
    from .export import export_unet

    result = export_unet(checkpoint, mode, output, opset=opset, names=names, tolerance=tolerance)
    click.echo(f"wrote {output} (UNet-328, mode {mode}, opset {opset}, dynamic batch)")
    _report(result)


@export_group.command("audio-encoder")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="ave_encoder.onnx", show_default=True,
              help="ONNX file to write.")
@click.option("--names", default="mel,feature", show_default=True,
              help="Mel input and feature output tensor names, comma-separated.")
@_common
def export_audio_encoder_cmd(checkpoint: str, output: str, names: str, opset: int, tolerance: float) -> None:
    """Export the AVE audio encoder (audio_visual_encoder.pth) to ONNX and check parity."""
    from .checkpoints import require_torch

    require_torch()
    from .export import export_audio_encoder

    result = export_audio_encoder(checkpoint, output, opset=opset, names=names, tolerance=tolerance)
    click.echo(f"wrote {output} (AVE audio encoder [B,1,80,16] -> [B,512], opset {opset}, dynamic batch)")
    _report(result)


@hookimpl
def register_commands(cli: click.Group) -> None:
    from .train_cmd import train

    cli.add_command(export_group)
    cli.add_command(train)
