"""``avatar bench``: compare backends on one model — model-only, end to end, and against the upstream-style loop."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError


def _ints(value: str | None, what: str) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} takes comma-separated integers like 1,4,16; got {value!r}") from None
    if not out:
        raise ConfigError(f"{what} is empty; give e.g. 1,4,16")
    return out


@click.command("bench")
@click.option("--mode", type=click.Choice(["model", "e2e", "all"]), default="all", show_default=True,
              help="model: inference calls only; e2e: real renders and the upstream-style baseline; all: both.")
@click.option("--backends", help="Comma-separated backends, optionally at a precision: cpu,openvino,openvino:bf16,openvino:int8 (default: every usable one).")
@click.option("--batch-sizes", help="Model-only batch sizes (default: 1,4,16; 1,4,16,64 when a GPU backend is measured).")
@click.option("--e2e-batch-sizes", help="End-to-end batch sizes (default: --batch-sizes).")
@click.option("--repeats", default=5, show_default=True, help="Least number of timed calls per model-only cell.")
@click.option("--warmup", default=2, show_default=True, help="Untimed calls before each model-only cell.")
@click.option("--cell-seconds", default=5.0, show_default=True, help="Time budget per model-only cell (timed calls continue until spent).")
@click.option("--seconds", default=10.0, show_default=True, help="Seconds of speech rendered end to end.")
@click.option("--model", type=click.Path(dir_okay=False, exists=True), help="UNet-328 ONNX (default: a seeded full-size test model, built once into the cache).")
@click.option("--int8-model", type=click.Path(dir_okay=False, exists=True), help="The int8 model NAME:int8 backends run (from `avatar quantize`).")
@click.option("--tiny", is_flag=True, help="Use tiny seeded test models (smoke tests; not representative).")
@click.option("--avatar", type=click.Path(file_okay=False, exists=True),
              help="Avatar package or SyncTalk_2D folder (default: the real sanders data if present, else a synthetic avatar).")
@click.option("--avatar-frames", default=100, show_default=True, help="Frames imported from a SyncTalk_2D folder.")
@click.option("--audio", type=click.Path(dir_okay=False, exists=True), help="Speech file (default: the real clip if present, else synthetic).")
@click.option("--baseline", type=click.Choice(["auto", "torch", "onnxruntime", "none"]), default="auto", show_default=True,
              help="Engine of the upstream-style baseline (auto: PyTorch eager when possible).")
@click.option("--baseline-frames", type=int, help="Frames the baseline renders (default: as many as the end-to-end render).")
@click.option("--threads", type=int, help="CPU threads for ONNX Runtime / PyTorch (default: all cores).")
@click.option("--device-id", default=0, show_default=True, help="GPU index for GPU backends.")
@click.option("--isolate/--no-isolate", default=True, show_default=True, help="Measure each backend in a fresh process (clean peak memory).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where test models and imported avatars are cached.")
@click.option("--out", "out_dir", default="benchmarks/results", show_default=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--name", help="Results file stem (default: derived from the machine, e.g. cpu-2core-intel-xeon).")
def bench(
    mode: str,
    backends: str | None,
    batch_sizes: str | None,
    e2e_batch_sizes: str | None,
    repeats: int,
    warmup: int,
    cell_seconds: float,
    seconds: float,
    model: str | None,
    int8_model: str | None,
    tiny: bool,
    avatar: str | None,
    avatar_frames: int,
    audio: str | None,
    baseline: str,
    baseline_frames: int | None,
    threads: int | None,
    device_id: int,
    isolate: bool,
    cache_dir: str | None,
    out_dir: str,
    name: str | None,
) -> None:
    """Benchmark inference backends and the whole pipeline; write NAME.json, NAME.md and NAME.png.

    \b
    avatar bench                                   # every usable backend, defaults
    avatar bench --backends cpu --mode model --batch-sizes 1,4
    avatar bench --backends onnx-cuda,tensorrt --batch-sizes 1,4,16,64 --name gpu_h100
    """
    from ..bench import BenchConfig, run_bench, write_reports

    cfg = BenchConfig(
        mode=mode,
        backends=[b.strip() for b in backends.split(",") if b.strip()] if backends else None,
        batch_sizes=_ints(batch_sizes, "--batch-sizes"),
        e2e_batch_sizes=_ints(e2e_batch_sizes, "--e2e-batch-sizes"),
        repeats=repeats,
        warmup=warmup,
        cell_seconds=cell_seconds,
        seconds=seconds,
        model=Path(model) if model else None,
        int8_model=Path(int8_model) if int8_model else None,
        tiny=tiny,
        avatar=Path(avatar) if avatar else None,
        avatar_frames=avatar_frames,
        audio=Path(audio) if audio else None,
        baseline=baseline,
        baseline_frames=baseline_frames,
        threads=threads,
        device_id=device_id,
        isolate=isolate,
        cache_dir=Path(cache_dir) if cache_dir else None,
    )
    result = run_bench(cfg, progress=lambda msg: click.echo(f"· {msg}", err=True))
    paths = write_reports(result, out_dir, name)
    click.echo(_summary(result))
    for kind, p in paths.items():
        click.echo(f"{kind}: {p}")


def _summary(result: dict) -> str:
    """A short plain-text table for the terminal (the Markdown report has everything)."""
    lines = [f"hardware: {result['hardware']}"]
    checks = {c["backend"]: c for c in result.get("crosscheck") or []}
    for c in result.get("model_only") or []:
        chk = checks.get(c["backend"])
        agree = ""
        if chk:
            agree = "  vs cpu: identical" if chk["identical"] else f"  vs cpu: max|d| {chk['max_abs']:.2e}, {chk['psnr_db']:.1f} dB"
        lines.append(
            f"model  {c['backend']:<10} batch {c['batch']:>3}: {c['fps']:7.1f} frames/s  "
            f"median {c['median_ms']:.1f} / p95 {c['p95_ms']:.1f} / p99 {c['p99_ms']:.1f} ms per call{agree}"
        )
    for r in (result.get("e2e") or {}).get("runs") or []:
        ratio = f", {r['e2e_over_model']:.2f} of model-only" if r.get("e2e_over_model") else ""
        speed = f", {r['speedup_vs_baseline']:.2f}x baseline" if r.get("speedup_vs_baseline") else ""
        lines.append(
            f"e2e    {r['backend']:<10} batch {r['batch_size']:>3}: {r['frames_per_s']:7.1f} frames/s, "
            f"{r['realtime_factor']:.2f}x real time{ratio}{speed}"
        )
    base = result.get("baseline")
    if base:
        lines.append(f"baseline ({base['engine']}): {base['frames_per_s']:.1f} frames/s over {base['frames']} frames")
    for k, v in (result.get("skipped") or {}).items():
        lines.append(f"not measured: {k}: {v}")
    return "\n".join(lines)
