"""Scale-out on Ray: sessions and batch renders on 1, 2, 3 nodes, and the Ray path's overhead.

On a local Ray cluster (``ray.cluster_utils.Cluster``: K nodes on this machine,
each declaring one GPU, one replica per node), with the tiny test model:

* **sessions**: N = ``--sessions-per-node`` × K live sessions through the front
  door of ``avatar serve --ray`` (HTTP + the relayed WebSocket), each pushing
  speech in 20 ms chunks in real time (the workload of ``serve_sessions.py``):
  delivered and speech fps per session, lag, push-to-first-frame latency, CPU
  of the whole process tree (driver, front door, Ray daemons, replicas);
* **overhead**: the same N as K = 1 through a single-process ``avatar serve``
  (a subprocess, its CPU only), so ``ray / single`` compares the same work on
  one node;
* **batch**: ``--jobs`` renders of ``--job-seconds`` of speech with K workers
  (``avatar run-batch --ray``) and locally one after another: jobs per second.

Where a GPU machine is used, run one node per GPU and ``--backend onnx-cuda``.
On a shared machine the figures move with the load (written into the results).

    python benchmarks/ray_scale.py --nodes 1,2,3 --sessions-per-node 2 --seconds 20 --jobs 12 \\
        --out benchmarks/results/ray_scale_cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

RATIOS = ("speech_fps_mean", "lag_p95_s", "latency_p50_s", "client_latency_p50_s", "cpu_percent")


def tree_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and all their children (live ones)."""
    import psutil

    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def drive(url: str, n: int, pcm: np.ndarray, pids: list[int]) -> dict[str, Any]:
    """N sessions through the API at once (serve_sessions.py's client); CPU over ``pids``' trees."""
    from serve_sessions import _server_session, summarize

    async def main() -> list[dict[str, Any]]:
        ready = asyncio.Event()
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(_server_session(url, pcm, t0, ready)) for _ in range(n)]
        await asyncio.sleep(0.5)
        ready.set()
        return await asyncio.gather(*tasks)

    cpu0 = tree_cpu_s(pids)
    t = time.monotonic()
    per = asyncio.run(main())
    wall = time.monotonic() - t - 0.5
    cpu = 100.0 * (tree_cpu_s(pids) - cpu0) / max(wall, 1e-6)
    return summarize(per, wall, len(pcm) / 16000, cpu)


def batch_jobs(work: Path, paths: dict[str, Path], n: int, seconds: float) -> list[Any]:
    from avatar.demo import speechlike_audio, write_wav
    from avatar.scale.batch import read_jobs

    audio = work / f"batch-audio-{n}-{seconds:g}"
    audio.mkdir(exist_ok=True)
    for k in range(n):
        if not (audio / f"j{k:03d}.wav").exists():
            write_wav(audio / f"j{k:03d}.wav", speechlike_audio(seconds, seed=k))
    return read_jobs(audio, avatar=str(paths["avatar"]), model=str(paths["model"]), encoder=str(paths["encoder"]))


