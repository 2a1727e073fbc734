"""``avatar convert MODEL -o OUT [--uint8-visual] [--fp16]``: graph options for faster inference."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from ..errors import ConfigError


@click.command("convert")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Where to write the converted model.")
@click.option("--uint8-visual", is_flag=True, help="Take the visual input as uint8 [0,255]; the graph divides by 255 on the device.")
@click.option("--fp16", is_flag=True, help="Store weights and compute in float16; inputs and outputs stay float32.")
def convert(model: str, output: str, uint8_visual: bool, fp16: bool) -> None:
    """Write a copy of MODEL with on-device normalisation and/or float16 weights.

    Backends can also do this on the fly (precision fp16, extra uint8_visual)
    and cache the result; this command makes the file explicit, e.g. to ship it.
    """
    from ..models.graph import to_fp16, with_uint8_visual

    if not (uint8_visual or fp16):
        raise ConfigError("nothing to do: pass --uint8-visual, --fp16 or both")
    src, dst = Path(model), Path(output)
    if dst.resolve() == src.resolve():
        raise ConfigError("the output must be a different file from the model")
    with tempfile.TemporaryDirectory(prefix="avatar-convert-") as tmp:
        # the last step writes the output itself, so external weights (models over 2 GB) keep their name
        cur = src
        if uint8_visual:
            cur = with_uint8_visual(cur, dst if not fp16 else Path(tmp) / "u8.onnx")
        if fp16:
            to_fp16(cur, dst, keep_io_types=True)
    done = ", ".join(s for s, on in (("uint8 visual input", uint8_visual), ("float16", fp16)) if on)
    click.echo(f"wrote {dst} ({done})")
