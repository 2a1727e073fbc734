"""The benchmark harness (``avatar bench``) on tiny seeded models: real sessions, real renders, real files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytest
from click.testing import CliRunner

from avatar.bench import BenchConfig, default_name, environment, run_bench, write_reports
from avatar.bench.e2e import write_synthetic_synctalk
from avatar.bench.model import compare_outputs, latency_stats, make_feeds
from avatar.cli import cli
from avatar.errors import ConfigError
from avatar.hookspecs import hookimpl
from avatar.interfaces import Backend, BackendOptions, TensorInfo
from avatar.plugins import get_plugin_manager, reset_plugin_manager

TINY = dict(tiny=True, repeats=2, warmup=1, cell_seconds=0.0, avatar_frames=6)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A synthetic SyncTalk_2D folder, a speech-like WAV and a model cache shared by the tests."""
    from avatar.demo import speechlike_audio, write_wav

    root = tmp_path_factory.mktemp("bench")
    folder = write_synthetic_synctalk(root / "synctalk", 6, width=640, height=360, seed=1)
    wav = root / "speech.wav"
    write_wav(wav, speechlike_audio(2.0, seed=3))
    return {"root": root, "avatar": folder, "audio": wav, "cache": root / "cache"}


@pytest.fixture(scope="module")
def full_run(workdir: dict[str, Path]) -> tuple[dict[str, Any], dict[str, Path]]:
    cfg = BenchConfig(
        backends=["cpu"], batch_sizes=[1, 2], e2e_batch_sizes=[2], seconds=0.6, avatar=workdir["avatar"],
        audio=workdir["audio"], baseline="onnxruntime", isolate=False, cache_dir=workdir["cache"], **TINY,
    )  # fmt: skip
    result = run_bench(cfg)
    paths = write_reports(result, workdir["root"] / "out", "tiny")
    return result, paths


def test_reports_exist_and_parse(full_run: tuple[dict[str, Any], dict[str, Path]]) -> None:
    result, paths = full_run
    assert set(paths) == {"json", "md", "png"}
    doc = json.loads(paths["json"].read_text())
    assert doc["schema"] == "avatar-bench/1" and doc["name"] == "tiny"
    md = paths["md"].read_text()
    assert doc["hardware"] in md and "| cpu | 2 |" in md and "## Baseline" in md
    import matplotlib.image

    img = matplotlib.image.imread(paths["png"])
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_environment_is_recorded(full_run: tuple[dict[str, Any], dict[str, Path]]) -> None:
    env = full_run[0]["machine"]
    assert env["cpu_model"] and env["cpu_cores"] >= 1
    libs = env["libraries"]
    for key in ("numpy", "onnxruntime", "opencv", "av"):
        assert libs[key], key
    assert isinstance(env["gpus"], list)
    assert "load_avg_1m_at_start" in env and "load_avg_1m_at_end" in env


def test_model_only_cells(full_run: tuple[dict[str, Any], dict[str, Path]]) -> None:
    result = full_run[0]
    cells = result["model_only"]
    assert [(c["backend"], c["batch"]) for c in cells] == [("cpu", 1), ("cpu", 2)]
    for c in cells:
        assert c["median_ms"] <= c["p95_ms"] <= c["p99_ms"] <= c["max_ms"]
        assert c["min_ms"] <= c["median_ms"]
        # cell_seconds=0: exactly the requested number of timed calls
        assert c["calls"] == 2 and c["warmup"] == 1
        assert c["fps"] == pytest.approx(1000.0 * c["batch"] / c["median_ms"])
        assert c["rss_peak_mb"] > 0
    cold = result["backends"]["cpu"]
    assert cold["load_s"] > 0 and cold["first_infer_s"] > 0
    assert cold["time_to_first_result_s"] == pytest.approx(cold["load_s"] + cold["first_infer_s"])
    assert cold["pid"] == os.getpid()  # isolate=False measured in this process


