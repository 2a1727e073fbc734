"""OpenVINO precisions against ONNX Runtime fp32 on a shared CPU: interleaved rounds, paired ratios.

``avatar bench`` measures one backend after another; on a machine that other
work loads unevenly (the 2-core development box) that turns load swings into
speed differences. This script measures the same cells in rounds — every
backend once per round, in turn — and reports each ratio to ONNX Runtime fp32
as the median of the per-round ratios, so a load swing hits both sides of a
ratio. Model-only (batch 1, 4, 8) and end to end (real renders of the sanders
avatar with real speech to an H.264 + AAC file), the load average beside every
round.

    python benchmarks/openvino_cpu.py --model ../shared/data/sanders/model/unet_sanders_ave.onnx \\
        --int8-model sanders.int8.xml --rounds 3 --name cpu-2core-amd-epyc-openvino-interleaved

Accuracy comes from the gate records (``avatar gate``), not from here.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any


from avatar.bench.harness import BenchConfig, _test_models, bench_cache, environment, hardware_label, load_average
from avatar.bench.e2e import load_bench_audio, prepare_avatar, run_render
from avatar.bench.model import make_feeds
from avatar.interfaces import BackendOptions
from avatar.plugins import get_plugin_manager

VARIANTS = {"cpu": ("cpu", "fp32"), "openvino": ("openvino", "fp32"), "openvino:bf16": ("openvino", "bf16"),
            "openvino:int8": ("openvino", "int8")}  # fmt: skip


def model_rounds(models: dict[str, Path], batches: list[int], rounds: int, calls: int) -> list[dict[str, Any]]:
    pm = get_plugin_manager()
    bes = {k: pm.backend_class(b)(models[k], BackendOptions(precision=p, max_batch=max(batches))) for k, (b, p) in VARIANTS.items() if k in models}
    out = []
    for r in range(rounds):
        for b in batches:
            row: dict[str, Any] = {"round": r, "batch": b, "load_avg_1m": load_average(), "fps": {}}
            for k, be in bes.items():
                feeds = make_feeds(be.inputs, b, seed=b)
                be.run(feeds)  # warm-up
                t = []
                for _ in range(calls):
                    s = time.perf_counter()
                    be.run(feeds)
                    t.append(time.perf_counter() - s)
                row["fps"][k] = b / median(t)
            out.append(row)
            print(json.dumps(row), flush=True)
    for be in bes.values():
        be.close()
    return out


def e2e_rounds(models: dict[str, Path], encoder: Path, batch: int, rounds: int, seconds: float) -> list[dict[str, Any]]:
    cache = bench_cache(None)
    avatar = prepare_avatar(None, cache, frames=100)
    pcm, _ = load_bench_audio(None, seconds)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            row: dict[str, Any] = {"round": r, "batch": batch, "load_avg_1m": load_average(), "fps": {}, "stages": {}}
            for k, (b, p) in VARIANTS.items():
                if k not in models or k == "openvino":
                    continue
                d = run_render(avatar, pcm, model=models[k], encoder=encoder, backend=b, batch_size=batch,
                               out_file=Path(tmp) / f"{r}-{k.replace(':', '-')}.mp4", precision=p)  # fmt: skip
                row["fps"][k] = d["frames_per_s"]
                row["stages"][k] = d["stage_ms_per_frame"]
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def ratios(rows: list[dict[str, Any]], key: Any) -> dict[Any, dict[str, dict[str, float]]]:
    """Per cell: median frames/s and the median of the per-round ratios to cpu."""
    cells: dict[Any, dict[str, dict[str, float]]] = {}
    for k in sorted({key(r) for r in rows}):
        rs = [r for r in rows if key(r) == k]
        cells[k] = {n: {"fps": median(r["fps"][n] for r in rs), "vs_cpu": median(r["fps"][n] / r["fps"]["cpu"] for r in rs)}
                    for n in rs[0]["fps"]}  # fmt: skip
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--int8-model", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--e2e-batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="cpu-openvino-interleaved")
    a = ap.parse_args()
    models = {"cpu": a.model, "openvino": a.model, "openvino:bf16": a.model}
    if a.int8_model:
        models["openvino:int8"] = a.int8_model
    _, encoder, _ = _test_models(BenchConfig(model=a.model), bench_cache(None))
    env = environment()
    started = time.time()
    m = model_rounds(models, [int(b) for b in a.batches.split(",")], a.rounds, a.calls)
    e = e2e_rounds(models, encoder, a.e2e_batch, a.rounds, a.seconds)
    gates = {}
    for k, (b, p) in VARIANTS.items():
        if k in models and p != "fp32":
            with get_plugin_manager().backend_class(b)(models[k], BackendOptions(precision=p)) as be:
                g = getattr(be, "gate", None)
                gates[k] = None if g is None else {"psnr_vs_fp32": g.psnr_vs_fp32, "psnr_vs_real": g.psnr_vs_real,
                                                   "loss_db": g.loss_db, "passed": g.passed, "fp32_vs_real": g.fp32_vs_real}  # fmt: skip
    doc = {"schema": "avatar-bench-interleaved/1", "hardware": hardware_label(env), "machine": env,
           "load_avg_1m_at_end": load_average(), "wall_s": time.time() - started, "settings": vars(a) | {"model": str(a.model),
           "int8_model": str(a.int8_model), "out": str(a.out)}, "model_only_rounds": m, "e2e_rounds": e, "gates": gates,
           "model_only": {str(k): v for k, v in ratios(m, lambda r: r["batch"]).items()},
           "e2e": {str(k): v for k, v in ratios(e, lambda r: r["batch"]).items()}}  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(doc, indent=1))
    (a.out / f"{a.name}.md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc: dict[str, Any]) -> str:
    loads = [r["load_avg_1m"] for r in doc["model_only_rounds"] + doc["e2e_rounds"]]
    real = next((g["fp32_vs_real"] for g in doc["gates"].values() if g), None)
    lines = [
        "# OpenVINO precisions against ONNX Runtime fp32 (interleaved rounds)", "",
        f"**Hardware:** {doc['hardware']}  ",
        "**Libraries:** " + ", ".join(f"{k} {v}" for k, v in doc["machine"]["libraries"].items() if v) + f", openvino {_v('openvino')}, nncf {_v('nncf')}  ",
        f"**Measured:** {doc['machine'].get('load_avg_1m_at_start')} 1-minute load at start; per round {min(loads)}–{max(loads)} "
        f"(a shared 2-core machine: every backend runs once per round, ratios are medians of per-round ratios)  ",
        f"**Model:** {doc['settings']['model']} (the trained sanders UNet-328); int8: {doc['settings']['int8_model']}", "",
        "## Model only", "",
        "| backend | batch | frames/s (median of rounds) | vs ONNX Runtime fp32 | PSNR vs fp32 | PSNR vs real | lost | gate |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for b, cells in doc["model_only"].items():
        for k, c in cells.items():
            lines.append(f"| {k} | {b} | {c['fps']:.1f} | {c['vs_cpu']:.2f}x | {_acc(doc['gates'].get(k), k, real)} |")
    lines += ["", f"## End to end (sanders 1280x720, {doc['settings']['seconds']:.0f} s of real speech, H.264 + AAC file, batch {doc['settings']['e2e_batch']})", "",
              "| backend | frames/s | real-time factor | vs ONNX Runtime fp32 | " + " | ".join(f"{s} ms/f" for s in doc["e2e_rounds"][0]["stages"]["cpu"]) + " |",
              "|---|---:|---:|---:|" + "---:|" * len(doc["e2e_rounds"][0]["stages"]["cpu"])]  # fmt: skip
    for b, cells in doc["e2e"].items():
        for k, c in cells.items():
            st = {s: median(r["stages"][k][s] for r in doc["e2e_rounds"]) for s in doc["e2e_rounds"][0]["stages"][k]}
            lines.append(f"| {k} | {c['fps']:.1f} | {c['fps'] / 25:.2f}x | {c['vs_cpu']:.2f}x | " + " | ".join(f"{v:.1f}" for v in st.values()) + " |")
    return "\n".join(lines) + "\n"


def _acc(g: dict[str, Any] | None, k: str, real: float | None) -> str:
    if g:
        return f"{g['psnr_vs_fp32']:.1f} dB | {g['psnr_vs_real']:.2f} dB | {g['loss_db']:+.2f} dB | {'passed' if g['passed'] else 'FAILED'}"
    return f"– | {real:.2f} dB | – | reference" if k == "cpu" and real else "– | – | – | fp32"


def _v(dist: str) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "-"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
