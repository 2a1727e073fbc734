"""``avatar run-batch``: many renders, locally one after another or on Ray actors.

Jobs come from a CSV or JSONL file (one job a row: ``avatar``, ``audio`` and
optional ``id``, ``output``, ``model``, ``features``, ``encoder``, ``options``)
or from a folder of audio files for one avatar. Every output is written
atomically: a render goes to a temporary file that is renamed into place when
it is complete, so a killed job leaves no half file. On Ray the workers send the
finished video back to this process, which writes it (no shared filesystem is
needed for the outputs). A job whose worker died is retried (at most
``retries`` times) on another worker; a job that fails by itself (bad audio, a
missing file) is reported with its reason and not retried. Each job gets a
report in ``OUTDIR/reports/ID.json``; ``OUTDIR/batch-report.json`` sums up.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AvatarError, ConfigError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus")
#: ``options`` a job may set (passed to :func:`avatar.render.render`)
JOB_OPTIONS = ("batch_size", "walk_start", "output_rounding", "frame_limit", "memory_budget_mb")


@dataclass(frozen=True)
class Job:
    id: str
    avatar: str
    audio: str
    output: str
    model: str | None = None
    features: str = "ave"
    feature_options: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobResult:
    id: str
    status: str  # "done" | "failed"
    output: str
    attempts: int
    error: str | None = None
    worker: str = ""
    seconds: float = 0.0
    frames: int = 0
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchSummary:
    jobs: int
    done: int
    failed: int
    retries: int
    workers_lost: int
    seconds: float
    results: list[JobResult]

    def to_dict(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "done": self.done, "failed": self.failed, "retries": self.retries,
                "workers_lost": self.workers_lost, "seconds": round(self.seconds, 2),
                "failures": [{"id": r.id, "attempts": r.attempts, "error": r.error}
                             for r in self.results if r.status != "done"]}


# -- reading jobs ---------------------------------------------------------------------------


def read_jobs(source: str | Path, *, avatar: str | None = None, model: str | None = None,
              encoder: str | None = None, features: str = "ave") -> list[Job]:
    """Jobs from a CSV/JSONL file or a folder of audio files (``avatar`` then names the avatar).

    ``model``, ``encoder`` and ``features`` are defaults a row may override;
    relative paths in a file are relative to the file's folder.
    """
    src = Path(source)
    if src.is_dir():
        if avatar is None:
            raise ConfigError(f"{src} is a folder of audio files: give the avatar with --avatar PATH")
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        if not files:
            raise ConfigError(f"{src} holds no audio file ({', '.join(AUDIO_SUFFIXES)})")
        rows = [{"audio": str(p.resolve()), "id": p.stem} for p in files]
        base = src
    elif src.suffix.lower() == ".jsonl":
        rows, base = [], src.parent
        for n, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{src}:{n}: not a JSON object: {exc}") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{src}:{n}: each line must be a JSON object")
            rows.append(row)
    elif src.suffix.lower() == ".csv":
        with open(src, newline="", encoding="utf-8") as f:
            rows = [dict(r) for r in csv.DictReader(f)]
        base = src.parent
    elif not src.exists():
        raise ConfigError(f"no jobs at {src}: give a .csv, a .jsonl or a folder of audio files")
    else:
        raise ConfigError(f"{src}: jobs are a .csv, a .jsonl or a folder of audio files")
    jobs = [_job(row, n, src, base, avatar, model, encoder, features) for n, row in enumerate(rows, 1)]
    if not jobs:
        raise ConfigError(f"{src} has no job")
    for what in ("id", "output"):
        seen: set[str] = set()
        for j in jobs:
            v = getattr(j, what)
            if v in seen:
                raise ConfigError(f"{src}: two jobs have the {what} {v!r}; give each its own")
            seen.add(v)
    return jobs


def _job(row: dict[str, Any], n: int, src: Path, base: Path, avatar: str | None, model: str | None,
         encoder: str | None, features: str) -> Job:
    where = f"{src} (job {n})"

    def path(key: str, default: str | None, need: bool) -> str | None:
        # a row's relative path is relative to the jobs file; a command-line default to the working folder
        v, rel = (row[key], base) if row.get(key) else (default, Path.cwd())
        if v is None:
            if need:
                raise ConfigError(f"{where}: no {key!r}")
            return None
        p = Path(str(v)).expanduser()
        p = p if p.is_absolute() else rel / p
        if not p.exists():
            raise ConfigError(f"{where}: {key} {v} does not exist")
        return str(p.resolve())

    audio = path("audio", None, True)
    jid = str(row.get("id") or Path(str(audio)).stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", jid) or jid.startswith("."):
        raise ConfigError(f"{where}: id {jid!r} must be letters, digits, '.', '_' or '-' (it names files)")
    output = str(row.get("output") or f"{jid}.mp4")
    if "/" in output or "\\" in output or output.startswith(".") or not output.endswith(".mp4"):
        raise ConfigError(f"{where}: output {output!r} must be a plain .mp4 file name inside OUTDIR")
    options = row.get("options") or {}
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError as exc:
            raise ConfigError(f"{where}: options must be a JSON object: {exc}") from None
    if not isinstance(options, dict) or set(options) - set(JOB_OPTIONS):
        raise ConfigError(f"{where}: options may set {', '.join(JOB_OPTIONS)}")
    enc = path("encoder", encoder, False)
    return Job(id=jid, avatar=str(path("avatar", avatar, True)), audio=str(audio), output=output,
               model=path("model", model, False), features=str(row.get("features") or features),
               feature_options={"encoder": enc} if enc else {}, options=dict(options))


# -- one job ----------------------------------------------------------------------------------


def render_job(job: Job, path: Path, backend: Any) -> dict[str, Any]:
    """Render ``job`` into ``path`` (the caller renames it into place); returns the render report.

    ``backend``: a backend name, or a loaded backend of the job's model (kept open).
    """
    from ..render import render

    report = render(job.avatar, job.audio, sinks=[("file", {"path": str(path)})], model=job.model,
                    features=job.features, feature_options=job.feature_options, backend=backend, **job.options)
    return report.to_dict() if hasattr(report, "to_dict") else {"frames": report.frames}


def job_model(job: Job) -> str:
    """The model file a job renders with: its own, else its avatar package's."""
    if job.model is not None:
        return job.model
    from ..package import AvatarPackage

    with AvatarPackage.open(job.avatar) as pkg:
        if pkg.model_path is None:
            raise ConfigError(f"job {job.id}: the avatar package {job.avatar} names no model; give the job a model")
        return str(pkg.model_path)


