"""``avatar run``: the main job — speech in, a lip-synced video out (file, live stream, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from ..interfaces import BackendOptions


#: backends whose model runs on the CPU (batching gains them nothing)
CPU_BACKENDS = ("cpu", "openvino")


def _kv(values: tuple[str, ...], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` items of a repeatable option → options (numbers and true/false typed)."""
    out: dict[str, Any] = {}
    for item in values:
        if "=" not in item:
            raise ConfigError(f"{option} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _coerce(v)
    return out


def _coerce(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


@click.command("run")
@click.option("--avatar", "avatar_dir", required=True, type=click.Path(file_okay=False), help="Avatar package directory (see `avatar import`).")
@click.option("--audio", required=True, type=click.Path(dir_okay=False), help="Speech: WAV, MP3, FLAC, M4A, ... any rate/channels.")
@click.option("--model", type=click.Path(dir_okay=False), help="UNet-328 ONNX model (default: the package's).")
@click.option("--features", default="ave", show_default=True, help="Feature source: ave, npy, hubert, wenet, or a plugin's.")
@click.option("--ave-encoder", type=click.Path(dir_okay=False), help="AVE audio-encoder ONNX (default: the package's).")
@click.option("--features-file", type=click.Path(dir_okay=False), help="Precomputed features .npy [N,512] for --features npy.")
@click.option("--hubert-model", type=click.Path(file_okay=False), help="Local HuBERT model directory for --features hubert.")
@click.option("--wenet-model", type=click.Path(dir_okay=False), help="WeNet encoder ONNX for --features wenet.")
@click.option("--padding", type=click.Choice(["replicate", "zero"]), help="Audio window edge padding (default: the source's).")
@click.option("--feature-opt", multiple=True, help="Extra feature-source option KEY=VALUE (e.g. for a plugin's source); repeatable.")
@click.option("--backend", default="auto", show_default=True, help="auto, cpu, onnx-cuda, openvino, tensorrt, or a plugin's.")
@click.option("--device-id", default=0, show_default=True, help="GPU index for GPU backends.")
@click.option("--fp16", is_flag=True, help="Half precision on GPU backends (same as --precision fp16).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8", "auto"]),
              help="Inference precision (bf16, int8, auto: openvino; reduced precisions are accuracy-gated).")
@click.option("--batch", "batch_size", type=click.IntRange(1), help="Frames per inference call (default 8; 1 for a real-time sink such as rtmp on a CPU backend, where a larger batch gains no speed and its wall time can outlast the stream's lag budget).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads of the model's backend and the ave encoder, exactly. Without it a thread budget sizes them for this machine (the model gets the cores, in two lanes where the backend can; the encoder and OpenCV one thread each; see docs/live.md).")
@click.option("--backend-opt", multiple=True, help="Backend option KEY=VALUE (e.g. cudnn_conv_algo_search=HEURISTIC, device=GPU, streams=2, allow_failed_gate=1, or a plugin backend's); repeatable.")
@click.option("--sink", "sink_names", multiple=True, default=["file"], show_default=True, help="Output sink(s): file, rtmp, callback or a plugin's; repeatable.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output file for the file sink.")
@click.option("--rtmp-url", envvar="AVATAR_RTMP_URL", show_envvar=True, help="rtmp://host/app/KEY for the rtmp sink (the key is never printed; a command line is visible in `ps`: prefer the environment variable or --rtmp-url-file).")
@click.option("--rtmp-url-file", type=click.Path(dir_okay=False), help="File whose first line is the RTMP URL, for the rtmp sink (keeps the key out of `ps` and shell history).")
@click.option("--sink-opt", multiple=True, help="Extra sink option KEY=VALUE for every sink, or SINK.KEY=VALUE for one (e.g. file.crf=18, rtmp.bitrate=2500k, rtmp.on_lag=stall); repeatable.")
@click.option("--memory-budget", "memory_budget_mb", default=1024, show_default=True, help="MB of decoded avatar frames kept in memory (a 720p frame costs 1.32 MB).")
@click.option("--frames", "frame_limit", type=click.IntRange(min=1), help="Stop after this many frames.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on a terminal.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the render report as JSON here (also when the run fails or is interrupted, with the error).")
@click.option("--output-rounding", type=click.Choice(["nearest", "truncate"]), default="nearest", show_default=True,
              help="Model output to pixels: nearest level, or truncate as the specification's (x*255).astype(uint8).")
