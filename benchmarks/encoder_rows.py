"""Audio-encoder CPU per row at 1, 2 and 4 rows per call, alone and beside the model (what ``min_rows`` buys).

A real-time stream makes one AVE row per 40 ms frame. Each row is one call of the
audio encoder (ONNX Runtime, one thread, as a live service's thread budget runs
it), and between two calls the model's own call runs on the same cores. The
encoder is timed the way a live stream calls it: a call, then the frames' worth of
waiting (40 ms per row), thread CPU time per row, medians of 40 calls; alone and
while the UNet-328 runs on the thread budget's lanes. Interleaved rounds.

    python benchmarks/encoder_rows.py --model UNET.onnx --precision bf16 --out benchmarks/results/encoder-rows-cpu-2core-amd-epyc

The encoder is the AVE network with seeded weights (the real weights are not public;
the cost is the network's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def per_row_ms(enc: Any, name: str, rows: int, calls: int) -> float:
    x = np.random.default_rng(rows).random((rows, 1, 80, 16), dtype=np.float32)
    enc.run({name: x})
    cpu = []
    for _ in range(calls):
        c = time.thread_time()
        enc.run({name: x})
        cpu.append(time.thread_time() - c)
        time.sleep(0.04 * rows)  # the frames it takes a real-time stream to make these rows
    return 1000 * statistics.median(cpu) / rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DATA / "sanders" / "model" / "unet_sanders_ave.onnx"))
    p.add_argument("--precision", default="bf16")
    p.add_argument("--rows", default="1,2,4")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args()

    from avatar.bench.harness import cpu_model, machine_summary, write_result
    from avatar.engine.threads import ThreadBudget, machine_cores
    from avatar.interfaces import BackendOptions
    from avatar.models.synthetic import make_audio_encoder, sample_audio, sample_visual
    from avatar.plugins import get_plugin_manager
    from avatar.render import open_backend

    budget = ThreadBudget.plan()
    rows = [int(r) for r in args.rows.split(",")]
    load_start = os.getloadavg()
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_audio_encoder(Path(tmp) / "ave.onnx", seed=0)
        enc = get_plugin_manager().backend_class("cpu")(
            path, budget.backend_options("cpu", BackendOptions(max_batch=max(rows), threads=budget.encoder)))
        unet, _ = open_backend("openvino", args.model, budget.backend_options(
            "openvino", BackendOptions(precision=args.precision, max_batch=1, precision_explicit=True)))
        name = enc.inputs[0].name
        feeds = {"input": sample_visual(1), "audio": sample_audio("ave", 1)}
        try:
            for rnd in range(args.rounds):
                for beside in (False, True):
                    stop = threading.Event()

                    def model_loop() -> None:
                        while not stop.is_set():
                            unet.run(feeds)

                    lanes = [threading.Thread(target=model_loop) for _ in range(unet.concurrency)] if beside else []
                    for t in lanes:
                        t.start()
                    for r in rows:
                        raw.append({"round": rnd, "beside_model": beside, "rows": r,
                                    "cpu_ms_per_row": per_row_ms(enc, name, r, args.calls)})
                        print(json.dumps(raw[-1]), flush=True)
                    stop.set()
                    for t in lanes:
                        t.join()
        finally:
            enc.close()
            unet.close()
    cell = {(b, r): statistics.median(x["cpu_ms_per_row"] for x in raw if x["beside_model"] == b and x["rows"] == r)
            for b in (False, True) for r in rows}
    result = {"machine": machine_summary(load_start), "model": Path(args.model).name, "precision": args.precision, "rounds": args.rounds, "raw": raw}
    lines = [f"# Audio-encoder CPU per row by rows per call — {cpu_model()} ({machine_cores()} cores)", "",
             f"AVE encoder (seeded weights), ONNX Runtime, 1 thread; one call then 40 ms per row of waiting; "
             f"median thread CPU of {args.calls} calls, {args.rounds} interleaved rounds; beside: the "
             f"`{Path(args.model).name}` UNet on openvino {args.precision}, {budget.lanes} lanes, running throughout. "
             f"Load average at start {result['machine']['load_start']}, at end {result['machine']['load_end']}.", "",
             "| rows per call | alone ms/row | beside the model ms/row | beside, vs 1 row per call |",
             "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r} | {cell[(False, r)]:.2f} | {cell[(True, r)]:.2f} | {cell[(True, r)] / cell[(True, rows[0])]:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    write_result(args.out, result, md)


if __name__ == "__main__":
    main()
