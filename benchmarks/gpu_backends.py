"""Backend benchmark for a GPU machine: every backend variant x batch size in one go.

    python benchmarks/gpu_backends.py                       # full-size synthetic UNet-328
    python benchmarks/gpu_backends.py --model sanders.onnx  # a real model
    python benchmarks/gpu_backends.py --tiny --batches 1,2 --repeats 3   # smoke run (CPU is fine)

Variants: ``cpu``; ``onnx-cuda`` fp32 (page-locked staging), fp32 with pageable
copies (the same run, so the staging's effect is a ratio), fp16, fp32 with the
uint8 visual input, fp16 + uint8; ``tensorrt`` fp32, fp16, fp16 + uint8 — each where it is usable
(the reason is recorded where not). Per variant and batch size (1, 4, 16, 64):
median and p95 latency of :meth:`Backend.run` (warm-up excluded; ``run``
returns host arrays, so each timed call ends after the device finished and the
outputs were copied back — host timers are CUDA-synchronised by construction),
frames/s, the process's GPU memory (``nvidia-smi``), and parity against the
``cpu`` backend on the same inputs (max abs difference, PSNR).

Writes ``benchmarks/results/gpu_<device>.json`` and ``.md`` with the device
named (GPU, driver, CUDA, library versions) and prints a short table last.

Note on fp16 parity: the synthetic full-size UNet is untrained and amplifies
tiny perturbations (a relative input noise of 1e-4 already costs ~37 dB on
CPU), so its fp16 PSNR is a pessimistic bound; fp16 variants therefore load
with the load-time gate off (``fp16_min_psnr=0``) and the measured PSNR is
reported instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("gpu_backends")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    label: str
    backend: str
    precision: str = "fp32"
    uint8_visual: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


VARIANTS = [
    Variant("cpu", "cpu"),
    Variant("onnx-cuda fp32", "onnx-cuda"),
    Variant("onnx-cuda fp32 pageable", "onnx-cuda", extra={"staging": "pageable"}),
    Variant("onnx-cuda fp16", "onnx-cuda", "fp16"),
    Variant("onnx-cuda fp32 u8", "onnx-cuda", uint8_visual=True),
    Variant("onnx-cuda fp16 u8", "onnx-cuda", "fp16", uint8_visual=True),
    Variant("tensorrt fp32", "tensorrt"),
    Variant("tensorrt fp16", "tensorrt", "fp16"),
    Variant("tensorrt fp16 u8", "tensorrt", "fp16", uint8_visual=True),
]


# --------------------------------------------------------------------------- device description


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def describe_device() -> dict[str, Any]:
    """GPU, driver, CUDA and library versions (what a result is only valid for)."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    info["cpu"] = cpu
    smi = shutil.which("nvidia-smi")
    if smi:
        q = _run([smi, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"]).strip().splitlines()
        if q:
            parts = [p.strip() for p in q[0].split(",")]
            info.update(gpu=parts[0], driver=parts[1] if len(parts) > 1 else None,
                        gpu_memory=parts[2] if len(parts) > 2 else None,
                        compute_capability=parts[3] if len(parts) > 3 else None)  # fmt: skip
        m = re.search(r"CUDA Version:\s*([\d.]+)", _run([smi]))
        info["cuda_driver_api"] = m.group(1) if m else None
    libs: dict[str, str | None] = {}
    for mod in ("numpy", "onnx", "onnxruntime", "tensorrt", "pycuda", "cupy"):
        try:
            libs[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:
            libs[mod] = None
    try:
        from onnxruntime.capi import build_and_package_info as bpi

        libs["onnxruntime_cuda"] = getattr(bpi, "cuda_version", None)
    except Exception:
        pass
    info["libraries"] = libs
    return info


def device_slug(info: dict[str, Any]) -> str:
    name = info.get("gpu") or f"cpu-{info.get('cpu', 'unknown')}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


# --------------------------------------------------------------------------- measurement


def _options(v: Variant, max_batch: int, device_id: int, cache_dir: str | None) -> Any:
    from avatar import BackendOptions

    extra = dict(v.extra)
    if v.uint8_visual:
        extra["uint8_visual"] = True
    if cache_dir:
        extra["cache_dir"] = cache_dir
    if v.precision == "fp16" and v.backend != "cpu":
        extra["fp16_min_psnr"] = 0  # measured below instead (see the module note)
    return BackendOptions(device_id=device_id, precision=v.precision, max_batch=max_batch, extra=extra)


def measure(v: Variant, model: Path, args: argparse.Namespace, parity_feeds: dict[str, np.ndarray], reference: np.ndarray) -> dict[str, Any]:
    from avatar import get_plugin_manager
    from avatar.bench.model import compare_outputs, gpu_memory_mb, latency_stats, make_feeds

    pm = get_plugin_manager()
    row: dict[str, Any] = {"variant": v.label, "backend": v.backend, "precision": v.precision, "uint8_visual": v.uint8_visual}
    reg = pm.components["backend"].get(v.backend)
    avail = reg.availability() if reg else None
    if avail is None or not avail.usable:
        row.update(status="skipped", reason=avail.reason if avail else "not registered")
        return row
    is_cpu = v.backend == "cpu"
    batches = [b for b in args.batches if not is_cpu or b <= args.cpu_max_batch]
    repeats = args.cpu_repeats if is_cpu else args.repeats
    warmup = min(args.warmup, 1) if is_cpu else args.warmup
    mem_before = gpu_memory_mb()
    t0 = time.perf_counter()
    try:
        backend = reg.obj(model, _options(v, max(batches), args.device_id, args.cache_dir))
    except Exception as exc:  # record and go on: one broken variant must not lose the others
        row.update(status="failed", reason=f"{exc.__class__.__name__}: {exc}")
        return row
    row["load_s"] = round(time.perf_counter() - t0, 3)
    row["fp16_psnr_at_load"] = getattr(backend, "fp16_psnr", None)
    row["providers"] = getattr(backend, "providers", None)
    row["staging"] = getattr(backend, "staging", None)
    cells = []
    try:
        feeds = dict(parity_feeds)
        vis = next(t for t in backend.inputs if len(t.shape) == 4 and t.shape[1] == 6)
        if np.dtype(vis.dtype) == np.uint8:
            feeds[vis.name] = feeds.pop("__pixels__")
        else:
            feeds.pop("__pixels__")
        out = next(iter(backend.run(feeds).values()))
        row["parity"] = compare_outputs(reference, out)
        for b in batches:
            x = make_feeds(backend.inputs, b, seed=1000 + b)
            for _ in range(warmup):
                backend.run(x)
            calls = []
            for _ in range(repeats):
                t = time.perf_counter()
                backend.run(x)
                calls.append(time.perf_counter() - t)
            cell = {"batch": b, "warmup": warmup, **latency_stats(calls, b), "gpu_mem_mb": None if is_cpu else gpu_memory_mb()}
            cells.append(cell)
            log.info("%-20s batch %3d  median %8.2f ms  p95 %8.2f ms  %8.1f fps", v.label, b, cell["median_ms"], cell["p95_ms"], cell["fps"])
        row["status"] = "ok"
    except Exception as exc:
        row.update(status="failed", reason=f"{exc.__class__.__name__}: {exc}")
    finally:
        backend.close()
    row["cells"] = cells
    row["gpu_mem_before_mb"] = mem_before
    return row


# --------------------------------------------------------------------------- report


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = "| variant | batch | median ms | p95 ms | ms/frame | frames/s | GPU MiB | max abs vs cpu | PSNR dB |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r.get("parity") or {}
        if r.get("status") != "ok":
            lines.append(f"| {r['variant']} | - | {r.get('status')}: {str(r.get('reason', ''))[:90]} | | | | | | |")
            continue
        for c in r["cells"]:
            lines.append(
                f"| {r['variant']} | {c['batch']} | {_fmt(c['median_ms'])} | {_fmt(c['p95_ms'])} | {_fmt(c['ms_per_frame'])} | "
                f"{_fmt(c['fps'], '.1f')} | {_fmt(c['gpu_mem_mb'], '.0f')} | {_fmt(p.get('max_abs'), '.2e')} | "
                f"{'identical' if p.get('identical') else _fmt(p.get('psnr_db'), '.1f')} |"
            )
    return lines


def markdown(doc: dict[str, Any]) -> str:
    d = doc["device"]
    libs = ", ".join(f"{k} {v}" for k, v in d["libraries"].items() if v)
    lines = [
        f"# Backend benchmark: {d.get('gpu') or d['cpu']}",
        "",
        f"- GPU: {d.get('gpu', 'none')} (driver {d.get('driver', '-')}, CUDA {d.get('cuda_driver_api', '-')}, "
        f"compute capability {d.get('compute_capability', '-')}, {d.get('gpu_memory', '-')})",
        f"- CPU: {d['cpu']} ({d['cpu_count']} logical cores); Python {d['python']}; {libs}",
        f"- Model: {doc['model']['path']} ({doc['model']['kind']}); inputs: random, seeded; parity batch {doc['settings']['parity_batch']}",
        f"- Timing: {doc['settings']['warmup']} warm-up calls excluded, {doc['settings']['repeats']} timed calls per cell "
        f"(cpu: {doc['settings']['cpu_repeats']}); latency is one `Backend.run` incl. host<->device copies",
        f"- Date: {doc['date']}",
        "",
        *table(doc["results"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="ONNX UNet-328 (default: the full-size synthetic model)")
    ap.add_argument("--tiny", action="store_true", help="use the tiny synthetic model (smoke runs)")
    ap.add_argument("--batches", default="1,4,16,64", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per cell (GPU variants)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls per cell before timing")
    ap.add_argument("--cpu-repeats", type=int, default=3, help="timed calls per cell for the cpu backend")
    ap.add_argument("--cpu-max-batch", type=int, default=16, help="largest batch measured on the cpu backend")
    ap.add_argument("--variants", default="", help="comma-separated variant labels to run (default: all)")
    ap.add_argument("--device-id", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="converted models / engines cache (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    args.batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from avatar.models.synthetic import make_unet, sample_audio, sample_visual

    tmp = Path(tempfile.mkdtemp(prefix="avatar-gpu-bench-"))
    if args.cache_dir is None:
        args.cache_dir = str(tmp / "cache")
    if args.model is None:
        model = make_unet(tmp / ("tiny.onnx" if args.tiny else "unet328.onnx"), tiny=args.tiny, seed=0)
        kind = f"synthetic calibrated UNet-328 (AVE){' tiny' if args.tiny else ''}, seed 0"
    else:
        model, kind = args.model, "user model"
    from avatar import get_plugin_manager
    from avatar.contract import read_contract

    c = read_contract(model)
    if c.visual_uint8:
        print("error: pass a model with a float visual input; the uint8 variants are made from it", file=sys.stderr)
        return 2
    parity_batch = min(4, max(args.batches))
    pixels = np.round(sample_visual(parity_batch, seed=7) * 255).astype(np.uint8)
    audio = sample_audio(c.feature_type, parity_batch, seed=7)
    parity_feeds = {c.visual.name: pixels.astype(np.float32) / 255, c.audio.name: audio, "__pixels__": pixels}
    with get_plugin_manager().backend_class("cpu")(model) as ref:
        reference = ref.run({c.visual.name: parity_feeds[c.visual.name], c.audio.name: audio})[c.output.name]

    wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
    unknown = wanted - {v.label for v in VARIANTS}
    if unknown:
        print(f"error: unknown variant(s) {sorted(unknown)}; choose from {[v.label for v in VARIANTS]}", file=sys.stderr)
        return 2
    rows = [measure(v, model, args, parity_feeds, reference) for v in VARIANTS if not wanted or v.label in wanted]
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "device": describe_device(),
        "model": {"path": str(model if args.model else model.name), "kind": kind, "contract": c.describe()},
        "settings": {"batches": args.batches, "repeats": args.repeats, "warmup": args.warmup,
                     "cpu_repeats": args.cpu_repeats, "cpu_max_batch": args.cpu_max_batch, "parity_batch": parity_batch},  # fmt: skip
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu_{device_slug(doc['device'])}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(doc))
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nwrote {stem}.json and {stem}.md\n")
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