@click.option("--walk-start", default=0, show_default=True, type=click.IntRange(min=0), help="Ping-pong walk position of the first frame (1: upstream SyncTalk_2D's start).")
def run(
    avatar_dir: str,
    audio: str,
    model: str | None,
    features: str,
    ave_encoder: str | None,
    features_file: str | None,
    hubert_model: str | None,
    wenet_model: str | None,
    padding: str | None,
    feature_opt: tuple[str, ...],
    backend: str,
    device_id: int,
    fp16: bool,
    precision: str | None,
    batch_size: int | None,
    threads: int | None,
    backend_opt: tuple[str, ...],
    sink_names: tuple[str, ...],
    output: str | None,
    rtmp_url: str | None,
    rtmp_url_file: str | None,
    sink_opt: tuple[str, ...],
    memory_budget_mb: float,
    frame_limit: int | None,
    progress: bool,
    walk_start: int,
    report_path: str | None,
    output_rounding: str,
) -> None:
    """Render AUDIO spoken by an avatar to one or more sinks.

    \b
    avatar run --avatar pkg/ --audio speech.wav -o out.mp4
    avatar run --avatar pkg/ --audio speech.wav --backend tensorrt --sink rtmp --rtmp-url rtmp://localhost/live/KEY
    """
    from ..render import render

    fopts: dict[str, Any] = {}
    if padding:
        fopts["padding"] = padding
    if features == "ave" and ave_encoder:
        fopts["encoder"] = ave_encoder
    if features == "ave" and threads:
        fopts["threads"] = threads
    if features == "npy":
        if not features_file:
            raise ConfigError("--features npy needs --features-file FEATURES.npy")
        fopts["path"] = features_file
    if features == "hubert":
        if not hubert_model:
            raise ConfigError("--features hubert needs --hubert-model DIR (a local HuBERT model directory)")
        fopts["model"] = hubert_model
    if features == "wenet":
        if not wenet_model:
            raise ConfigError("--features wenet needs --wenet-model ENCODER.onnx")
        fopts["model"] = wenet_model
    fopts.update(_kv(feature_opt, "--feature-opt"))

    if output and "file" not in sink_names:
        raise ConfigError("-o/--output is for the file sink; add --sink file to write a file too")
    extra = _kv(sink_opt, "--sink-opt")
    chosen = {n.replace("-", "_") for n in sink_names}
    stray = sorted({k.split(".", 1)[0] for k in extra if "." in k} - chosen)
    if stray:
        raise ConfigError(
            f"--sink-opt names sink(s) {', '.join(stray)} that are not in use (sinks: {', '.join(sink_names)})"
        )
    sinks: list[tuple[str, dict[str, Any]]] = []
    for name in dict.fromkeys(sink_names):
        # KEY=VALUE goes to every sink; SINK.KEY=VALUE only to that sink
        opts = {k: v for k, v in extra.items() if "." not in k}
        opts.update({k.split(".", 1)[1]: v for k, v in extra.items() if k.startswith(name.replace("-", "_") + ".")})
        if name == "file":
            if not output:
                raise ConfigError("the file sink needs -o/--output OUT.mp4")
            opts["path"] = output
        elif name == "rtmp":
            if rtmp_url and rtmp_url_file:
                raise ConfigError("give the RTMP URL once: --rtmp-url (or AVATAR_RTMP_URL) or --rtmp-url-file")
            if not (rtmp_url or rtmp_url_file):
                raise ConfigError(
                    "the rtmp sink needs its URL: --rtmp-url-file FILE, AVATAR_RTMP_URL=rtmp://host/app/KEY "
                    "or --rtmp-url rtmp://host/app/KEY"
                )
            opts.update({"url_file": rtmp_url_file} if rtmp_url_file else {"url": rtmp_url})
        elif name == "callback":
            raise ConfigError("the callback sink is for the Python API (avatar.render); use file or rtmp here")
        sinks.append((name, opts))

    if batch_size is None:  # a real-time stream on a CPU: frames one at a time (no burst outlasts the lag budget)
        batch_size = 1 if "rtmp" in sink_names and backend in CPU_BACKENDS else 8
    if fp16 and precision not in (None, "fp16"):
        raise ConfigError(f"--fp16 and --precision {precision} contradict each other; give one")
    bopts = BackendOptions(
        device_id=device_id, precision=precision or ("fp16" if fp16 else "fp32"), max_batch=max(batch_size, 1),
        threads=threads, extra=_kv(backend_opt, "--backend-opt"), precision_explicit=precision is not None or fp16,
    )
    try:
        report = render(
            avatar_dir,
            audio,
            sinks=sinks,
            model=model,
            features=features,
            feature_options=fopts,
            backend=backend,
            backend_options=bopts,
            batch_size=batch_size,
            threads=None if threads else "auto",  # --threads: exactly those; else the thread budget
            progress=progress,
            frame_limit=frame_limit,
            memory_budget_mb=memory_budget_mb,
            output_rounding=output_rounding,
            walk_start=walk_start,
        )
    except BaseException as exc:
        # a run that started carries its report (interrupted, or failed: disk full, stream lost)
        partial = getattr(exc, "report", None)
        if report_path and partial is not None:
            try:
                _write_report(report_path, partial.to_dict(), None if partial.interrupted else exc)
            except OSError as werr:  # the disk that failed the run may fail this too: keep the first error
                click.echo(f"warning: cannot write the report {report_path}: {werr.strerror or werr}", err=True)
        raise
    _summary(report, output, report_path)


def _write_report(path: str, d: dict[str, Any], exc: BaseException | None = None) -> None:
    # "error" is null for a run that finished or was interrupted ("interrupted": true says so)
    d["error"] = None if exc is None else f"{type(exc).__name__}: {exc}"
    Path(path).write_text(json.dumps(d, indent=2, default=str))


def _summary(report: Any, output: str | None, report_path: str | None) -> None:
    d = report.to_dict()
    click.echo(
        f"rendered {d['frames']} frames ({d['video_s']:.2f} s of video, audio {d['audio_s']:.2f} s) "
        f"in {d['wall_s']:.1f} s — {d['frames_per_s']:.1f} fps, {d['realtime_factor']:.2f}x real time "
        f"[backend {d['backend']}, features {d['feature_source']}, batch {d['batch_size']}]",
        err=True,
    )
    stages = ", ".join(f"{k} {v:.1f}" for k, v in d["stage_ms_per_frame"].items())
    click.echo(f"stage ms/frame: {stages}", err=True)
    for name, srep in d["sinks"].items():
        if srep.get("dropped") or srep.get("reconnects") or srep.get("stalled_s"):
            click.echo(
                f"{name}: dropped {srep['dropped']} frames, stalled {srep['stalled_s']:.1f} s, "
                f"{srep['reconnects']} reconnects, gap {srep['gap_s']:.1f} s",
                err=True,
            )
    if output:
        click.echo(output)
    if report_path:
        _write_report(report_path, d)
