"""The benchmark harness behind ``avatar bench``: backends compared on the same model and inputs.

Three measurements, all in one run on one machine (nothing is projected):

* **model only** (:mod:`avatar.bench.model`): per backend and batch size,
  call latency percentiles, frames/s, peak memory, and the cold start (model
  load + first inference); each backend in a fresh process by default;
* **correctness cross-check**: every backend's output on the same seeded
  inputs against the ``cpu`` backend (max |difference|, PSNR);
* **end to end** (:mod:`avatar.bench.e2e`): a real render of real speech to an
  H.264 + AAC file with per-stage times, and the upstream-style synchronous
  per-frame loop as the baseline the SDK is compared with.

:func:`run_bench` returns the result document (plain JSON data);
:func:`write_reports` writes it as JSON, Markdown and a PNG chart
(:mod:`avatar.bench.report`).

Example::

    from avatar.bench import BenchConfig, run_bench, write_reports
    result = run_bench(BenchConfig(backends=["cpu"], batch_sizes=[1, 4]))
    write_reports(result, "benchmarks/results", "cpu_ci-2core")
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import AvatarError, ConfigError

log = logging.getLogger(__name__)

SCHEMA = "avatar-bench/1"
MODES = ("model", "e2e", "all")
REFERENCE_BACKEND = "cpu"
#: frames in the cross-check batch (every backend runs exactly these inputs)
CHECK_FRAMES = 2


@dataclass
class BenchConfig:
    """Everything a benchmark run needs; every field is an ``avatar bench`` option."""

    mode: str = "all"
    #: backend names, optionally at a precision (``openvino:bf16``); None = every registered backend usable here
    backends: Sequence[str] | None = None
    #: the int8 model ``NAME:int8`` backends run (``avatar quantize`` makes it from ``model``)
    int8_model: Path | None = None
    #: model-only batch sizes; None = 1,4,16 on CPU-only runs, 1,4,16,64 when a GPU backend is measured
    batch_sizes: Sequence[int] | None = None
    #: batch sizes of the end-to-end renders; None = ``batch_sizes``
    e2e_batch_sizes: Sequence[int] | None = None
    #: least number of timed calls per model-only cell
    repeats: int = 5
    #: untimed calls before each model-only cell
    warmup: int = 2
    #: time budget per model-only cell (timed calls go on until it is spent)
    cell_seconds: float = 5.0
    #: seconds of speech rendered end to end
    seconds: float = 10.0
    #: UNet-328 ONNX; None = the harness's seeded full-size test model
    model: Path | None = None
    #: use tiny seeded test models (tests only: same contract, a few percent of the cost)
    tiny: bool = False
    #: avatar package or SyncTalk_2D folder; None = the real sanders data if present, else synthetic
    avatar: Path | None = None
    #: frames imported from a SyncTalk_2D folder (renders ping-pong over them)
    avatar_frames: int = 100
    #: speech file; None = the real clip beside the repository if present, else synthetic
    audio: Path | None = None
    #: auto | torch | onnxruntime | none
    baseline: str = "auto"
    #: frames the baseline renders; None = as many as the end-to-end render
    baseline_frames: int | None = None
    #: intra-op threads of every ONNX Runtime session the harness makes (the UNet's: model-only,
    #: cross-check reference, end-to-end, ONNX Runtime baseline; the ave encoder's) and PyTorch's; None = all cores
    threads: int | None = None
    device_id: int = 0
    #: measure each backend's model-only cells in a fresh process (clean peak memory)
    isolate: bool = True
    #: where test models and imported avatars are cached; None = the avatar-sdk cache
    cache_dir: Path | None = None
    seed: int = 0

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        for what, sizes in (("--batch-sizes", self.batch_sizes or [1]), ("--e2e-batch-sizes", self.e2e_batch_sizes or [1])):
            if not sizes or any(int(b) < 1 for b in sizes):
                raise ConfigError(f"{what} needs positive integers, e.g. 1,4,16; got {list(sizes)}")
        if self.repeats < 1 or self.warmup < 0 or self.cell_seconds < 0:
            raise ConfigError("--repeats must be >= 1, --warmup >= 0 and --cell-seconds >= 0")
        if self.threads is not None and int(self.threads) < 1:
            # caught here, not per backend: the backends would each be skipped with the same error
            raise ConfigError(f"--threads must be at least 1 (leave it out for all cores), not {self.threads}")
        if self.baseline not in ("auto", "torch", "onnxruntime", "none"):
            raise ConfigError(f"--baseline must be auto, torch, onnxruntime or none, not {self.baseline!r}")


# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    """The CPU's marketing name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary(load_start: Sequence[float]) -> dict[str, Any]:
    """CPU name, usable cores and the load average at the start (given) and now, for a benchmark's result."""
    return {"cpu": cpu_model(), "cores": usable_cores(), "load_start": [round(x, 2) for x in load_start],
            "load_end": [round(x, 2) for x in os.getloadavg()]}