def run_nodes(k: int, args: argparse.Namespace, paths: dict[str, Path], pcm: np.ndarray, work: Path) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from avatar.scale import connect
    from avatar.scale.batch import run_batch
    from avatar.scale.deploy import deploy, undeploy, wait_replicas
    from avatar.scale.front import build_front_app
    from avatar.scale.options import ScaleOptions
    from avatar.scale.replica import AppThread
    from avatar.serve import AvatarSpec, Limits, ServeConfig

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
    for _ in range(k - 1):
        c.add_node(num_cpus=1, num_gpus=1)
    c.wait_for_nodes()
    connect(c.address)
    try:
        n = args.sessions_per_node * k
        spec = AvatarSpec("demo", paths["avatar"], paths["model"], "ave", {"encoder": str(paths["encoder"])})
        config = ServeConfig(avatars=(spec,), backend=args.backend, batch=args.batch, max_sessions=n,
                             limits=Limits(client_timeout_s=30.0))
        scale = ScaleOptions(app_name="bench", min_replicas=k, max_replicas=k, replica_host="127.0.0.1",
                             cpus_per_replica=0.25, drain_timeout_s=0.0)
        t = time.monotonic()
        registry = deploy(config, scale)
        wait_replicas(registry, k, timeout=600)
        startup = time.monotonic() - t
        front = AppThread(build_front_app(config, scale, registry), "127.0.0.1", 0)
        try:
            sessions = drive(front.url, n, pcm, [os.getpid()])
        finally:
            front.stop()
            undeploy(scale, registry)
        jobs = batch_jobs(work, paths, args.jobs, args.job_seconds)
        t = time.monotonic()
        s = run_batch(jobs, work / f"batch-ray-{k}", use_ray=True, workers=k, backend=args.backend,
                      gpus_per_worker=1, cpus_per_worker=0.25)
        batch_s = time.monotonic() - t
        return {"nodes": k, "sessions": n, "replica_startup_s": startup, "ray": sessions,
                "batch": {"jobs": len(jobs), "done": s.done, "seconds": batch_s, "jobs_per_s": s.done / batch_s}}
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="1,2,3")
    ap.add_argument("--sessions-per-node", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20.0, help="speech per session")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--job-seconds", type=float, default=2.0)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workdir", default=".avatar-bench-ray")
    ap.add_argument("--out", required=True, help="results path without extension (.json and .md are written)")
    ap.add_argument("--note", default="", help="a line for the results (e.g. how loaded the machine was)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    from avatar.bench.harness import cpu_model
    from avatar.demo import build_demo
    from avatar.scale.batch import run_batch
    from serve_process import ServeProcess
    from serve_sessions import speech

    work = Path(args.workdir).resolve()
    paths = {k: Path(v).resolve() for k, v in build_demo(work, tiny=True).items()}
    pcm = speech(args.seconds, work)
    load_before = os.getloadavg()
    nodes = [int(x) for x in args.nodes.split(",")]
    rows = [run_nodes(k, args, paths, pcm, work) for k in nodes]
    for row in rows:
        print(json.dumps(row), flush=True)

    # the single-process server at the same N as one node, and local batch renders
    n1 = args.sessions_per_node
    server = ServeProcess(work, "--demo", "--tiny", "--backend", args.backend, "--batch", str(args.batch),
                          "--max-sessions", str(n1), "--client-timeout-s", "30").wait_ready()
    try:
        single = drive(server.url, n1, pcm, [os.getpid()])  # the client and the server (a child), as for Ray
    finally:
        server.stop()
    jobs = batch_jobs(work, paths, args.jobs, args.job_seconds)
    t = time.monotonic()
    s = run_batch(jobs, work / "batch-local", backend=args.backend)
    local_s = time.monotonic() - t
    one = next((r for r in rows if r["nodes"] == 1), None)
    overhead = None
    if one is not None:
        overhead = {k: (one["ray"][k] / single[k] if single.get(k) else None) for k in RATIOS if k in single}
    result = {
        "benchmark": "ray_scale", "note": args.note, "model": "tiny", "backend": args.backend, "batch": args.batch,
        "seconds_per_session": args.seconds, "cpu": cpu_model(), "cpus": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "python": platform.python_version(),
        "rows": rows, "single_process": {"sessions": n1, **single},
        "batch_local": {"jobs": len(jobs), "done": s.done, "seconds": local_s, "jobs_per_s": s.done / local_s},
        "ray_1_node_over_single_process": overhead,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Scale-out on a local Ray cluster ({r['model']} model, {r['backend']} backend)", "",
        *([f"**{r['note']}**", ""] if r.get("note") else []),
        f"CPU: {r['cpu']} ({r['cpus']} cores); load average before {r['loadavg_before'][0]:.1f}, after "
        f"{r['loadavg_after'][0]:.1f}. Every node of the cluster is on this one machine (each declares one GPU "
        f"and one CPU), so more nodes add replicas but no hardware: the rows show the Ray path working and its "
        f"cost, not a speed-up. {r['seconds_per_session']:.0f} s of speech per session, in 20 ms chunks in real time.",
        "", "| nodes | sessions | replica start s | speech fps/session (mean, min) | skipped | lag p95 ms | "
        "latency p50 ms | client latency p50 ms | CPU % (tree) | real time | batch jobs/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        m = row["ray"]
        lines.append(
            f"| {row['nodes']} | {row['sessions']} | {row['replica_startup_s']:.1f} | {m['speech_fps_mean']:.1f}, "
            f"{m['speech_fps_min']:.1f} | {m['skipped']} | {1000 * m['lag_p95_s']:.0f} | "
            f"{1000 * m['latency_p50_s']:.0f} | {1000 * m.get('client_latency_p50_s', 0):.0f} | "
            f"{m['cpu_percent']:.0f} | {'yes' if m['realtime'] else 'no'} | {row['batch']['jobs_per_s']:.2f} |")
    s = r["single_process"]
    lines.append(
        f"| single process | {s['sessions']} | - | {s['speech_fps_mean']:.1f}, {s['speech_fps_min']:.1f} | "
        f"{s['skipped']} | {1000 * s['lag_p95_s']:.0f} | {1000 * s['latency_p50_s']:.0f} | "
        f"{1000 * s.get('client_latency_p50_s', 0):.0f} | {s['cpu_percent']:.0f} | {'yes' if s['realtime'] else 'no'} | "
        f"{r['batch_local']['jobs_per_s']:.2f} (local) |")
    if r["ray_1_node_over_single_process"]:
        q = r["ray_1_node_over_single_process"]
        lines += ["", "Ray on one node / single-process server, same N, same run: " + ", ".join(
            f"{k} {v:.2f}" for k, v in q.items() if v is not None) + "."]
    lines += ["", "CPU of the Ray rows is the whole process tree (driver, front door, GCS, raylets, Serve controller, "
              "replicas, the client); of the single-process row the client and the server process.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
