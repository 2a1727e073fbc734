"""``avatar demo``: a complete render on any machine, with nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("demo")
@click.option("-o", "--output", default="avatar-demo.mp4", show_default=True, type=click.Path(dir_okay=False), help="Where to write the video.")
@click.option("--workdir", default=".avatar-demo", show_default=True, type=click.Path(file_okay=False), help="Where the demo avatar and models are built (reused next time).")
@click.option("--audio", type=click.Path(dir_okay=False, exists=True), help="Your own speech instead of the synthetic audio.")
@click.option("--seconds", default=6.0, show_default=True, type=click.FloatRange(min=0.2, max=600), help="Length of the synthetic audio.")
@click.option("--tiny", is_flag=True, help="The untrained tiny test model (fastest; no mouth).")
@click.option("--untrained", is_flag=True, help="The untrained seeded full-size UNet-328 (the real model's cost; no mouth).")
@click.option("--backend", default="auto", show_default=True, help="auto, cpu, onnx-cuda, openvino, tensorrt, or a plugin's.")
@click.option("--batch", "batch_size", default=8, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on a terminal.")
def demo(output: str, workdir: str, audio: str | None, seconds: float, tiny: bool, untrained: bool, backend: str,
         batch_size: int, progress: bool) -> None:
    """Build a synthetic avatar locally and render a clip with sound through the real pipeline.

    The model is the shipped demo model: a quarter-width UNet-328 trained with
    `avatar train` on this cartoon head talking, so the mouth opens with speech and
    closes in silence. For your own face: `avatar prepare` + `avatar train` (docs/prepare-and-train.md).
    """
    from ..demo import build_demo, describe_model
    from ..render import render

    click.echo("building the demo avatar ...", err=True)
    paths = build_demo(workdir, seconds=seconds, tiny=tiny, trained=not untrained)
    click.echo(f"model: {describe_model(paths['kind'])}", err=True)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    report = render(
        paths["avatar"],
        audio or paths["audio"],
        sinks=[("file", {"path": output})],
        model=paths["model"],
        features="ave",
        feature_options={"encoder": str(paths["encoder"])},
        backend=backend,
        batch_size=batch_size,
        progress=progress,
    )
    d = report.to_dict()
    click.echo(
        f"rendered {d['frames']} frames ({d['video_s']:.1f} s) at {d['frames_per_s']:.1f} fps on backend "
        f"{d['backend']}",
        err=True,
    )
    click.echo(str(Path(output)))
