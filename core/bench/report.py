"""Benchmark reports: the JSON document, a Markdown summary and a PNG chart.

Every report names the hardware it was measured on and shows only measured
numbers (medians and percentiles of timed calls, wall times of real renders).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    return f"{v:.{digits}f}"


def _psnr(row: dict[str, Any]) -> str:
    return "identical" if row.get("identical") else f"{_f(row.get('psnr_db'))} dB"


def markdown(result: dict[str, Any]) -> str:
    """The Markdown report of a result document."""
    env = result["machine"]
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v)
    lines = [
        f"# avatar-sdk benchmark: {result.get('name', '')}".rstrip(": "),
        "",
        f"**Hardware:** {result['hardware']}  ",
        f"**Memory:** {_f(env.get('memory_gb'))} GiB; {env['os']}; Python {env['python']}  ",
        f"**Libraries:** {libs}  ",
        f"**Measured:** {result['created']}; 1-minute load average {_f(env.get('load_avg_1m_at_start'), 2)} at start, "
        f"{_f(env.get('load_avg_1m_at_end'), 2)} at end (other work on the machine slows every figure)  ",
        f"**Model:** UNet-328 ({result['model']['feature_type']}), "
        f"{'tiny ' if result['model']['tiny'] else ''}{result['model']['note']}  ",
        f"**Threads:** {result['settings'].get('threads') or 'all cores'} per ONNX Runtime session",
        "",
    ]
    s = result["settings"]
    cells = result.get("model_only") or []
    checks = {c["backend"]: c for c in result.get("crosscheck") or []}
    if cells:
        lines += [
            "## Model only (one inference call per row's batch)",
            "",
            f"Warm-up {s['warmup']} calls excluded; at least {s['repeats']} timed calls and "
            f"{_f(s['cell_seconds'])} s per cell. Latency is per call; frames/s = batch / median call. "
            "Peak RSS is the process's peak so far (batch sizes run in ascending order"
            f"{', one fresh process per backend' if s.get('isolate') else ''}).",
            "",
            "| backend | batch | calls | median ms | p95 ms | p99 ms | ms/frame | frames/s | peak RSS MiB | GPU MiB | max abs diff vs cpu | PSNR vs cpu |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for c in cells:
            chk = checks.get(c["backend"], {})
            lines.append(
                f"| {c['backend']} | {c['batch']} | {c['calls']} | {_f(c['median_ms'])} | {_f(c['p95_ms'])} | "
                f"{_f(c['p99_ms'])} | {_f(c['ms_per_frame'])} | {_f(c['fps'])} | {_f(c.get('rss_peak_mb'), 0)} | "
                f"{_f(c.get('gpu_mem_mb'), 0)} | {_f(chk.get('max_abs'), 7) if chk else '–'} | {_psnr(chk) if chk else '–'} |"
            )
        lines += ["", "### Cold start (fresh process: model load, then the first batch-1 inference)", "",
                  "| backend | model load s | first inference s | time to first result s | RSS after load MiB |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, b in result.get("backends", {}).items():
            lines.append(
                f"| {name} | {_f(b.get('load_s'), 2)} | {_f(b.get('first_infer_s'), 3)} | "
                f"{_f(b.get('time_to_first_result_s'), 2)} | {_f(b.get('rss_after_load_mb'), 0)} |"
            )
        lines.append("")
    e2e = result.get("e2e")
    if e2e:
        a = e2e["avatar"]
        lines += [
            "## End to end (real render: speech → features → UNet → compositing → H.264 + AAC file)",
            "",
            f"Avatar: {a['kind']} ({a['frames']} frames, {a['width']}x{a['height']}); audio: "
            f"{_f(e2e['audio']['seconds'])} s of {e2e['audio']['source']}; sink: {e2e['sink']}. "
            "Model load is excluded; stage columns are busy time per frame of concurrent stages "
            "(they overlap, so they add up to more than the wall time).",
            "",
        ]
        runs = e2e.get("runs") or []
        if runs:
            stages = list(runs[0]["stage_ms_per_frame"])
            lines += [
                "| backend | batch | frames | wall s | frames/s | real-time factor | e2e / model-only fps | vs baseline | "
                + " | ".join(f"{st} ms/f" for st in stages) + " |",
                "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(stages),
            ]
            for r in runs:
                ratio = r.get("e2e_over_model")
                speed = r.get("speedup_vs_baseline")
                lines.append(
                    f"| {r['backend']} | {r['batch_size']} | {r['frames']} | {_f(r['wall_s'], 2)} | {_f(r['frames_per_s'])} | "
                    f"{_f(r['realtime_factor'], 2)}x | {_f(ratio, 2) if ratio else '–'} | {_f(speed, 2) + 'x' if speed else '–'} | "
                    + " | ".join(_f(r["stage_ms_per_frame"].get(st)) for st in stages) + " |"
                )
            lines.append("")
    base = result.get("baseline")
    if base:
        steps = base["step_ms_per_frame"]
        lines += [
            "## Baseline: the upstream-style synchronous loop (same frames, audio, weights, machine)",
            "",
            f"Engine: {base['engine']}. For each frame in turn: read the avatar frame ({base['reads']}) → crop and mask → "
            "infer one frame → paste back → `cv2.VideoWriter`; audio features for the whole clip first. "
            "No audio mux (upstream runs ffmpeg afterwards), which flatters the baseline.",
            "",
            "| frames | features s | loop s | frames/s (incl. features) | "
            + " | ".join(f"{k} ms/f" for k in steps) + " | max abs diff vs cpu | PSNR vs cpu |",
            "|---:|---:|---:|---:|" + "---:|" * len(steps) + "---:|---|",
            f"| {base['frames']} | {_f(base['features_s'], 2)} | {_f(base['loop_wall_s'], 2)} | {_f(base['frames_per_s'])} | "
            + " | ".join(_f(v) for v in steps.values())
            + f" | {_f(base['crosscheck']['max_abs'], 7)} | {_psnr(base['crosscheck'])} |",
            "",
        ]
    summ = result.get("summary") or {}
    if summ:
        lines += ["## Summary", ""]
        if "best_model_only" in summ:
            m = summ["best_model_only"]
            lines.append(f"- Best model-only: **{_f(m['fps'])} frames/s** ({m['backend']}, batch {m['batch']}).")
        if "best_e2e" in summ:
            e = summ["best_e2e"]
            lines.append(
                f"- Best end to end: **{_f(e['fps'])} frames/s**, {_f(e['realtime_factor'], 2)}x real time "
                f"({e['backend']}, batch {e['batch']})."
            )
        if summ.get("speedup_vs_baseline"):
            lines.append(
                f"- The SDK pipeline is **{_f(summ['speedup_vs_baseline'], 2)}x** the upstream-style loop "
                f"({_f(summ['baseline_fps'])} frames/s with {summ['baseline_engine']})."
            )
        lines.append("")
    if result.get("skipped"):
        lines += ["## Not measured", ""] + [f"- {k}: {v}" for k, v in result["skipped"].items()] + [""]
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> Path:
    """PNG: model-only and end-to-end frames/s per backend and batch size, and the stage breakdown."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("the benchmark chart needs matplotlib: pip install 'avatar-sdk[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result.get("model_only") or []
    runs = ((result.get("e2e") or {}).get("runs")) or []
    base = result.get("baseline")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    # throughput: one group per backend, one bar pair (model / e2e) per batch size
    keys = sorted({(c["backend"], c["batch"]) for c in cells} | {(r["backend"], r["batch_size"]) for r in runs},
                  key=lambda k: (k[0] != "cpu", k[0], k[1]))  # fmt: skip
    labels = [f"{b}\nbatch {n}" for b, n in keys]
    mfps = {(c["backend"], c["batch"]): c["fps"] for c in cells}
    efps = {(r["backend"], r["batch_size"]): r["frames_per_s"] for r in runs}
    x = list(range(len(keys)))
    w = 0.38
    ax1.bar([i - w / 2 for i in x], [mfps.get(k, 0) for k in keys], w, label="model only", color="#4477aa")
    ax1.bar([i + w / 2 for i in x], [efps.get(k, 0) for k in keys], w, label="end to end", color="#ee7733")
    if base:
        ax1.axhline(base["frames_per_s"], color="#aa3377", ls="--", label=f"upstream-style baseline ({base['frames_per_s']:.1f})")
    ax1.set_xticks(x, labels, fontsize=8)
    ax1.set_ylabel("frames / s (higher is better)")
    ax1.set_title("Throughput")
    ax1.legend(fontsize=8)
    # stage breakdown: ms per frame, one horizontal bar per render (and the baseline)
    rows: list[tuple[str, dict[str, float], float]] = []
    for r in runs:
        rows.append((f"{r['backend']} b{r['batch_size']}", r["stage_ms_per_frame"], 1000.0 / r["frames_per_s"] if r["frames_per_s"] else 0))
    if base:
        rows.append(("baseline", base["step_ms_per_frame"], 1000.0 / base["loop_frames_per_s"]))
    names = list(dict.fromkeys(k for _, st, _ in rows for k in st))
    colors = plt.get_cmap("tab10")
    for j, name in enumerate(names):
        left = [sum(st.get(n, 0.0) for n in names[:j]) for _, st, _ in rows]
        ax2.barh(range(len(rows)), [st.get(name, 0.0) for _, st, _ in rows], left=left, color=colors(j % 10), label=name)
    ax2.scatter([wall for _, _, wall in rows], range(len(rows)), marker="|", s=300, color="black", label="wall ms/frame", zorder=3)
    ax2.set_yticks(range(len(rows)), [n for n, _, _ in rows], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("ms per frame (stage busy time; stages overlap in the SDK)")
    ax2.set_title("Where the time goes")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"avatar-sdk benchmark — {result['hardware']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _jsonable(v.item())
    return v


def write_all(result: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    """Write ``NAME.json``, ``NAME.md`` and ``NAME.png``; return their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = _jsonable({**result, "name": name})
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(markdown(doc))
    chart(doc, paths["png"])
    return paths
