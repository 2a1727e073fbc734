"""The ``tensorrt`` backend: pure logic everywhere, parity on a GPU with TensorRT.

CI has neither TensorRT nor a GPU: the tests here check what the backend
decides before it touches the device (cache keys, profiles, buffer sizes,
shape checks, messages), that the plugin registers and explains what is
missing, that ``avatar build-engine`` fails with one clear line, and that
the cross-process build lock lets one of several real processes build while
the others wait. The ``gpu`` tests build real engines and compare them with
the cpu backend.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from avatar import BackendOptions, get_plugin_manager
from avatar.cli import cli
from avatar.errors import BackendError, BackendUnavailable, ConfigError, ModelError
from avatar.interfaces import TensorInfo
from avatar_plugins.backends import tensorrt as trt_backend
from avatar_plugins.backends._common import cuda_driver_status, psnr
from avatar_plugins.backends._trt_engine_cache import (
    INSTALL,
    BuildOptions,
    DeviceIdentity,
    buffer_bytes,
    buffer_plan,
    build_lock,
    cached_or_build,
    check_shape,
    engine_cache_key,
    engine_path,
    have_module,
    lock_path,
    missing_parts,
    profile_shapes,
    timing_cache_path,
    unavailable_message,
)

F32, U8 = np.dtype("float32"), np.dtype("uint8")
UNET_INPUTS = [TensorInfo("input", ("batch", 6, 320, 320), F32), TensorInfo("audio", ("batch", 32, 16, 16), F32)]
H100 = DeviceIdentity("NVIDIA H100 80GB HBM3", (9, 0), "10.13.0")


# --------------------------------------------------------------------------- cache key


def test_engine_cache_key_changes_with_every_ingredient():
    base = engine_cache_key("a" * 64, H100, BuildOptions())
    assert base == engine_cache_key("a" * 64, H100, BuildOptions())  # deterministic
    variants = [
        engine_cache_key("b" * 64, H100, BuildOptions()),
        engine_cache_key("a" * 64, dataclasses.replace(H100, gpu_name="NVIDIA H200"), BuildOptions()),
        engine_cache_key("a" * 64, dataclasses.replace(H100, compute_capability=(8, 9)), BuildOptions()),
        engine_cache_key("a" * 64, dataclasses.replace(H100, trt_version="10.14.1"), BuildOptions()),
    ]
    changes = {
        "precision": "fp16",
        "min_batch": 2,
        "opt_batch": 8,
        "max_batch": 32,
        "workspace_mb": 1024,
        "uint8_visual": True,
        "tf32": True,
    }
    assert set(changes) == {f.name for f in dataclasses.fields(BuildOptions)}  # a new field needs a case here
    for field, value in changes.items():
        b = dataclasses.replace(BuildOptions(max_batch=32 if field == "min_batch" else 16), **{field: value})
        variants.append(engine_cache_key("a" * 64, H100, b))
    assert base not in variants and len(set(variants)) == len(variants)


def test_engine_and_timing_cache_paths(tmp_path):
    p = engine_path(tmp_path, Path("/models/sanders.onnx"), "abc123")
    assert p == tmp_path / "sanders.abc123.engine"
    t = timing_cache_path(tmp_path, H100)
    assert t.parent == tmp_path and "sm90" in t.name and "10.13.0" in t.name and " " not in t.name
    assert timing_cache_path(tmp_path, dataclasses.replace(H100, compute_capability=(8, 9))) != t


def test_build_options_validation():
    with pytest.raises(ConfigError, match="precision"):
        BuildOptions(precision="int8")
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        BuildOptions(opt_batch=32, max_batch=16)
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        BuildOptions(min_batch=0)
    with pytest.raises(ConfigError, match="workspace"):
        BuildOptions(workspace_mb=1)


def test_build_options_from_backend_options():
    b = trt_backend.build_options_from(BackendOptions(precision="fp16", max_batch=8))
    assert (b.precision, b.min_batch, b.opt_batch, b.max_batch, b.uint8_visual) == ("fp16", 1, 8, 8, False)
    b = trt_backend.build_options_from(
        BackendOptions(max_batch=64, extra={"opt_batch": 16, "workspace_mb": 512, "uint8_visual": True})
    )
    assert (b.opt_batch, b.max_batch, b.workspace_mb, b.uint8_visual, b.tf32) == (16, 64, 512, True, False)
    assert trt_backend.build_options_from(BackendOptions(extra={"tf32": True})).tf32
    b = trt_backend.build_options_from(BackendOptions(max_batch=4, extra={"opt_batch": 8}))
    assert (b.opt_batch, b.max_batch) == (8, 8)  # an engine tuned for 8 must accept 8
    b = trt_backend.build_options_from(BackendOptions(max_batch=4, extra={"profile_max_batch": 16}))
    assert (b.opt_batch, b.max_batch) == (4, 16)
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        trt_backend.build_options_from(BackendOptions(max_batch=4, extra={"opt_batch": 8, "profile_max_batch": 4}))
    with pytest.raises(ConfigError, match="smaller than max_batch"):
        trt_backend.build_options_from(BackendOptions(max_batch=8, extra={"profile_max_batch": 4}))


# --------------------------------------------------------------------------- profile and buffers


def test_profile_shapes_for_dynamic_batch():
    shapes = profile_shapes(UNET_INPUTS, BuildOptions(opt_batch=8, max_batch=16))
    assert shapes["input"] == ((1, 6, 320, 320), (8, 6, 320, 320), (16, 6, 320, 320))
    assert shapes["audio"] == ((1, 32, 16, 16), (8, 32, 16, 16), (16, 32, 16, 16))


def test_profile_shapes_for_fixed_batch_and_errors():
    fixed = [TensorInfo("x", (4, 3, 8, 8), F32)]
    assert profile_shapes(fixed, BuildOptions(max_batch=16)) == {"x": ((4, 3, 8, 8),) * 3}
    with pytest.raises(ConfigError, match="--max-batch 4"):
        profile_shapes(fixed, BuildOptions(opt_batch=2, max_batch=2))
    with pytest.raises(ModelError, match="dynamic dimension besides the batch"):
        profile_shapes([TensorInfo("x", ("b", 3, None, 8), F32)], BuildOptions())


def test_buffer_sizes_from_profile_max_and_dtype():
    assert buffer_bytes((16, 6, 320, 320), F32) == 16 * 6 * 320 * 320 * 4
    assert buffer_bytes((16, 6, 320, 320), U8) == 16 * 6 * 320 * 320
    assert buffer_bytes((16, 3, 320, 320), np.float16) == 16 * 3 * 320 * 320 * 2
    plan = buffer_plan({"input": ((64, 6, 320, 320), U8), "audio": ((64, 32, 16, 16), F32), "output": ((64, 3, 320, 320), F32)})
    assert plan == {"input": 39_321_600, "audio": 2_097_152, "output": 78_643_200}
    with pytest.raises(BackendError, match="dynamic dimension"):
        buffer_bytes((-1, 3, 320, 320), F32)


def test_check_shape_against_the_profile():
    lo, hi = (1, 6, 320, 320), (16, 6, 320, 320)
    check_shape("input", (16, 6, 320, 320), lo, hi)
    check_shape("input", (1, 6, 320, 320), lo, hi)
    with pytest.raises(BackendError, match=r"batch 17 .* outside the engine's profile \[1, 16\].*--max-batch 17"):
        check_shape("input", (17, 6, 320, 320), lo, hi)
    with pytest.raises(BackendError, match=r"must have shape \[B,6,320,320\]"):
        check_shape("input", (2, 3, 320, 320), lo, hi)
    with pytest.raises(BackendError, match="4 dimensions"):
        check_shape("input", (2, 6, 320), lo, hi)
    with pytest.raises(BackendError, match="outside"):
        check_shape("input", (1, 6, 320, 320), (2, 6, 320, 320), hi)


# --------------------------------------------------------------------------- availability and messages


def test_missing_parts_and_message():
    all_missing = missing_parts(have_tensorrt=False, have_pycuda=False, driver=(False, "no NVIDIA driver (libcuda.so.1) was found"))
    assert len(all_missing) == 3 and "tensorrt" in all_missing[0].lower() and "pycuda" in all_missing[1]
    assert missing_parts(have_tensorrt=True, have_pycuda=True, driver=(True, "")) == []
    only_driver = missing_parts(have_tensorrt=True, have_pycuda=True, driver=(False, ""))
    assert only_driver == ["no NVIDIA driver was found"]
    line = unavailable_message("; ".join(all_missing), INSTALL)
    assert "\n" not in line and INSTALL in line and "pypi.nvidia.com" in line
    assert "onnx-cuda or cpu" in unavailable_message("no NVIDIA driver was found", None)


def test_availability_lists_exactly_what_is_missing_here():
    a = trt_backend.TensorRTBackend.availability()
    have_trt, have_pycuda = have_module("tensorrt"), have_module("pycuda")
    driver_ok = cuda_driver_status()[0]
    if have_trt and have_pycuda and driver_ok:
        pytest.skip("TensorRT, pycuda and a driver are all present")
    assert not a.usable
    assert ("TensorRT" in a.reason) is not have_trt
    assert ("pycuda is not installed" in a.reason) is not have_pycuda
    assert ("driver" in a.reason or "GPU" in a.reason) is not driver_ok
    if not (have_trt and have_pycuda):
        assert a.install == INSTALL


def test_plugin_registers_backend_and_command_even_without_tensorrt():
    pm = get_plugin_manager()
    reg = pm.get("backend", "tensorrt")
    assert reg.obj is trt_backend.TensorRTBackend and reg.plugin == "tensorrt"
    assert pm.records["tensorrt"].status == "loaded"
    assert "build-engine" in cli.list_commands(None)  # type: ignore[arg-type]


needs_trt = pytest.mark.skipif(not trt_backend.TensorRTBackend.availability().usable, reason="TensorRT is not usable here")
no_trt = pytest.mark.skipif(trt_backend.TensorRTBackend.availability().usable, reason="TensorRT is usable here")


@no_trt
def test_constructing_without_tensorrt_raises_one_clear_line(tmp_path):
    with pytest.raises(BackendUnavailable) as info:
        trt_backend.TensorRTBackend(tmp_path / "m.onnx")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("tensorrt backend unavailable:")
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        get_plugin_manager().backend_class("tensorrt")


@no_trt
def test_build_engine_command_fails_with_one_clear_line(tmp_path):
    res = CliRunner().invoke(cli, ["build-engine", str(tmp_path / "m.onnx"), "--fp16", "--max-batch", "8"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tensorrt backend unavailable")
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_build_engine_command_validates_its_options(tmp_path):
    res = CliRunner().invoke(cli, ["build-engine", str(tmp_path / "m.onnx"), "--max-batch", "0"])
    assert res.exit_code == 2 and "max-batch" in res.output


# --------------------------------------------------------------------------- cross-process build lock

# A worker process: waits for the "go" file (so all start together), then asks for the
# file through cached_or_build (mode "cached"/"rebuild") or just holds build_lock (mode
# "lock"); the build records its interval, sleeps, and writes the file atomically.
_WORKER = """
import json, logging, os, sys, time
from pathlib import Path
from avatar_plugins.backends._trt_engine_cache import build_lock, cached_or_build

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
out, records, go, mode = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]

