"""``avatar make-test-model``: a seeded, untrained model for tests, demos and benchmarks."""

from __future__ import annotations

import click

from ..errors import ConfigError, ModelError


def _names(value: str | None, n: int, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    names = tuple(s.strip() for s in value.split(","))
    if len(names) != n:
        raise ConfigError(f"--names needs {n} comma-separated names ({','.join(default)}), got '{value}'")
    return names


@click.command("make-test-model")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write.")
@click.option("--kind", type=click.Choice(["unet", "audio-encoder"]), default="unet", show_default=True,
              help="The UNet-328 or the AVE audio encoder (mel [B,1,80,16] -> feature [B,512]).")  # fmt: skip
@click.option("--mode", type=click.Choice(["ave", "hubert", "wenet"]), default="ave", show_default=True,
              help="Audio feature type of the UNet (sets the audio input shape).")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same model.")
@click.option("--tiny", is_flag=True, help="A much cheaper network with the same inputs and outputs (fast tests).")
@click.option("--names", default=None,
              help="Tensor names, comma-separated: visual,audio,output for a UNet (default input,audio,output); "
                   "input,output for the encoder (default mel,feature).")  # fmt: skip
@click.option("--uint8-visual", is_flag=True, help="UNet visual input as uint8 [0,255], normalised inside the graph.")
def make_test_model(output: str, kind: str, mode: str, seed: int, tiny: bool, names: str | None, uint8_visual: bool) -> None:
    """Write a seeded test model (random weights, calibrated BatchNorm) and check that its inputs matter.

    The model has the real architecture and I/O contract but is untrained: its
    output is structured noise, never a face. No PyTorch needed.
    """
    from pathlib import Path

    from ..contract import read_contract
    from ..models import synthetic

    if kind == "unet":
        tensor_names = _names(names, 3, synthetic.DEFAULT_NAMES)
        path = synthetic.make_unet(output, mode=mode, seed=seed, names=tensor_names, uint8_visual=uint8_visual,  # type: ignore[arg-type]
                                   tiny=tiny)  # fmt: skip
        c = read_contract(path)  # the file must pass the same check every consumer runs
        if c.feature_type != mode or not c.dynamic_batch:
            raise ModelError(f"internal error: {path} reads back as {c.feature_type}, dynamic batch {c.dynamic_batch}")
        described = f"{c.visual}, {c.audio} -> {c.output}"
    else:
        if uint8_visual:
            raise ConfigError("--uint8-visual applies to --kind unet only; the audio encoder has no visual input")
        tensor_names = _names(names, 2, synthetic.ENCODER_NAMES)
        path = synthetic.make_audio_encoder(output, seed=seed, tiny=tiny, names=tensor_names)  # type: ignore[arg-type]
        described = f"{tensor_names[0]} float32[batch,1,80,16] -> {tensor_names[1]} float32[batch,512]"

    size = Path(path).stat().st_size
    click.echo(f"wrote {path} ({size / 1e6:.1f} MB)")
    click.echo(f"  kind:   {kind}{' (tiny)' if tiny else ''}, seed {seed}, untrained")
    if kind == "unet":
        click.echo(f"  mode:   {mode} (audio window {synthetic.AUDIO_SHAPES[mode]})")
    click.echo(f"  tensors: {described}")
    s = synthetic.check_sensitivity(path)
    parts = [f"audio change moves the output by {s.audio:.2e} (mean abs)"]
    if s.visual is not None:
        parts.append(f"visual change by {s.visual:.2e}")
    verdict = "ok" if s.ok else f"FAILED (needs > {synthetic.MIN_SENSITIVITY:g})"
    click.echo(f"  check:  {', '.join(parts)}; output range [{s.output_min:.3f}, {s.output_max:.3f}]: {verdict}")
    if not s.ok:
        raise ModelError(f"{path}: the output does not depend on its inputs enough; report this as a bug")
