"""One model call on every core against two lanes (two calls in flight, half the cores each), with other work beside.

What the live service's thread budget chooses between on a CPU (``avatar.engine.threads``):
OpenVINO with the LATENCY hint runs one call on all the cores; with the budget's
lanes it runs ``performance_hint=THROUGHPUT, streams=2``, one infer request per
stream, two calls in flight from two threads (as the shared scheduler's lanes do).
Each configuration is timed alone and beside a *load*: a Python thread that keeps
a given share of one core busy with numpy work in 40 ms periods (what a live
session's own stages do between model calls). Configurations are interleaved
within each round; the figures are medians over rounds.

    python benchmarks/openvino_lanes.py --precision bf16 --out benchmarks/results/openvino-lanes-cpu-2core-amd-epyc

Default model: the trained sanders UNet-328 from ``../shared/data`` (a reduced
precision needs its ``avatar gate`` record beside the model, as the backend insists).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _load(stop: threading.Event, duty: float) -> None:
    """Keep ``duty`` of one core busy (numpy work in 40 ms periods) until ``stop``."""
    a = np.random.default_rng(0).random((360, 640, 3), dtype=np.float32)
    while not stop.is_set():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.04 * duty:
            a = a * 1.0001
        stop.wait(max(0.0, 0.04 * (1.0 - duty)))


def throughput(backend: Any, feeds: dict[str, np.ndarray], seconds: float, duty: float) -> float:
    """Frames/s with ``backend.concurrency`` calls in flight (one thread each) and ``duty`` of a core taken."""
    from avatar.bench.model import throughput_in_flight

    stop = threading.Event()
    load = threading.Thread(target=_load, args=(stop, duty), daemon=True) if duty > 0 else None
    if load is not None:
        load.start()
    try:
        return throughput_in_flight(backend, feeds, seconds)
    finally:
        stop.set()
        if load is not None:
            load.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DATA / "sanders" / "model" / "unet_sanders_ave.onnx"))
    p.add_argument("--precision", default="bf16")
    p.add_argument("--duties", default="0,0.25,0.5", help="shares of one core taken by the load")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args()

    from avatar.bench.harness import cpu_model, machine_summary, write_result
    from avatar.engine.threads import ThreadBudget, machine_cores
    from avatar.interfaces import BackendOptions
    from avatar.models.synthetic import sample_audio, sample_visual
    from avatar.render import open_backend

    budget = ThreadBudget.plan(gpu=False)
    base = BackendOptions(precision=args.precision, max_batch=1, precision_explicit=True)
    configs = {"one call, all cores": ThreadBudget(cores=budget.cores, backend=budget.backend, lanes=1),
               f"{budget.lanes} lanes": budget}
    backends = {k: open_backend("openvino", args.model, b.backend_options("openvino", base))[0] for k, b in configs.items()}
    duties = [float(x) for x in args.duties.split(",")]
    load_start = os.getloadavg()
    raw: list[dict[str, Any]] = []
    try:
        be0 = next(iter(backends.values()))
        vis = next(t for t in be0.inputs if len(t.shape) == 4 and t.shape[1] == 6)
        feeds = {vis.name: sample_visual(1).astype(vis.dtype), "audio": sample_audio("ave", 1)}
        for be in backends.values():
            for _ in range(3):
                be.run(feeds)
        for rnd in range(args.rounds):
            for duty in duties:
                for name, be in backends.items():
                    fps = throughput(be, feeds, args.seconds, duty)
                    raw.append({"round": rnd, "duty": duty, "config": name, "lanes": be.concurrency, "fps": fps})
                    print(json.dumps(raw[-1]), flush=True)
    finally:
        for be in backends.values():
            be.close()
    table = {(d, k): statistics.median(r["fps"] for r in raw if r["duty"] == d and r["config"] == k)
             for d in duties for k in configs}
    result = {"machine": machine_summary(load_start), "model": Path(args.model).name, "precision": args.precision, "seconds": args.seconds,
              "rounds": args.rounds, "raw": raw}
    names = list(configs)
    lines = [f"# One call on every core vs {budget.lanes} lanes — openvino {args.precision}, {cpu_model()} "
             f"({machine_cores()} cores)", "",
             f"Model `{Path(args.model).name}`, batch 1, {args.rounds} interleaved rounds of {args.seconds:.0f} s per "
             f"cell; load average at start {result['machine']['load_start']}, at end {result['machine']['load_end']}.",
             "Load: a thread keeping the given share of one core busy with numpy work in 40 ms periods.", "",
             "| share of a core taken | " + " | ".join(f"{n} frames/s" for n in names) + " | lanes / one call |",
             "|---:|" + "---:|" * len(names) + "---:|"]
    for d in duties:
        vals = [table[(d, n)] for n in names]
        lines.append(f"| {d:.2f} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {vals[1] / vals[0]:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    write_result(args.out, result, md)


if __name__ == "__main__":
    main()
