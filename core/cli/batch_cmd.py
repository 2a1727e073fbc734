"""``avatar run-batch``: render many jobs, locally one after another or on a Ray cluster."""

from __future__ import annotations

import click


@click.command("run-batch")
@click.argument("jobs", type=click.Path(exists=True))
@click.option("-o", "--outdir", required=True, type=click.Path(file_okay=False), help="Where the videos and reports go.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="Render on Ray actors: the cluster at ADDRESS, or this machine's (`ray start`) when given alone.")
@click.option("--avatar", type=click.Path(exists=True, file_okay=False),
              help="The avatar for a folder of audio files (and the default of a jobs file).")
@click.option("--model", type=click.Path(dir_okay=False, exists=True), help="Default UNet-328 ONNX file (default: the package's).")
@click.option("--ave-encoder", type=click.Path(dir_okay=False, exists=True), help="Default audio encoder for the ave features.")
@click.option("--features", default="ave", show_default=True, help="Default feature source.")
@click.option("--backend", default="auto", show_default=True, help="auto, cpu, onnx-cuda, openvino, tensorrt, or a plugin's.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1), help="Ray: worker actors.")
@click.option("--gpus-per-worker", default=1.0, show_default=True, type=click.FloatRange(0), help="Ray: GPUs each worker takes (0 for CPU backends).")
@click.option("--cpus-per-worker", default=1.0, show_default=True, type=click.FloatRange(0), help="Ray: CPUs each worker takes.")
@click.option("--retries", default=2, show_default=True, type=click.IntRange(0), help="Ray: times a job is retried when its worker died.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="A progress bar on stderr.")
def run_batch(jobs: str, outdir: str, ray_address: str | None, avatar: str | None, model: str | None,
              ave_encoder: str | None, features: str, backend: str, workers: int, gpus_per_worker: float,
              cpus_per_worker: float, retries: int, progress: bool) -> None:
    """Render every job of JOBS (a .csv, a .jsonl, or a folder of audio files for --avatar) into OUTDIR.

    A row: avatar, audio, and optionally id, output (NAME.mp4), model, features,
    encoder, options (JSON: batch_size, walk_start, ...). Outputs are written
    atomically; reports go to OUTDIR/reports/ID.json and OUTDIR/batch-report.json.
    The exit status is 1 when a job failed. See docs/scale-out.md.
    """
    from ..scale.batch import read_jobs
    from ..scale.batch import run_batch as run

    job_list = read_jobs(jobs, avatar=avatar, model=model, encoder=ave_encoder, features=features)
    where = f"on Ray ({workers} worker(s))" if ray_address else "locally"
    click.echo(f"run-batch: {len(job_list)} job(s) {where} -> {outdir}", err=True)
    summary = run(job_list, outdir, ray_address=ray_address, workers=workers, retries=retries, backend=backend,
                  gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, progress=progress)
    click.echo(f"run-batch: {summary.done} done, {summary.failed} failed, {summary.retries} retried "
               f"({summary.workers_lost} worker(s) lost) in {summary.seconds:.1f} s", err=True)
    for r in summary.results:
        if r.status != "done":
            click.echo(f"  failed {r.id} (attempts {r.attempts}): {r.error}", err=True)
    if summary.failed:
        raise SystemExit(1)
