"""``avatar inspect MODEL``: the model contract, without running the model."""

from __future__ import annotations

import json

import click

from ..contract import read_contract


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model: str, as_json: bool) -> None:
    """Show a UNet-328 ONNX model's inputs, outputs and feature type."""
    c = read_contract(model)
    if as_json:
        click.echo(json.dumps(c.describe(), indent=2))
        return
    click.echo(f"model:         {c.path}")
    click.echo(f"feature type:  {c.feature_type} (audio window {c.audio_window_shape})")
    click.echo(f"visual input:  {c.visual}" + ("  (uint8, normalised in the graph)" if c.visual_uint8 else ""))
    click.echo(f"audio input:   {c.audio}")
    click.echo(f"output:        {c.output}")
    click.echo(f"batch:         {'dynamic' if c.dynamic_batch else c.fixed_batch}")
    click.echo(f"opset:         {c.opset}")
