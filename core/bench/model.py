"""Model-only benchmark of one backend, ideally in a fresh process of its own.

One backend is measured per process so that its peak resident memory (and GPU
memory) is its own and not mixed with another backend's: ``avatar bench`` runs
``python -m avatar.bench.model SPEC.json`` once per backend and reads the
result file it writes. :func:`measure_backend` is the same measurement for an
in-process call (tests, or ``--no-isolate``).

What is measured, per batch size (ascending):

* ``warmup`` calls that are not counted (the first CUDA call, arena growth);
* then timed calls (``perf_counter`` around :meth:`Backend.run`, so host/device
  copies are included) until at least ``repeats`` calls were made *and* the
  cell's time budget is spent (capped at ``max_calls``);
* median, p95 and p99 call latency, frames/s (batch / median call), the
  process's peak RSS so far (``VmHWM``) and the GPU memory the process holds.

Before the batch sizes, the cold start: model load, then the first batch-1
inference, reported separately (the "time to first result"). The backend's
outputs on the shared check inputs are saved for the correctness cross-check.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import AvatarError, BackendError
from ..interfaces import Backend, BackendOptions, TensorInfo

log = logging.getLogger(__name__)

#: hard cap of timed calls per cell, whatever the budget
MAX_CALLS = 2000


# --------------------------------------------------------------------------- memory


def _proc_status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float | None:
    """Current resident memory of this process (MiB), or None where unknown."""
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb / 1024.0
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        return None


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far (MiB): ``VmHWM`` / ``ru_maxrss``."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb / 1024.0
    try:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / (2**20 if sys.platform == "darwin" else 1024.0)
    except Exception:
        return None


def gpu_memory_mb(pid: int | None = None) -> float | None:
    """GPU memory held by process ``pid`` according to ``nvidia-smi`` (MiB), or None.

    None when there is no ``nvidia-smi`` or the process is not listed (e.g. a
    container whose PIDs differ from the host's).
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    pid = os.getpid() if pid is None else pid
    try:
        out = subprocess.run(
            [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    total = None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                total = (total or 0.0) + float(parts[1])
            except ValueError:
                pass
    return total


# --------------------------------------------------------------------------- inputs and stats


def make_feeds(inputs: Sequence[TensorInfo], batch: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs for any UNet-like model; identical in every process for the same seed."""
    from ..compare import random_feeds

    return random_feeds(inputs, batch, seed)


def throughput_in_flight(backend: Backend, feeds: Mapping[str, np.ndarray], seconds: float, min_calls: int = 0) -> float:
    """Frames/s of ``backend`` with as many calls in flight as it runs at once (its ``concurrency``, one
    thread each), for ``seconds`` (and at least ``min_calls`` calls per thread)."""
    import threading

    lanes = max(1, backend.concurrency)
    batch = int(len(next(iter(feeds.values()))))
    done = [0] * lanes
    end = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < end or done[i] < min_calls:
            backend.run(feeds)
            done[i] += 1

    workers = [threading.Thread(target=loop, args=(i,), name=f"avatar-bench-{i}") for i in range(lanes)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return batch * sum(done) / (time.perf_counter() - t0)


def latency_stats(calls_s: Sequence[float], batch: int) -> dict[str, float | int]:
    """Median / p95 / p99 / mean / min / max call latency (ms) and frames/s of ``calls_s``."""
    a = np.asarray(calls_s, dtype=np.float64) * 1000.0
    if a.size == 0:
        raise BackendError("no timed calls to summarise")
    med, p95, p99 = (float(v) for v in np.percentile(a, [50, 95, 99]))
    return {
        "calls": int(a.size),
        "median_ms": med,
        "p95_ms": p95,
        "p99_ms": p99,
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
        "ms_per_frame": med / batch,
        "fps": 1000.0 * batch / med if med > 0 else 0.0,
    }


def compare_outputs(reference: np.ndarray, test: np.ndarray) -> dict[str, Any]:
    """Max absolute difference and PSNR (dB, peak 1.0: outputs are in [0, 1]) of two outputs.

    PSNR is ``None`` (JSON null) when the outputs are identical, with ``identical`` True.
    """
    ref = np.asarray(reference, dtype=np.float64)
    tst = np.asarray(test, dtype=np.float64)
    if ref.shape != tst.shape:
        raise BackendError(f"cross-check: output shapes differ: {list(ref.shape)} vs {list(tst.shape)}")
    diff = np.abs(ref - tst)
    mse = float(np.mean(diff**2))
    peak = 1.0 if ref.dtype != np.uint8 else 255.0
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "psnr_db": None if mse == 0.0 else 10.0 * float(np.log10(peak * peak / mse)),
        "identical": mse == 0.0,
    }


# --------------------------------------------------------------------------- measurement


def _timed_cell(backend: Backend, feeds: Mapping[str, np.ndarray], *, warmup: int, repeats: int, seconds: float) -> list[float]:
    for _ in range(warmup):
        backend.run(feeds)
    calls: list[float] = []
    start = time.perf_counter()
    while len(calls) < MAX_CALLS:
        t = time.perf_counter()
        backend.run(feeds)
        calls.append(time.perf_counter() - t)
        if len(calls) >= repeats and time.perf_counter() - start >= seconds:
            break
    return calls


def measure_backend(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Measure one backend as described by ``spec`` and return the result document.

    ``spec`` keys: ``backend``, ``model``, ``batch_sizes``, ``warmup``,
    ``repeats``, ``cell_seconds``, ``threads``, ``device_id``, ``seed``, and
    optionally ``check_inputs`` (an ``.npz`` of feeds) with ``check_output``
    (where to save this backend's output on them, ``.npy``).
    """
    from ..plugins import get_plugin_manager

    name = str(spec["backend"])
    batches = sorted({int(b) for b in spec["batch_sizes"]})
    base, _, precision = name.partition(":")  # "openvino:bf16": a backend at a precision
    opts = BackendOptions(
        device_id=int(spec.get("device_id", 0)),
        precision=precision or "fp32",
        max_batch=max(batches),
        threads=spec.get("threads"),
    )
    rss_before = rss_mb()
    cls = get_plugin_manager().backend_class(base)
    t0 = time.perf_counter()
    backend = cls(spec["model"], opts)
    load_s = time.perf_counter() - t0
    # ``threads`` as the measuring process received it (through the spec file when isolated):
    # the numbers mean little without knowing how many cores the backend was allowed
    result: dict[str, Any] = {"backend": name, "pid": os.getpid(), "threads": opts.threads, "cells": []}
    if hasattr(backend, "staging"):  # onnx-cuda: page-locked or pageable copies
        result["staging"] = backend.staging
    if getattr(backend, "gate", None) is not None:  # the accuracy gate record the precision loaded under
        from dataclasses import asdict

        result["gate"] = {**asdict(backend.gate), "loss_db": backend.gate.loss_db}
    try:
        first = make_feeds(backend.inputs, 1, int(spec.get("seed", 0)))
        t1 = time.perf_counter()
        backend.run(first)
        first_s = time.perf_counter() - t1
        result.update(
            load_s=load_s,
            first_infer_s=first_s,
            time_to_first_result_s=load_s + first_s,
            rss_before_mb=rss_before,
            rss_after_load_mb=rss_mb(),
            providers=list(getattr(backend, "providers", []) or []),
        )
        if spec.get("check_inputs"):
            with np.load(spec["check_inputs"]) as z:
                check = {k: z[k] for k in z.files}
            out = backend.run(check)
            np.save(spec["check_output"], next(iter(out.values())))
        gpu = base not in ("cpu", "openvino")
        for b in batches:
            feeds = make_feeds(backend.inputs, b, int(spec.get("seed", 0)) + b)
            calls = _timed_cell(
                backend,
                feeds,
                warmup=int(spec.get("warmup", 2)),
                repeats=int(spec.get("repeats", 5)),
                seconds=float(spec.get("cell_seconds", 5.0)),
            )
            cell = {"backend": name, "batch": b, "warmup": int(spec.get("warmup", 2)), **latency_stats(calls, b)}
            cell["rss_peak_mb"] = peak_rss_mb()
            cell["gpu_mem_mb"] = gpu_memory_mb() if gpu else None
            result["cells"].append(cell)
            log.info("%s batch %d: median %.1f ms/call, %.1f fps", name, b, cell["median_ms"], cell["fps"])
        result["rss_peak_mb"] = peak_rss_mb()
        result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)  # a shared machine: the load this backend met
        result["gpu_mem_mb"] = gpu_memory_mb() if gpu else None
    finally:
        backend.close()
    return result


def measure_in_subprocess(spec: Mapping[str, Any], workdir: Path, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run :func:`measure_backend` in a fresh Python process; raise :class:`BackendError` on failure."""
    name = str(spec["backend"])
    spec_file = workdir / f"spec-{name}.json"
    out_file = workdir / f"result-{name}.json"
    spec_file.write_text(json.dumps({**spec, "result_file": str(out_file)}))
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "avatar.bench.model", str(spec_file)],
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise BackendError(f"{name}: the model benchmark ran past {timeout_s:.0f} s; lower --repeats or --cell-seconds") from None
    if not out_file.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise BackendError(f"{name}: the benchmark process failed (exit {proc.returncode}): " + " | ".join(tail))
    data = json.loads(out_file.read_text())
    if data.get("error"):
        raise BackendError(f"{name}: {data['error']}")
    return data


def _main(argv: Sequence[str]) -> int:
    """``python -m avatar.bench.model SPEC.json``: measure, write ``result_file``."""
    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["result_file"])
    try:
        result = measure_backend(spec)
    except AvatarError as exc:
        result = {"backend": spec.get("backend"), "error": str(exc)}
    except Exception as exc:  # reported to the parent, which keeps measuring others
        result = {"backend": spec.get("backend"), "error": f"{exc.__class__.__name__}: {exc}"}
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through measure_in_subprocess
    raise SystemExit(_main(sys.argv[1:]))