def build():
    start = time.time()
    time.sleep(0.5 if mode != "lock" else 0.2)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, out)
    (records / f"{os.getpid()}.json").write_text(json.dumps({"pid": os.getpid(), "start": start, "end": time.time()}))

while not go.exists():
    time.sleep(0.005)
if mode == "lock":
    with build_lock(out):
        build()
    built = True
else:
    path, built = cached_or_build(out, build, rebuild=mode == "rebuild")
print(json.dumps({"pid": os.getpid(), "built": built, "content": out.read_text()}))
"""


def _race(tmp_path: Path, mode: str, n: int = 3) -> tuple[Path, list[dict], list[dict], list[str]]:
    """Start ``n`` workers on one engine path at once; return (path, results, build records, stderrs)."""
    out, records, go = tmp_path / "m.key.engine", tmp_path / "records", tmp_path / "go"
    records.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(out), str(records), str(go), mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for _ in range(n)
    ]
    go.touch()
    results, errs = [], []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout))
        errs.append(stderr)
    builds = sorted((json.loads(f.read_text()) for f in records.iterdir()), key=lambda r: r["start"])
    return out, results, builds, errs


def _no_overlap(builds: list[dict]) -> bool:
    return all(a["end"] <= b["start"] for a, b in zip(builds, builds[1:]))


def test_concurrent_processes_build_one_engine_once(tmp_path):
    out, results, builds, errs = _race(tmp_path, "cached")
    assert len(builds) == 1 and sum(r["built"] for r in results) == 1
    builder = builds[0]["pid"]
    assert [r["built"] for r in results if r["pid"] == builder] == [True]
    assert {r["content"] for r in results} == {str(builder)}  # everyone got the one build's file
    waited = [e for r, e in zip(results, errs) if r["pid"] != builder and "waiting for another process" in e]
    assert waited and all(str(lock_path(out)) in e and e.count("waiting") == 1 for e in waited)
    assert "waiting" not in errs[[r["pid"] for r in results].index(builder)]
    assert lock_path(out).is_file()  # documented: never deleted (deleting flock files races)


def test_build_lock_serialises_processes(tmp_path):
    out, results, builds, _ = _race(tmp_path, "lock")
    assert len(builds) == 3 and _no_overlap(builds)


def test_concurrent_rebuilds_are_satisfied_by_one_fresh_build(tmp_path):
    (tmp_path / "m.key.engine").write_text("old")
    out, results, builds, _ = _race(tmp_path, "rebuild")
    assert len(builds) == 1 and sum(r["built"] for r in results) == 1
    assert {r["content"] for r in results} == {str(builds[0]["pid"])} and out.read_text() != "old"


def _writer(out: Path, text: str, calls: list[str]):  # type: ignore[no-untyped-def]
    def build() -> None:
        calls.append(text)
        out.write_text(text)

    return build


def test_rebuild_builds_again_and_cached_does_not(tmp_path):
    out, calls = tmp_path / "e.engine", []
    assert cached_or_build(out, _writer(out, "one", calls), rebuild=False) == (out, True)
    assert cached_or_build(out, _writer(out, "two", calls), rebuild=False) == (out, False)
    assert out.read_text() == "one"
    assert cached_or_build(out, _writer(out, "three", calls), rebuild=True) == (out, True)
    assert out.read_text() == "three" and calls == ["one", "three"]


def _wait_until_waiting(t: threading.Thread, caplog: pytest.LogCaptureFixture) -> None:
    """Return once thread ``t`` logged that it waits for the lock (or after 5 s, or when it ended)."""
    for _ in range(500):
        if any("waiting for another process" in r.getMessage() for r in caplog.records) or not t.is_alive():
            return
        t.join(0.01)


def test_rebuild_is_satisfied_by_a_build_that_finished_while_waiting(tmp_path, caplog):
    out, calls = tmp_path / "e.engine", []
    out.write_text("old")
    got: list[tuple[Path, bool]] = []
    caplog.set_level(logging.WARNING)
    with build_lock(out):  # "another process" builds; flock also excludes a second open in this process
        t = threading.Thread(target=lambda: got.append(cached_or_build(out, _writer(out, "mine", calls), rebuild=True)))
        t.start()
        _wait_until_waiting(t, caplog)
        assert t.is_alive() and not got  # it is waiting on our lock
        tmp = tmp_path / "other.tmp"
        tmp.write_text("theirs")
        os.replace(tmp, out)
    t.join(10)
    assert got == [(out, False)] and calls == [] and out.read_text() == "theirs"
    # not rebuilt meanwhile: a rebuild does build
    assert cached_or_build(out, _writer(out, "mine", calls), rebuild=True) == (out, True) and calls == ["mine"]


def test_cached_file_is_returned_without_taking_the_lock(tmp_path):
    out = tmp_path / "e.engine"
    out.write_text("cached")
    got: list[tuple[Path, bool]] = []

    def fail() -> None:
        raise AssertionError("must not build")

    assert cached_or_build(out, fail) == (out, False)
    assert not lock_path(out).exists()  # never even opened
    with build_lock(out):  # someone else is building (e.g. a --rebuild)
        t = threading.Thread(target=lambda: got.append(cached_or_build(out, fail)), daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive() and got == [(out, False)]


def _lock_is_free(out: Path) -> bool:
    import fcntl  # POSIX, like the lock itself

    fd = os.open(lock_path(out), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_failed_build_releases_the_lock_and_leaves_no_file(tmp_path):
    out, calls = tmp_path / "e.engine", []

    def broken() -> None:
        assert not _lock_is_free(out)  # the build runs under the lock
        raise BackendError("TensorRT failed to build an engine")

    with pytest.raises(BackendError, match="failed to build"):
        cached_or_build(out, broken)
    assert not out.exists() and _lock_is_free(out)
    with pytest.raises(BackendError, match="without writing"):
        cached_or_build(out, lambda: None)
    assert _lock_is_free(out)
    assert cached_or_build(out, _writer(out, "ok", calls)) == (out, True)


def test_build_lock_explains_an_unusable_cache_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(BackendError, match="cannot create the engine build lock.*--cache-dir"):
        cached_or_build(tmp_path / "file" / "e.engine", lambda: None)


@pytest.mark.skipif(have_module("tensorrt"), reason="checks the wiring by the missing tensorrt import")
def test_backend_reuses_a_cached_engine_and_builds_under_the_lock(tmp_path, caplog):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not really onnx")
    key = engine_cache_key(trt_backend.file_sha256(model), H100, BuildOptions())
    out = engine_path(tmp_path, model, key)
    out.write_bytes(b"engine")
    assert trt_backend._build_in_context(model, BuildOptions(), tmp_path, H100, False, None) == out
    caplog.set_level(logging.WARNING)
    errors: list[BaseException] = []

    def rebuild() -> None:
        try:
            trt_backend._build_in_context(model, BuildOptions(), tmp_path, H100, True, None)
        except BaseException as exc:  # the build itself needs tensorrt
            errors.append(exc)

    with build_lock(out):
        t = threading.Thread(target=rebuild)
        t.start()
        _wait_until_waiting(t, caplog)
        assert t.is_alive() and not errors  # the build waits for the lock
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], ImportError) and _lock_is_free(out)
    assert any(str(lock_path(out)) in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avatar.models.synthetic import make_unet

    return make_unet(tmp_path_factory.mktemp("trt") / "tiny.onnx", tiny=True, seed=0)


def _feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    from avatar.models.synthetic import sample_audio, sample_visual

    return {"input": sample_visual(batch, seed=seed), "audio": sample_audio("ave", batch, seed=seed)}


def _cpu(unet: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    from avatar_plugins.backends.ort import CpuBackend

    with CpuBackend(unet) as b:
        return b.run(feeds)["output"]


@pytest.mark.gpu
@needs_trt
def test_gpu_tensorrt_fp32_matches_cpu_and_engine_is_cached(unet, tmp_path):
    opts = BackendOptions(max_batch=8, extra={"cache_dir": str(tmp_path)})
    feeds = _feeds(5)
    want = _cpu(unet, feeds)
    with trt_backend.TensorRTBackend(unet, opts) as b:
        first_load = b.stats.load_s
        engine = b.engine_file
        assert [t.name for t in b.inputs] == ["input", "audio"]
        got = b.run(feeds)["output"]
        assert b.stats.calls == 1 and b.stats.items == 5
        with pytest.raises(BackendError, match="max_batch=8"):
            b.run(_feeds(9))
    assert np.abs(got - want).max() <= 1e-3
    assert engine.is_file() and engine.with_suffix(".json").is_file()
    assert list(tmp_path.glob("timing.*.cache"))
    with trt_backend.TensorRTBackend(unet, opts) as again:
        assert again.engine_file == engine
        assert again.stats.load_s < first_load
        np.testing.assert_allclose(again.run(feeds)["output"], got, atol=1e-6)


@pytest.mark.gpu
@needs_trt
def test_gpu_tensorrt_fp16_and_uint8(unet, tmp_path):
    x = np.round(_feeds(4)["input"] * 255).astype(np.uint8)
    a = _feeds(4)["audio"]
    want = _cpu(unet, {"input": x.astype(np.float32) / 255, "audio": a})
    opts = BackendOptions(max_batch=4, precision="fp16", extra={"cache_dir": str(tmp_path), "uint8_visual": True})
    with trt_backend.TensorRTBackend(unet, opts) as b:
        assert np.dtype(b.inputs[0].dtype) == np.uint8
        got = b.run({"input": x, "audio": a})["output"]
        measured = b.fp16_psnr
    assert psnr(want, got) >= 40.0
    meta = json.loads(b.engine_file.with_suffix(".json").read_text())
    assert measured is not None and measured >= 40.0 and meta["fp16_psnr_vs_fp32"] == measured  # recorded once
    with trt_backend.TensorRTBackend(unet, opts) as again:
        assert again.fp16_psnr == measured
    with pytest.raises(BackendError, match="too inaccurate"):
        trt_backend.TensorRTBackend(unet, BackendOptions(max_batch=4, precision="fp16", extra={**opts.extra, "fp16_min_psnr": 500}))


@pytest.mark.gpu
@needs_trt
def test_gpu_tensorrt_alias_outputs_threads_and_onnx_runtime_together(unet, tmp_path):
    from avatar_plugins.backends.ort import OnnxCudaBackend

    opts = BackendOptions(max_batch=4, extra={"cache_dir": str(tmp_path), "alias_outputs": True})
    with trt_backend.TensorRTBackend(unet, opts) as b:
        first = b.run(_feeds(2))["output"]
        kept = first.copy()
        b.run(_feeds(2, seed=4))
        assert not np.array_equal(first, kept)  # documented: views are overwritten by the next run
        results: dict[str, np.ndarray] = {}

        def worker() -> None:
            results["out"] = b.run(_feeds(2))["output"].copy()

        t = threading.Thread(target=worker)
        t.start()
        t.join()
        np.testing.assert_allclose(results["out"], kept, atol=1e-6)
        if OnnxCudaBackend.availability().usable:  # same primary context, same process
            with OnnxCudaBackend(unet, BackendOptions(max_batch=2)) as ort_b:
                np.testing.assert_allclose(ort_b.run(_feeds(2))["output"], kept, atol=1e-3)
            np.testing.assert_allclose(b.run(_feeds(2))["output"], kept, atol=1e-6)


@pytest.mark.gpu
@needs_trt
def test_gpu_tensorrt_close_leaves_the_thread_without_a_current_context(unet, tmp_path):
    """pycuda's detach of the primary context used to leave it on the driver's stack after every close."""
    driver = pytest.importorskip("cuda.bindings.driver")
    opts = BackendOptions(max_batch=2, extra={"cache_dir": str(tmp_path)})
    trt_backend.TensorRTBackend(unet, opts).close()  # the engine is built (and cached) outside the thread
    current: list[int] = []

    def worker() -> None:  # a fresh thread starts with empty context stacks
        for _ in range(3):
            with trt_backend.TensorRTBackend(unet, opts) as b:
                b.run(_feeds(1))
            err, ctx = driver.cuCtxGetCurrent()
            current.append(int(ctx) if err == driver.CUresult.CUDA_SUCCESS else -1)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert current == [0, 0, 0]


@pytest.mark.gpu
@needs_trt
def test_gpu_tensorrt_covering_engine_is_reused(unet, tmp_path):
    res = CliRunner().invoke(cli, ["build-engine", str(unet), "--max-batch", "8", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    with trt_backend.TensorRTBackend(unet, BackendOptions(max_batch=4, extra={"cache_dir": str(tmp_path)})) as b:
        assert b.engine_file == Path(res.output.split()[0]) and b.stats.load_s < 30  # deserialised, not built


@pytest.mark.gpu
@needs_trt
def test_gpu_build_engine_command(unet, tmp_path):
    res = CliRunner().invoke(cli, ["build-engine", str(unet), "--max-batch", "4", "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    path = Path(res.output.split()[0])
    assert path.is_file() and path.parent == tmp_path
    res2 = CliRunner().invoke(cli, ["build-engine", str(unet), "--max-batch", "4", "--cache-dir", str(tmp_path)])
    assert res2.exit_code == 0 and Path(res2.output.split()[0]) == path  # found in the cache


# --------------------------------------------------------------------------- engine metadata


def test_recorded_measures_once_then_reads_the_meta_json(tmp_path):
    from avatar_plugins.backends._trt_engine_cache import recorded

    meta = tmp_path / "m.engine.json"
    meta.write_text(json.dumps({"build_s": 12.5}))
    calls = []

    def measure() -> float:
        calls.append(1)
        return 47.25

    assert recorded(meta, "fp16_psnr_vs_fp32", measure) == 47.25
    assert recorded(meta, "fp16_psnr_vs_fp32", measure) == 47.25
    assert len(calls) == 1
    assert json.loads(meta.read_text()) == {"build_s": 12.5, "fp16_psnr_vs_fp32": 47.25}  # build facts kept
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind


def test_recorded_remeasures_a_missing_or_broken_meta_json(tmp_path, caplog):
    from avatar_plugins.backends._trt_engine_cache import recorded

    missing = tmp_path / "a.json"
    assert recorded(missing, "k", lambda: 1.5) == 1.5 and json.loads(missing.read_text()) == {"k": 1.5}
    broken = tmp_path / "b.json"
    broken.write_text("{not json")
    assert recorded(broken, "k", lambda: 2.5) == 2.5
    assert "unreadable" in caplog.text and json.loads(broken.read_text()) == {"k": 2.5}



# --------------------------------------------------------------------------- the backend through stand-ins
# tensorrt and pycuda cannot be installed here: tests/gpu_standins.py stands in for both, enforcing
# the documented call order and signatures and computing with ONNX Runtime on the bound "device"
# memory, so the whole build / load / run / close path runs in CI.


@pytest.fixture
def standins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    from gpu_standins import install

    from avatar.interfaces import Availability

    state = install(monkeypatch)
    monkeypatch.setattr(trt_backend, "_status", lambda: Availability.ok())
    monkeypatch.setattr(trt_backend, "_RETAINED", {}, raising=False)  # a fresh process as far as contexts go
    monkeypatch.setenv("AVATAR_CACHE_DIR", str(tmp_path / "cache"))
    return state


def _calls(state, name: str) -> int:  # type: ignore[no-untyped-def]
    return sum(c == name for c in state.calls)


def test_standin_build_load_run_close_matches_cpu(unet, tmp_path, standins):
    feeds = _feeds(3)
    want = _cpu(unet, feeds)
    opts = BackendOptions(max_batch=4, extra={"cache_dir": str(tmp_path / "engines")})
    with trt_backend.TensorRTBackend(unet, opts) as b:
        engine = b.engine_file
        assert [t.name for t in b.inputs] == ["input", "audio"] and [t.name for t in b.outputs] == ["output"]
        got = b.run(feeds)["output"]
        tail = b.run({k: v[:1] for k, v in feeds.items()})["output"]
        assert b.buffer_bytes["input"] == 4 * 6 * 320 * 320 * 4  # sized from the profile max
    np.testing.assert_array_equal(got, want)  # the same ORT CPU graph behind the bound buffers
    np.testing.assert_array_equal(tail, want[:1])
    # the first build wrote the engine, its meta json and the timing cache (a NameError stopped it before)
    meta = json.loads(engine.with_suffix(".json").read_text())
    assert meta["build"]["max_batch"] == 4 and meta["key"] in engine.name
    (timing,) = (tmp_path / "engines").glob("timing.*.cache")
    assert "sm90" in timing.name and json.loads(timing.read_text()) == ["tactics:tiny.onnx"]
    assert _calls(standins, "Builder.build_serialized_network") == 1
    assert _calls(standins, "IExecutionContext.execute_async_v3") == 2
    assert not standins.memory.keys() - standins.streams.keys()  # every buffer freed at close
    # a second backend deserialises the cached engine, building nothing
    with trt_backend.TensorRTBackend(unet, opts) as again:
        assert again.engine_file == engine
        np.testing.assert_array_equal(again.run(feeds)["output"], want)
    assert _calls(standins, "Builder.build_serialized_network") == 1


def test_standin_fp16_uint8_engine_is_gated_and_recorded(unet, tmp_path, standins):
    x = np.round(_feeds(2)["input"] * 255).astype(np.uint8)
    a = _feeds(2)["audio"]
    want = _cpu(unet, {"input": x.astype(np.float32) / 255, "audio": a})
    opts = BackendOptions(max_batch=2, precision="fp16", extra={"cache_dir": str(tmp_path), "uint8_visual": True})
    with trt_backend.TensorRTBackend(unet, opts) as b:
        assert np.dtype(b.inputs[0].dtype) == np.uint8 and b.fp16_psnr is not None and b.fp16_psnr >= 40
        assert psnr(want, b.run({"input": x, "audio": a})["output"]) >= 40
    meta = json.loads(b.engine_file.with_suffix(".json").read_text())
    assert meta["fp16_psnr_vs_fp32"] == b.fp16_psnr and meta["build"]["precision"] == "fp16"
    with pytest.raises(BackendError, match="too inaccurate"):
        trt_backend.TensorRTBackend(unet, BackendOptions(max_batch=2, precision="fp16", extra={**opts.extra, "fp16_min_psnr": 500, "rebuild": True}))
    assert not standins.driver_stack and not standins.pycuda_stack  # a failed load leaves no context pushed


def test_standin_builds_merge_the_shared_timing_cache(unet, tmp_path, standins):
    other = tmp_path / "other.onnx"
    other.write_bytes(unet.read_bytes())
    folder = tmp_path / "engines"
    for model in (unet, other):
        res = CliRunner().invoke(cli, ["build-engine", str(model), "--max-batch", "2", "--cache-dir", str(folder)])
        assert res.exit_code == 0, res.output
    (timing,) = folder.glob("timing.*.cache")
    assert json.loads(timing.read_text()) == ["tactics:other.onnx", "tactics:tiny.onnx"]  # merged, not overwritten


def test_standin_primary_context_leaves_no_stale_stack_entry(unet, tmp_path, standins):
    opts = BackendOptions(max_batch=2, extra={"cache_dir": str(tmp_path)})
    for _ in range(3):
        with trt_backend.TensorRTBackend(unet, opts) as b:
            b.run(_feeds(1))
        assert standins.driver_stack == [] and standins.pycuda_stack == []
    errors: list[BaseException] = []

    def worker() -> None:  # the engine runs backends on worker threads; each has its own stacks
        try:
            with trt_backend.TensorRTBackend(unet, opts) as b:
                b.run(_feeds(1))
            assert standins.driver_stack == [] and standins.pycuda_stack == []
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert errors == []
    assert standins.retains == [1]  # retained once per process, never leaked per backend


def test_standin_set_input_shape_refusal_is_an_error(unet, tmp_path, standins):
    with trt_backend.TensorRTBackend(unet, BackendOptions(max_batch=2, extra={"cache_dir": str(tmp_path)})) as b:
        with b._pc, pytest.raises(BackendError, match=r"rejected shape \(3, 6, 320, 320\) for input 'input'.*\(1, 6, 320, 320\) to \(2, 6, 320, 320\)"):
            b._set_input_shape("input", (3, 6, 320, 320))


def test_standin_aliased_outputs_keep_the_page_locked_buffers_alive(unet, tmp_path, standins):
    import gc

    opts = BackendOptions(max_batch=2, extra={"cache_dir": str(tmp_path), "alias_outputs": True})
    b = trt_backend.TensorRTBackend(unet, opts)
    first = b.run(_feeds(2))["output"]
    kept = first.copy()
    second = b.run(_feeds(2, seed=5))["output"]
    assert np.shares_memory(first, second)  # documented: the next run overwrites the view
    np.testing.assert_array_equal(first, second)
    view = second[1:]  # a view of an alias keeps the buffers too
    del first, second
    b.close()
    assert _calls(standins, "HostAllocation.free") == 0
    kept2 = _cpu(unet, _feeds(2, seed=5))[1:]
    np.testing.assert_array_equal(view, kept2)  # not freed: no poison
    assert not np.array_equal(kept[1:], kept2)
    del view
    gc.collect()
    assert _calls(standins, "HostAllocation.free") == 3  # input, audio, output: freed once the last view died
    assert not standins.driver_stack


def test_standin_without_alias_close_frees_everything_at_once(unet, tmp_path, standins):
    with trt_backend.TensorRTBackend(unet, BackendOptions(max_batch=2, extra={"cache_dir": str(tmp_path)})) as b:
        out = b.run(_feeds(1))["output"]
    assert _calls(standins, "HostAllocation.free") == 3 and _calls(standins, "DeviceAllocation.free") == 3
    assert np.isfinite(out).all()  # a copy the caller owns


# --------------------------------------------------------------------------- the engine cache lookup rule


def test_a_cached_engine_whose_profile_covers_the_batch_is_used(unet, tmp_path, standins):
    folder = tmp_path / "engines"
    res = CliRunner().invoke(cli, ["build-engine", str(unet), "--cache-dir", str(folder)])  # defaults: batch 1..16
    assert res.exit_code == 0, res.output
    built = Path(res.output.split()[0])
    # what `avatar run --backend tensorrt --batch 8` asks for: max_batch = 8
    with trt_backend.TensorRTBackend(unet, BackendOptions(max_batch=8, extra={"cache_dir": str(folder)})) as b:
        assert b.engine_file == built and b._max_batch == 16
    assert _calls(standins, "Builder.build_serialized_network") == 1  # found, not built again
    # a batch the cached profile does not cover builds its own engine
    with trt_backend.TensorRTBackend(unet, BackendOptions(max_batch=32, extra={"cache_dir": str(folder)})) as b:
        assert b.engine_file != built and b._max_batch == 32
    # an explicit tuned batch must match; profile_max_batch sizes the new engine
    opts = BackendOptions(max_batch=8, extra={"cache_dir": str(folder), "opt_batch": 8, "profile_max_batch": 16})
    with trt_backend.TensorRTBackend(unet, opts) as b:
        tuned = b.engine_file
        assert tuned not in (built,) and b._max_batch == 16
    assert json.loads(tuned.with_suffix(".json").read_text())["build"]["opt_batch"] == 8
    with trt_backend.TensorRTBackend(unet, BackendOptions(max_batch=4, extra={"cache_dir": str(folder), "opt_batch": 8})) as b:
        assert b.engine_file == tuned  # covers batch 4 and is tuned for 8
    assert _calls(standins, "Builder.build_serialized_network") == 3
    with pytest.raises(ConfigError, match="profile_max_batch=4 is smaller than max_batch=8"):
        trt_backend.TensorRTBackend(unet, BackendOptions(max_batch=8, extra={"profile_max_batch": 4}))


def _fake_engine(folder: Path, model: Path, build: BuildOptions, device: DeviceIdentity = H100) -> Path:
    key = engine_cache_key(trt_backend.file_sha256(model), device, build)
    out = engine_path(folder, model, key)
    out.write_bytes(b"engine")
    out.with_suffix(".json").write_text(json.dumps({"key": key, "build": dataclasses.asdict(build)}))
    return out


def test_find_covering_engine_rule(tmp_path):
    from avatar_plugins.backends._trt_engine_cache import find_covering_engine

    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    sha = trt_backend.file_sha256(model)
    want = BuildOptions(opt_batch=8, max_batch=8)

    def find(batch: int = 8, opt: int | None = None, build: BuildOptions = want, device: DeviceIdentity = H100):  # type: ignore[no-untyped-def]
        return find_covering_engine(tmp_path, model, sha, device, build, batch=batch, opt_batch=opt)

    assert find() is None
    e16 = _fake_engine(tmp_path, model, BuildOptions(opt_batch=16, max_batch=16))
    e64 = _fake_engine(tmp_path, model, BuildOptions(opt_batch=8, max_batch=64))
    _fake_engine(tmp_path, model, BuildOptions(precision="fp16", opt_batch=8, max_batch=8))
    _fake_engine(tmp_path, model, BuildOptions(opt_batch=8, max_batch=8, tf32=True))
    assert find() == e16  # the smallest profile that covers the batch
    assert find(opt=8) == e64  # an asked-for tuned batch must match
    assert find(batch=32) == e64 and find(batch=65) is None
    assert find(build=dataclasses.replace(want, uint8_visual=True)) is None
    assert find(device=dataclasses.replace(H100, trt_version="10.14.1")) is None  # the key covers GPU and TensorRT
    e16.unlink()  # a meta json without its engine (deleted, or a build in progress) is not a match
    assert find() == e64
    (tmp_path / f"{model.stem}.broken.json").write_text("{not json")
    assert find() == e64
