"""``avatar import synctalk|spec SRC -o DST``: build an avatar package."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click

# the names of avatar.vision.INTERPOLATIONS, spelled out so that `avatar --help`
# does not import OpenCV (tests/test_importers.py checks they agree)
INTERPOLATION_NAMES = ("area", "cubic", "lanczos", "linear", "nearest")
DEFAULT_INTERPOLATION = "cubic"


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every importer."""
    options = [
        click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path)),
        click.option("-o", "--output", "dst", required=True, type=click.Path(path_type=Path),
                     help="Package directory to create."),
        click.option("--name", help="Avatar name (default: the source folder's name)."),
        click.option("--limit", type=click.IntRange(min=1), help="Import only the first N frames."),
        click.option("--interpolation", type=click.Choice(INTERPOLATION_NAMES), default=DEFAULT_INTERPOLATION,
                     show_default=True, help="Resize used for the 328 crop (upstream inference: cubic)."),
        click.option("--crf", type=click.IntRange(0, 51), default=14, show_default=True,
                     help="H.264 quality of frames.mp4 (0 = lossless)."),
        click.option("--preset", default="veryfast", show_default=True, help="x264 preset (speed of the import)."),
        click.option("--gop", type=click.IntRange(min=1), default=12, show_default=True,
                     help="Keyframe interval: smaller = cheaper random access, bigger file."),
        click.option("--frames-codec", type=click.Choice(["h264", "ffv1"]), default="h264", show_default=True,
                     help="How the background frames are stored: h264 (small, lossy; --crf) or ffv1 (lossless, "
                          "about 9x bigger, slower to decode). The model's face inputs are exact either way."),
        click.option("--force", is_flag=True,
                     help="Replace DST if it is an existing avatar package (nothing else is ever replaced)."),
        click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="UNet-328 ONNX model to package with the avatar."),
        click.option("--ave-encoder", "audio_encoder", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="AVE audio-encoder ONNX to package with the avatar."),
        click.option("--padding", type=click.Choice(["replicate", "zero"]),
                     help="Audio window edge padding the packaged model was trained with."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _summary(dst: Path) -> None:
    from ..package import AvatarPackage

    with AvatarPackage.open(dst) as pkg:
        side = pkg.boxes[:, 2] - pkg.boxes[:, 0]
        click.echo(f"avatar package: {pkg.path}")
        click.echo(f"name:           {pkg.name}")
        click.echo(f"frames:         {pkg.frame_count} ({pkg.frame_count / pkg.fps:.1f} s)")
        click.echo(f"size:           {pkg.width}x{pkg.height}")
        click.echo(f"fps:            {pkg.fps:g}")
        click.echo(f"boxes:          {int(side.min())}-{int(side.max())} px square")
        click.echo(f"crop resize:    {pkg.crop_interpolation}")
        video = pkg.manifest.video
        click.echo(f"frames stored:  {video.get('codec', 'h264')} ({'lossless' if pkg.frames_lossless else 'lossy'})")
        if pkg.manifest.model:
            click.echo(f"model:          {pkg.manifest.model} ({pkg.manifest.feature_type})")
        if pkg.manifest.audio_features:
            click.echo(f"audio features: {pkg.manifest.audio_features}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd, Docker, Kubernetes) handled like Ctrl-C: partial files are removed on the way out."""

    signum = signal.SIGTERM  # the exit status is the shell's for it, 143, as a render's


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding application): leave its handling alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group("import")
def import_() -> None:
    """Build an avatar package from a SyncTalk_2D dataset or the specification's layout."""


@import_.command("synctalk")
@_common
@click.option("--fps", type=float, default=25.0, show_default=True, help="Frame rate of the image sequence.")
def synctalk(src: Path, dst: Path, name: str | None, limit: int | None, interpolation: str, crf: int,
             preset: str, gop: int, frames_codec: str, force: bool, model: Path | None, audio_encoder: Path | None,
             padding: str | None, fps: float) -> None:
    """Import SRC/full_body_img/*.jpg + SRC/landmarks/*.lms (+ aud_ave.npy)."""
    from ..importers import import_synctalk

    with _sigterm_as_interrupt():
        import_synctalk(src, dst, fps=fps, name=name, limit=limit, crop_interpolation=interpolation, crf=crf,
                        preset=preset, gop=gop, frames_codec=frames_codec, overwrite=force, model=model,
                        audio_encoder=audio_encoder, padding=padding)
    _summary(dst)


@import_.command("spec")
@_common
@click.option("--fps", type=float, default=None, help="Override the frame rate (default: the video's).")
@click.option("--no-rois", is_flag=True, help="Compute faces with the crop rule instead of using rois_320_video.mp4.")
def spec(src: Path, dst: Path, name: str | None, limit: int | None, interpolation: str, crf: int,
         preset: str, gop: int, frames_codec: str, force: bool, model: Path | None, audio_encoder: Path | None,
         padding: str | None, fps: float | None, no_rois: bool) -> None:
    """Import SRC/full_body_video.mp4 + roi_bounds.npy or crop_rectangles.json (+ rois_320_video.mp4, aud_ave.npy)."""
    from ..importers import import_spec

    with _sigterm_as_interrupt():
        import_spec(src, dst, fps=fps, name=name, limit=limit, rois=not no_rois, crop_interpolation=interpolation,
                    crf=crf, preset=preset, gop=gop, frames_codec=frames_codec, overwrite=force, model=model,
                    audio_encoder=audio_encoder, padding=padding)
    _summary(dst)