def render_job_bytes(job: Job, backend: Any) -> tuple[bytes, dict[str, Any]]:
    """Render ``job`` into a private temporary folder; the video's bytes and the report."""
    with tempfile.TemporaryDirectory(prefix="avatar-batch-") as tmp:
        out = Path(tmp) / "out.mp4"
        report = render_job(job, out, backend)
        return out.read_bytes(), report


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a hidden temporary file beside it and a rename (never half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the run ------------------------------------------------------------------------------------


Progress = Callable[[JobResult, "BatchRun"], None]


class BatchRun:
    """Bookkeeping shared by the local and the Ray runner: results, reports, the summary."""

    def __init__(self, jobs: Sequence[Job], outdir: str | Path, *, on_result: Progress | None = None,
                 progress: bool = False) -> None:
        self.jobs = list(jobs)
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        (self.outdir / "reports").mkdir(exist_ok=True)
        self.results: dict[str, JobResult] = {}
        self.retries = 0
        self.workers_lost = 0
        self.workers: list[Any] = []
        self.on_result = on_result
        self.t0 = time.monotonic()
        self._bar: Any = None
        if progress:
            import click

            self._bar = click.progressbar(length=len(self.jobs), label="rendering", file=None, show_pos=True,
                                          item_show_func=lambda r: r and f"{r.id}: {r.status}")
            self._bar.__enter__()

    def finish(self, result: JobResult, video: bytes | None = None) -> None:
        if video is not None:
            write_atomic(self.outdir / result.output, video)
        rep = json.dumps(asdict(result), indent=2, default=str).encode()
        write_atomic(self.outdir / "reports" / f"{result.id}.json", rep)
        self.results[result.id] = result
        if result.status != "done":
            log.warning("job %s failed after %d attempt(s): %s", result.id, result.attempts, result.error)
        if self._bar is not None:
            self._bar.update(1, result)
        if self.on_result is not None:
            self.on_result(result, self)

    def summary(self) -> BatchSummary:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
        results = [self.results[j.id] for j in self.jobs if j.id in self.results]
        done = sum(r.status == "done" for r in results)
        s = BatchSummary(len(self.jobs), done, len(results) - done, self.retries, self.workers_lost,
                         time.monotonic() - self.t0, results)
        write_atomic(self.outdir / "batch-report.json", json.dumps(s.to_dict(), indent=2).encode())
        return s


def run_batch(jobs: Sequence[Job], outdir: str | Path, *, ray_address: str | None = None, use_ray: bool = False,
              workers: int = 2, retries: int = 2, backend: str = "auto", gpus_per_worker: float = 1.0,
              cpus_per_worker: float = 1.0, progress: bool = False, on_result: Progress | None = None) -> BatchSummary:
    """Render every job into ``outdir``; on Ray (``use_ray`` or an address) with ``workers`` actors."""
    run = BatchRun(jobs, outdir, on_result=on_result, progress=progress)
    try:
        _run(run, ray_address=ray_address, use_ray=use_ray, workers=workers, retries=retries, backend=backend,
             gpus=gpus_per_worker, cpus=cpus_per_worker)
    except BaseException:
        run.summary()  # Ctrl-C, a lost cluster: the report still says what was done
        raise
    return run.summary()


def _run(run: BatchRun, *, ray_address: str | None, use_ray: bool, workers: int, retries: int, backend: str,
         gpus: float, cpus: float) -> None:
    if use_ray or ray_address is not None:
        from . import connect, require_ray

        require_ray()
        connect(ray_address)
        from .batch_ray import run_on_ray

        run_on_ray(run, workers=workers, retries=retries, backend=backend, gpus=gpus, cpus=cpus)
    else:
        for job in run.jobs:
            t = time.monotonic()
            path = Path(tempfile.mkstemp(prefix=f".{job.output}.", suffix=".partial.mp4", dir=run.outdir)[1])
            try:
                report = render_job(job, path, backend)
                os.replace(path, run.outdir / job.output)
                res = JobResult(job.id, "done", job.output, 1, worker="local", seconds=time.monotonic() - t,
                                frames=int(report.get("frames", 0)), report=report)
            except AvatarError as exc:
                res = JobResult(job.id, "failed", job.output, 1, f"{type(exc).__name__}: {exc}", "local",
                                time.monotonic() - t)
            finally:
                path.unlink(missing_ok=True)
            run.finish(res)