def test_crosscheck_cpu_against_itself_is_exact(full_run: tuple[dict[str, Any], dict[str, Path]]) -> None:
    (row,) = full_run[0]["crosscheck"]
    assert row["backend"] == "cpu" and row["reference"] == "cpu"
    assert row["max_abs"] == 0.0 and row["identical"] and row["psnr_db"] is None


def test_e2e_ratio_and_baseline_speedup(full_run: tuple[dict[str, Any], dict[str, Path]]) -> None:
    result = full_run[0]
    e2e = result["e2e"]
    assert e2e["avatar"]["kind"] == "synctalk" and e2e["avatar"]["frames"] == 6
    (run,) = e2e["runs"]
    assert run["backend"] == "cpu" and run["batch_size"] == 2
    assert run["frames"] == 15  # 0.6 s at 25 fps
    assert run["output_bytes"] > 0 and run["frames_per_s"] > 0
    assert set(run["stage_ms_per_frame"]) >= {"features", "inference", "composite", "sink"}
    model_fps = next(c["fps"] for c in result["model_only"] if c["batch"] == 2)
    assert run["e2e_over_model"] == pytest.approx(run["frames_per_s"] / model_fps)
    base = result["baseline"]
    assert base["frames"] == 15 and base["engine"].startswith("onnxruntime")
    assert set(base["step_ms_per_frame"]) == {"decode", "preprocess", "inference", "composite", "encode"}
    assert base["crosscheck"]["max_abs"] < 1e-4  # the same ONNX model, one frame at a time
    assert run["speedup_vs_baseline"] == pytest.approx(run["frames_per_s"] / base["frames_per_s"])
    assert result["summary"]["speedup_vs_baseline"] == pytest.approx(run["speedup_vs_baseline"])


def test_options_have_effects(workdir: dict[str, Path]) -> None:
    """--mode model skips renders; --repeats sets the timed calls; --seed changes the check inputs."""
    cfg = BenchConfig(mode="model", backends=["cpu"], batch_sizes=[3], isolate=False, cache_dir=workdir["cache"],
                      **{**TINY, "repeats": 4})  # fmt: skip
    result = run_bench(cfg)
    assert result["e2e"] is None and result["baseline"] is None
    (cell,) = result["model_only"]
    assert cell["batch"] == 3 and cell["calls"] == 4
    a = make_feeds([TensorInfo("input", ("B", 6, 320, 320), np.dtype("float32"))], 1, seed=0)["input"]
    b = make_feeds([TensorInfo("input", ("B", 6, 320, 320), np.dtype("float32"))], 1, seed=1)["input"]
    assert a.min() >= 0 and a.max() <= 1 and not np.array_equal(a, b)


def test_baseline_options(workdir: dict[str, Path]) -> None:
    """--baseline-frames bounds the baseline loop; --baseline none skips it; --mode e2e skips model-only cells."""
    common = dict(mode="e2e", backends=["cpu"], e2e_batch_sizes=[1], seconds=0.4, avatar=workdir["avatar"],
                  audio=workdir["audio"], isolate=False, cache_dir=workdir["cache"], **TINY)  # fmt: skip
    result = run_bench(BenchConfig(baseline="onnxruntime", baseline_frames=4, **common))
    assert result["model_only"] == [] and result["baseline"]["frames"] == 4
    assert result["e2e"]["runs"][0]["e2e_over_model"] is None  # no model-only cell to compare with
    result = run_bench(BenchConfig(baseline="none", **common))
    assert result["baseline"] is None and result["e2e"]["runs"][0]["frames"] == 10


def test_bad_options_are_config_errors(workdir: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="--mode"):
        run_bench(BenchConfig(mode="fast"))
    with pytest.raises(ConfigError, match="batch"):
        run_bench(BenchConfig(batch_sizes=[0]))
    with pytest.raises(ConfigError, match="usable"):
        run_bench(BenchConfig(backends=["no-such-backend"], cache_dir=workdir["cache"], **TINY))