def write_result(out: str | None, result: dict[str, Any], markdown: str) -> None:
    """With ``out``, write ``OUT.json`` (``result``) and ``OUT.md`` (``markdown``)."""
    import json

    if out:
        Path(out + ".json").write_text(json.dumps(result, indent=1, default=float) + "\n")
        Path(out + ".md").write_text(markdown)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def gpus() -> list[dict[str, Any]]:
    """GPUs with name, driver and memory from ``nvidia-smi`` (empty without one)."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            found.append({"name": parts[0], "driver": parts[1], "memory_mb": float(parts[2]) if parts[2].isdigit() else None})
    return found


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries the numbers depend on (None when not installed)."""
    import importlib.metadata as md

    names = {
        "avatar-sdk": "avatar-sdk",
        "numpy": "numpy",
        "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
        "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
        "av": "av",
        "torch": "torch",
        "tensorrt": "tensorrt",
    }
    out: dict[str, str | None] = {}
    for key, dists in names.items():
        out[key] = None
        for d in (dists,) if isinstance(dists, str) else dists:
            try:
                out[key] = md.version(d)
                break
            except md.PackageNotFoundError:
                continue
    return out


def environment() -> dict[str, Any]:
    """The machine a result was measured on."""
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    g = gpus()
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "memory_gb": mem_gb,
        "gpus": g,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": library_versions(),
        "load_avg_1m_at_start": load_average(),
    }


