"""``avatar prepare VIDEO -o DIR``: an avatar package (and a training recording) from a raw video."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("prepare")
@click.argument("video", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path), help="Avatar package directory to create.")
@click.option("--fps", default=25.0, show_default=True, type=click.FloatRange(min=1, max=120),
              help="Frame rate of the avatar (25 for AVE/HuBERT models, 20 for WeNet); the video is resampled to it.")
@click.option("--name", help="Avatar name (default: the video's file name).")
@click.option("--allow-short", is_flag=True, help="Accept a recording under 30 s (renders and tests; too short to train well).")
@click.option("--synctalk", "synctalk_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write SyncTalk_2D's dataset layout (full_body_img/, landmarks/, aud.wav) to this folder.")
@click.option("--frames-codec", type=click.Choice(["h264", "ffv1"]), default="h264", show_default=True,
              help="How the background frames are stored (see docs/avatar-package.md).")
@click.option("--force", is_flag=True, help="Replace DST if it is an existing avatar package.")
def prepare(video: Path, dst: Path, fps: float, name: str | None, allow_short: bool, synctalk_dir: Path | None,
            frames_codec: str, force: bool) -> None:
    """Find the face in every frame of VIDEO, smooth the crop boxes and write an avatar package.

    Needs the [prepare] extra (MediaPipe's face mesh, whose weights ship in its wheel).
    Checks (each one clear error, before the long pass): the file reads, it has a
    sound track that is not silent, it is at least 30 s long (a warning under 3 minutes),
    exactly one face of a usable size. Frames where the box jumps are listed and left
    out of training. Then: `avatar train DIR -o model.onnx`.
    """
    from ..prepare import prepare as run

    state = {"shown": -1}

    def progress(i: int, n: int) -> None:
        pct = 100 * i // max(n, 1)
        if pct // 10 != state["shown"] // 10:
            state["shown"] = pct
            click.echo(f"  faces: {i}/{n} frames ({pct}%)", err=True)

    summary = run(video, dst, fps=fps, name=name, allow_short=allow_short, synctalk_dir=synctalk_dir,
                  overwrite=force, frames_codec=frames_codec, progress=progress)
    click.echo(f"prepared {summary['frames']} frames ({summary['duration_s']:.1f} s); "
               f"{len(summary['excluded_frames'])} left out of training", err=True)
    click.echo(str(summary["package"]))