def test_stats_and_comparison_helpers() -> None:
    s = latency_stats([0.010, 0.011, 0.012, 0.050], batch=4)
    assert s["median_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"] == pytest.approx(50.0)
    assert s["ms_per_frame"] == pytest.approx(s["median_ms"] / 4)
    ref = np.linspace(0, 1, 1000, dtype=np.float32).reshape(1, 10, 10, 10)
    same = compare_outputs(ref, ref.copy())
    assert same["max_abs"] == 0.0 and same["identical"]
    off = compare_outputs(ref, ref + 0.01)
    assert off["max_abs"] == pytest.approx(0.01, rel=1e-3) and off["psnr_db"] == pytest.approx(40.0, abs=0.1)


class _Noisy(Backend):
    """A throwaway backend: the cpu backend's output plus 0.01 (a subtly wrong backend)."""

    name = "bench-test-noisy"

    def __init__(self, model_path: str | Path, options: BackendOptions | None = None) -> None:
        super().__init__(model_path, options)
        self._inner = get_plugin_manager().backend_class("cpu")(model_path, options)

    @property
    def inputs(self) -> Sequence[TensorInfo]:
        return self._inner.inputs

    @property
    def outputs(self) -> Sequence[TensorInfo]:
        return self._inner.outputs

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v + np.float32(0.01) for k, v in self._inner.run(feeds).items()}


class _NoisyPlugin:
    @hookimpl
    def register_backends(self, register: Any) -> None:
        register(_Noisy)


@pytest.fixture()
def noisy_backend() -> Any:
    pm = get_plugin_manager()
    pm.register(_NoisyPlugin(), name="bench-test-noisy")
    yield pm
    reset_plugin_manager()


def test_crosscheck_catches_a_wrong_backend(noisy_backend: Any, workdir: dict[str, Path]) -> None:
    cfg = BenchConfig(mode="model", backends=["cpu", "bench-test-noisy"], batch_sizes=[1], isolate=False,
                      cache_dir=workdir["cache"], **TINY)  # fmt: skip
    rows = {r["backend"]: r for r in run_bench(cfg)["crosscheck"]}
    assert rows["cpu"]["max_abs"] == 0.0
    assert rows["bench-test-noisy"]["max_abs"] == pytest.approx(0.01, rel=1e-3)
    assert rows["bench-test-noisy"]["psnr_db"] == pytest.approx(40.0, abs=0.1)


def test_cli_bench(workdir: dict[str, Path]) -> None:
    out = workdir["root"] / "cli-out"
    args = [
        "bench", "--tiny", "--backends", "cpu", "--batch-sizes", "1", "--repeats", "2", "--warmup", "0",
        "--cell-seconds", "0", "--seconds", "0.4", "--avatar", str(workdir["avatar"]), "--audio", str(workdir["audio"]),
        "--baseline", "onnxruntime", "--cache-dir", str(workdir["cache"]), "--out", str(out), "--name", "cli",
    ]  # fmt: skip
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "model  cpu" in res.output and "baseline (onnxruntime" in res.output
    doc = json.loads((out / "cli.json").read_text())
    assert doc["backends"]["cpu"]["isolated_process"] is True
    assert doc["backends"]["cpu"]["pid"] != os.getpid()  # measured in a fresh process
    assert doc["e2e"]["runs"][0]["frames"] == 10 and doc["baseline"]["frames"] == 10
    assert (out / "cli.md").is_file() and (out / "cli.png").stat().st_size > 0


def _unet_threads(log: Any) -> list[int]:
    return [n for name, n in log.seen if name.startswith("unet-")]


