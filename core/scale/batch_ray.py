"""The Ray side of ``avatar run-batch``: worker actors, in-flight jobs, retries of jobs whose worker died."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, WorkerCrashedError

from ..errors import AvatarError
from .batch import BatchRun, Job, JobResult, job_model, render_job_bytes

log = logging.getLogger(__name__)

#: jobs sent to one worker at a time (one running, one queued behind it: no idle gap between jobs)
DEPTH = 2


class BatchWorker:
    """Renders jobs in turn on backends it loads once (one per model and batch size) and keeps."""

    def __init__(self, backend: str) -> None:
        from avatar.plugins import get_plugin_manager

        get_plugin_manager()
        self.backend = backend
        self.backends: dict[tuple[str, int], Any] = {}
        self.loads = 0
        self.name = f"{ray.util.get_node_ip_address()}:{os.getpid()}"

    def _backend(self, job: Job) -> Any:
        from avatar.interfaces import BackendOptions
        from avatar.render import open_backend

        batch = int(job.options.get("batch_size", 8))
        key = (str(Path(job_model(job)).resolve()), batch)
        if key not in self.backends:
            self.backends[key], _ = open_backend(self.backend, key[0], BackendOptions(max_batch=max(batch, 1)))
            self.loads += 1
        return self.backends[key]

    def run(self, job: Job) -> dict[str, Any]:
        t = time.monotonic()
        try:
            video, report = render_job_bytes(job, self._backend(job))
        except (AvatarError, OSError, ValueError) as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "worker": self.name,
                    "seconds": time.monotonic() - t}
        report["worker_backend_loads"] = self.loads
        return {"ok": True, "video": video, "report": report, "worker": self.name, "seconds": time.monotonic() - t}

    def ping(self) -> str:
        return self.name


def run_on_ray(run: BatchRun, *, workers: int, retries: int, backend: str, gpus: float, cpus: float) -> None:
    actor = ray.remote(BatchWorker).options(num_gpus=gpus, num_cpus=cpus, max_restarts=0)
    pool: list[Any] = [actor.remote(backend) for _ in range(max(1, workers))]
    run.workers = pool
    # replacements for workers that die: at most as many as the pool had
    spare = len(pool)
    todo = list(reversed(run.jobs))  # pop() from the end: the jobs in order
    attempts: dict[str, int] = {}
    inflight: dict[Any, tuple[Job, Any]] = {}
    dead: set[Any] = set()

    def submit() -> None:
        for w in pool:
            load = sum(1 for _, ow in inflight.values() if ow is w)
            while todo and load < DEPTH:
                job = todo.pop()
                attempts[job.id] = attempts.get(job.id, 0) + 1
                inflight[w.run.remote(job)] = (job, w)
                load += 1

    submit()
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        for ref in ready:
            job, w = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except (RayActorError, WorkerCrashedError) as exc:
                if w not in dead:
                    dead.add(w)
                    run.workers_lost += 1
                    if w in pool:
                        pool.remove(w)
                    log.warning("a batch worker died (%s); its jobs are retried", type(exc).__name__)
                    if spare > 0:
                        spare -= 1
                        pool.append(actor.remote(backend))
                n = attempts[job.id]
                if n <= retries and pool:
                    run.retries += 1
                    todo.append(job)
                else:
                    run.finish(JobResult(job.id, "failed", job.output, n,
                                         f"its worker died {n} time(s) (retries: {retries})"))
                continue
            if out["ok"]:
                run.finish(JobResult(job.id, "done", job.output, attempts[job.id], worker=out["worker"],
                                     seconds=out["seconds"], frames=int(out["report"].get("frames", 0)),
                                     report=out["report"]), video=out["video"])
            else:
                run.finish(JobResult(job.id, "failed", job.output, attempts[job.id], out["error"], out["worker"],
                                     out["seconds"]))
        run.workers = list(pool)
        submit()
    for job in reversed(todo):  # every worker died and no replacement was left
        run.finish(JobResult(job.id, "failed", job.output, attempts.get(job.id, 0), "no batch worker was left"))
    for w in pool:
        ray.kill(w)