def load_average() -> float | None:
    """1-minute load average: other work on the machine skews timings, so reports record it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def hardware_label(env: dict[str, Any]) -> str:
    """One line naming the hardware, for report titles."""
    cpu = f"{env['cpu_model']}, {env['cpu_cores']} cores"
    if env.get("gpus"):
        g = env["gpus"][0]
        return f"{g['name']} (driver {g['driver']}) + {cpu}"
    return f"{cpu}, no GPU"


def default_name(env: dict[str, Any] | None = None) -> str:
    """Results file stem derived from the machine, e.g. ``cpu-2core-intel-xeon-processor``."""
    import re

    env = env or environment()

    def slug(s: str) -> str:
        s = re.sub(r"\((r|tm)\)|cpu|@.*$", "", s.lower())
        return re.sub(r"[^a-z0-9]+", "-", s).strip("-")[:40]

    if env.get("gpus"):
        return f"gpu-{slug(env['gpus'][0]['name'])}"
    return f"cpu-{env['cpu_cores']}core-{slug(env['cpu_model'])}"


# --------------------------------------------------------------------------- helpers


def bench_cache(explicit: Path | None) -> Path:
    if explicit is not None:
        return Path(explicit)
    base = os.environ.get("AVATAR_CACHE_DIR")
    root = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "avatar-sdk"
    return root / "bench"


def usable_backends() -> list[str]:
    """Registered backends whose availability check passes, ``cpu`` first."""
    from ..plugins import get_plugin_manager

    regs = get_plugin_manager().components["backend"]
    names = [n for n, r in regs.items() if r.availability().usable]
    return sorted(names, key=lambda n: (n != REFERENCE_BACKEND, n))


def default_batch_sizes(backends: Sequence[str]) -> list[int]:
    """1,4,16 for CPU-only runs; GPUs also get 64, where large batches pay off."""
    return [1, 4, 16, 64] if any(b.split(":")[0] not in (REFERENCE_BACKEND, "openvino") for b in backends) else [1, 4, 16]


def feature_backend(backend: str) -> str:
    """The backend the AVE audio encoder runs on during a render with ``backend``: on the GPU when there is one."""
    if backend.split(":")[0] not in (REFERENCE_BACKEND, "openvino") and "onnx-cuda" in usable_backends():
        return "onnx-cuda"
    return REFERENCE_BACKEND


def _generator_version() -> str:
    """Hash of the test-model generator's code: a cached model made by older code is rebuilt.

    (The PyTorch baseline loads ``unet_state_dict`` from the current code; a
    stale cached ONNX model would make the two networks differ.)
    """
    import hashlib

    from ..models import onnx_builder, synthetic

    h = hashlib.sha256()
    for mod in (synthetic, onnx_builder):
        h.update(Path(mod.__file__ or "").read_bytes())
    return h.hexdigest()[:10]


def _test_models(cfg: BenchConfig, cache: Path) -> tuple[Path, Path, bool]:
    """(unet, audio encoder, whether the unet is the harness's seeded model)."""
    from ..models.synthetic import make_audio_encoder, make_unet

    suffix = f"seed{cfg.seed}{'-tiny' if cfg.tiny else ''}-{_generator_version()}"
    enc = cache / f"ave-encoder-{suffix}.onnx"
    if not enc.is_file():
        make_audio_encoder(enc, seed=cfg.seed, tiny=cfg.tiny)
    if cfg.model is not None:
        if not Path(cfg.model).is_file():
            raise ConfigError(f"--model {cfg.model} does not exist")
        return Path(cfg.model), enc, False
    unet = cache / f"unet-ave-{suffix}.onnx"
    if not unet.is_file():
        log.info("building the seeded test model %s", unet)
        make_unet(unet, mode="ave", seed=cfg.seed, tiny=cfg.tiny)
    return unet, enc, not cfg.tiny


def variant_model(cfg: BenchConfig, backend: str, model: Path) -> Path:
    """The model file a backend spec runs: the int8 model for ``NAME:int8``, else ``model``."""
    return Path(cfg.int8_model) if backend.endswith(":int8") and cfg.int8_model else model


def _check_inputs(model: Path, path: Path, seed: int) -> dict[str, np.ndarray]:
    from ..contract import read_io
    from .model import make_feeds

    inputs, _, _ = read_io(model)
    feeds = make_feeds(inputs, CHECK_FRAMES, seed + 9999)
    np.savez(path, **feeds)
    return feeds


# --------------------------------------------------------------------------- run


def run_bench(config: BenchConfig | None = None, *, progress: Any = None) -> dict[str, Any]:
    """Run the benchmark described by ``config``; return the result document.

    ``progress`` (optional) is called with one-line status messages.
    """
    from ..contract import read_contract

    cfg = config or BenchConfig()
    cfg.check()
    say = progress or (lambda msg: log.info("%s", msg))
    env = environment()
    cache = bench_cache(cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    available = usable_backends()
    wanted = list(cfg.backends) if cfg.backends else available
    skipped = {b: "not registered or not usable on this machine (see `avatar plugins`)" for b in wanted if b.split(":")[0] not in available}
    backends = [b for b in wanted if b.split(":")[0] in available]
    if cfg.int8_model is None:
        skipped.update({b: "no --int8-model given (make one with `avatar quantize`)" for b in backends if b.endswith(":int8")})
        backends = [b for b in backends if not b.endswith(":int8")]
    if not backends:
        raise ConfigError(f"none of the backends {', '.join(wanted)} is usable here; usable: {', '.join(available) or 'none'}")
    batches = sorted({int(b) for b in (cfg.batch_sizes or default_batch_sizes(backends))})
    e2e_batches = sorted({int(b) for b in (cfg.e2e_batch_sizes or batches)})

    say("preparing models")
    model, encoder, seeded = _test_models(cfg, cache)
    contract = read_contract(model)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": env,
        "hardware": hardware_label(env),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "model": {
            "path": str(model),
            "seeded_test_model": seeded or cfg.tiny,
            "tiny": cfg.tiny,
            "feature_type": contract.feature_type,
            "visual": contract.describe()["visual"],
            "note": "untrained seeded weights: speed and numerical agreement are meaningful, the picture is not"
            if (seeded or cfg.tiny) else "user-supplied model",
        },
        "backends": {},
        "skipped": skipped,
        "model_only": [],
        "crosscheck": [],
        "e2e": None,
        "baseline": None,
    }
    result["settings"]["backends"] = backends
    result["settings"]["batch_sizes"] = batches
    result["settings"]["e2e_batch_sizes"] = e2e_batches

    with tempfile.TemporaryDirectory(prefix="avatar-bench-") as tmp_s:
        tmp = Path(tmp_s)
        check = _check_inputs(model, tmp / "check.npz", cfg.seed)
        reference = None
        if cfg.mode in ("model", "all"):
            say(f"model only: {', '.join(backends)} at batch {', '.join(map(str, batches))}")
            reference = _model_only(cfg, result, backends, batches, model, tmp, check)
        model_fps = {(c["backend"], c["batch"]): c["fps"] for c in result["model_only"]}
        if cfg.mode in ("e2e", "all"):
            _end_to_end(cfg, result, backends, e2e_batches, model, encoder, seeded, cache, tmp, model_fps, check, reference, say)
    result["machine"]["load_avg_1m_at_end"] = load_average()
    result["summary"] = summarize(result)
    return result


def _model_only(
    cfg: BenchConfig, result: dict[str, Any], backends: list[str], batches: list[int], model: Path, tmp: Path,
    check: dict[str, np.ndarray],
) -> np.ndarray | None:  # fmt: skip
    from . import model as bench_model

    outputs: dict[str, np.ndarray] = {}
    for name in backends:
        spec = {
            "backend": name,
            "model": str(variant_model(cfg, name, model)),
            "batch_sizes": batches,
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "cell_seconds": cfg.cell_seconds,
            "threads": cfg.threads,
            "device_id": cfg.device_id,
            "seed": cfg.seed,
            "check_inputs": str(tmp / "check.npz"),
            "check_output": str(tmp / f"check-{name}.npy"),
        }
        log.info("model-only: %s, batches %s", name, batches)
        try:
            res = bench_model.measure_in_subprocess(spec, tmp) if cfg.isolate else bench_model.measure_backend(spec)
        except AvatarError as exc:
            result["skipped"][name] = str(exc)
            continue
        cells = res.pop("cells")
        res["isolated_process"] = cfg.isolate
        result["backends"][name] = res
        result["model_only"].extend(cells)
        outputs[name] = np.load(spec["check_output"])
    # The reference is a cpu session of its own (not the measured one), so the
    # cpu row also shows that ONNX Runtime's CPU results are reproducible.
    reference = _reference_output(model, check, cfg.threads)
    for name, out in outputs.items():
        row = {"backend": name, "reference": REFERENCE_BACKEND, "frames": CHECK_FRAMES}
        row.update(_compare(reference, out))
        result["crosscheck"].append(row)
    return reference


def _reference_output(model: Path, check: dict[str, np.ndarray], threads: int | None) -> np.ndarray:
    from ..interfaces import BackendOptions
    from ..plugins import get_plugin_manager

    with get_plugin_manager().backend_class(REFERENCE_BACKEND)(model, BackendOptions(max_batch=CHECK_FRAMES, threads=threads)) as be:
        return next(iter(be.run(check).values()))


def _compare(reference: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    from .model import compare_outputs

    return compare_outputs(reference, out)


def _end_to_end(
    cfg: BenchConfig, result: dict[str, Any], backends: list[str], batches: list[int], model: Path, encoder: Path,
    seeded: bool, cache: Path, tmp: Path, model_fps: dict[tuple[str, int], float], check: dict[str, np.ndarray],
    reference: np.ndarray | None, say: Any,
) -> None:  # fmt: skip
    from . import e2e as bench_e2e

    say("preparing the avatar and audio")
    avatar = bench_e2e.prepare_avatar(cfg.avatar, cache, frames=cfg.avatar_frames, seed=cfg.seed)
    pcm, audio_desc = bench_e2e.load_bench_audio(cfg.audio, cfg.seconds, seed=cfg.seed)
    runs: list[dict[str, Any]] = []
    for name in backends:
        if name in result["skipped"]:
            continue
        for b in batches:
            say(f"end to end: {name}, batch {b}")
            try:
                base, _, precision = name.partition(":")
                d = bench_e2e.run_render(
                    avatar, pcm, model=variant_model(cfg, name, model), encoder=encoder, backend=base, batch_size=b,
                    out_file=tmp / f"e2e-{name.replace(':', '-')}-{b}.mp4", threads=cfg.threads, device_id=cfg.device_id,
                    feature_backend=feature_backend(name), precision=precision or "fp32",
                )  # fmt: skip
                d["backend"] = name
                d["load_avg_1m_at_end"] = load_average()  # a shared machine: the load this render met
            except AvatarError as exc:
                result["skipped"][f"{name} e2e batch {b}"] = str(exc)
                continue
            mfps = model_fps.get((name, b))
            d["model_only_fps"] = mfps
            d["e2e_over_model"] = d["frames_per_s"] / mfps if mfps else None
            runs.append(d)
    result["e2e"] = {
        "avatar": avatar.describe(),
        "audio": {"source": audio_desc, "seconds": len(pcm) / bench_e2e.SAMPLE_RATE},
        "sink": "file (H.264 + AAC, preset veryfast, crf 20)",
        "runs": runs,
    }
    if cfg.baseline == "none":
        return
    say("baseline: upstream-style synchronous per-frame loop")
    net = bench_e2e.make_baseline_net(
        cfg.baseline, model=model, seeded=seeded, mode=result["model"]["feature_type"], seed=cfg.seed, threads=cfg.threads
    )
    frames = cfg.baseline_frames or (max((r["frames"] for r in runs), default=0) or int(cfg.seconds * 25))
    base = bench_e2e.run_baseline(
        avatar, pcm, net=net, encoder=encoder, frames=frames, out_file=tmp / "baseline.mp4", threads=cfg.threads
    )
    if reference is None:
        reference = _reference_output(model, check, cfg.threads)
    base["crosscheck"] = _compare(reference, bench_e2e.baseline_crosscheck(net, check))
    base["crosscheck"]["reference"] = REFERENCE_BACKEND
    result["baseline"] = base
    for r in runs:
        r["speedup_vs_baseline"] = r["frames_per_s"] / base["frames_per_s"] if base["frames_per_s"] else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Headline figures: best model-only and end-to-end cells, and the speed-up over the baseline."""
    out: dict[str, Any] = {}
    cells = result.get("model_only") or []
    if cells:
        best = max(cells, key=lambda c: c["fps"])
        out["best_model_only"] = {"backend": best["backend"], "batch": best["batch"], "fps": best["fps"], "ms_per_frame": best["ms_per_frame"]}
    runs = (result.get("e2e") or {}).get("runs") or []
    if runs:
        best = max(runs, key=lambda r: r["frames_per_s"])
        out["best_e2e"] = {
            "backend": best["backend"], "batch": best["batch_size"], "fps": best["frames_per_s"],
            "realtime_factor": best["realtime_factor"], "e2e_over_model": best.get("e2e_over_model"),
        }  # fmt: skip
        base = result.get("baseline")
        if base:
            out["baseline_fps"] = base["frames_per_s"]
            out["baseline_engine"] = base["engine"]
            out["speedup_vs_baseline"] = best.get("speedup_vs_baseline")
    return out


def write_reports(result: dict[str, Any], out_dir: str | Path, name: str | None = None) -> dict[str, Path]:
    """Write ``NAME.json``, ``NAME.md`` and ``NAME.png`` into ``out_dir``; return their paths."""
    from .report import write_all

    return write_all(result, Path(out_dir), name or default_name(result.get("machine")))