def test_cli_threads_reach_the_sessions(workdir: dict[str, Path], ort_sessions: Any) -> None:
    """--threads sets intra_op_num_threads of every UNet session (measured, reference, render, baseline) and is recorded."""
    spy = ort_sessions
    out = workdir["root"] / "threads-out"
    args = [
        "bench", "--tiny", "--backends", "cpu", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
        "--cell-seconds", "0", "--seconds", "0.2", "--avatar", str(workdir["avatar"]), "--audio", str(workdir["audio"]),
        "--baseline", "onnxruntime", "--no-isolate", "--cache-dir", str(workdir["cache"]), "--out", str(out),
    ]  # fmt: skip
    res = CliRunner().invoke(cli, [*args, "--threads", "1", "--name", "t1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    # model-only, cross-check reference, end-to-end render, ONNX Runtime baseline
    assert _unet_threads(spy) == [1, 1, 1, 1]
    # the ave encoder's sessions too (sessions from bytes calibrate the seeded test models, outside any measurement)
    files = [n for name, n in spy.seen if name != "<bytes>"]
    assert set(files) == {1} and len(files) > 4, spy.seen
    doc = json.loads((out / "t1.json").read_text())
    assert doc["settings"]["threads"] == 1 and doc["backends"]["cpu"]["threads"] == 1
    assert "**Threads:** 1 per ONNX Runtime session" in (out / "t1.md").read_text()
    # without the option ORT picks (0 = its default): the spy would see a lost --threads
    spy.seen.clear()
    res = CliRunner().invoke(cli, [*args, "--mode", "model", "--name", "t0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert _unet_threads(spy) == [0, 0]
    doc = json.loads((out / "t0.json").read_text())
    assert doc["settings"]["threads"] is None and doc["backends"]["cpu"]["threads"] is None
    assert "**Threads:** all cores" in (out / "t0.md").read_text()


def test_threads_cross_into_the_isolated_process(workdir: dict[str, Path]) -> None:
    """The default (isolated) measurement gets --threads through its spec file."""
    cfg = BenchConfig(mode="model", backends=["cpu"], batch_sizes=[1], threads=2, cache_dir=workdir["cache"],
                      **{**TINY, "repeats": 1})  # fmt: skip
    result = run_bench(cfg)
    cpu = result["backends"]["cpu"]
    assert cpu["isolated_process"] and cpu["pid"] != os.getpid()
    assert cpu["threads"] == 2 and result["settings"]["threads"] == 2
    with pytest.raises(ConfigError, match="--threads"):
        run_bench(BenchConfig(threads=0, cache_dir=workdir["cache"], **TINY))


def test_cli_rejects_bad_batch_sizes() -> None:
    res = CliRunner().invoke(cli, ["bench", "--batch-sizes", "1,x"])
    assert res.exit_code != 0 and "comma-separated integers" in res.output


def test_real_data_render(sanders_dir: Path, talk_wav: Path, workdir: dict[str, Path], tmp_path: Path) -> None:
    """The real SyncTalk_2D dataset and speech (skipped when absent)."""
    cfg = BenchConfig(mode="e2e", backends=["cpu"], e2e_batch_sizes=[4], seconds=0.4, avatar=sanders_dir, audio=talk_wav,
                      baseline="onnxruntime", isolate=False, cache_dir=tmp_path, **{**TINY, "avatar_frames": 3})  # fmt: skip
    result = run_bench(cfg)
    assert result["e2e"]["avatar"]["width"] == 1280 and result["e2e"]["avatar"]["frames"] == 3
    assert result["e2e"]["audio"]["source"] == str(talk_wav)
    assert result["e2e"]["runs"][0]["frames"] == 10 and result["baseline"]["frames"] == 10


def test_default_name_names_the_machine() -> None:
    env = environment()
    name = default_name(env)
    assert name.startswith("cpu-" if not env["gpus"] else "gpu-")
    assert f"{env['cpu_cores']}core" in name or env["gpus"]


def test_default_batch_sizes_depend_on_the_backends() -> None:
    from avatar.bench import default_batch_sizes

    assert default_batch_sizes(["cpu"]) == [1, 4, 16]
    assert default_batch_sizes(["cpu", "onnx-cuda"]) == [1, 4, 16, 64]
