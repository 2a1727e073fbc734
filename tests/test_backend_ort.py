"""The ONNX Runtime backends: ``cpu`` everywhere, ``onnx-cuda`` where a GPU is.

CPU tests run real ONNX Runtime sessions on seeded tiny UNet-328 and audio
encoder models; GPU tests (marked ``gpu``) compare onnx-cuda with cpu and skip
cleanly when no GPU is usable.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import pytest

from avatar import BackendOptions, get_plugin_manager
from avatar.errors import BackendError, BackendUnavailable, ConfigError, ModelError
from avatar.interfaces import TensorInfo
from avatar.models.synthetic import make_audio_encoder, make_unet, sample_audio, sample_mel, sample_visual
from avatar_plugins.backends._common import check_feeds, cuda_driver_status, psnr
from avatar_plugins.backends.ort import CpuBackend, OnnxCudaBackend, cuda_provider_options


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATAR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ort_models")
    return {
        "unet": make_unet(d / "tiny.onnx", tiny=True, seed=0),
        "encoder": make_audio_encoder(d / "enc.onnx", tiny=True),
    }


def _feeds(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": sample_visual(batch, seed=seed), "audio": sample_audio("ave", batch, seed=seed)}


def _uint8_case(unet: Path, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 pixels, audio, and the cpu backend's output for the same pixels as float."""
    x = np.round(sample_visual(batch) * 255).astype(np.uint8)
    a = sample_audio("ave", batch)
    with CpuBackend(unet) as ref:
        return x, a, ref.run({"input": x.astype(np.float32) / 255, "audio": a})["output"]


# --------------------------------------------------------------------------- cpu


def test_cpu_is_registered_and_usable():
    pm = get_plugin_manager()
    assert pm.backend_class("cpu") is CpuBackend
    assert pm.get("backend", "onnx-cuda").obj is OnnxCudaBackend
    assert CpuBackend.availability().usable


def test_cpu_metadata_and_providers(models):
    with CpuBackend(models["unet"]) as b:
        assert [t.name for t in b.inputs] == ["input", "audio"]
        assert [tuple(t.shape[1:]) for t in b.inputs] == [(6, 320, 320), (32, 16, 16)]
        assert all(np.dtype(t.dtype) == np.float32 for t in b.inputs)
        assert [(t.name, tuple(t.shape[1:])) for t in b.outputs] == [("output", (3, 320, 320))]
        assert b.providers == ["CPUExecutionProvider"]
        assert b.stats.load_s > 0


def test_cpu_runs_any_model_the_audio_encoder_too(models):
    with CpuBackend(models["encoder"]) as b:
        assert [(t.name, tuple(t.shape[1:])) for t in b.inputs] == [("mel", (1, 80, 16))]
        out = b.run({"mel": sample_mel(7)})
        assert out["feature"].shape == (7, 512)


def test_cpu_batch_is_one_call_and_equals_per_item_runs(models):
    feeds = _feeds(5)
    with CpuBackend(models["unet"]) as b:
        batched = b.run(feeds)["output"]
        assert b.stats.calls == 1 and b.stats.items == 5
        singles = np.concatenate([b.run({k: v[i : i + 1] for k, v in feeds.items()})["output"] for i in range(5)])
        assert b.stats.calls == 6 and b.stats.items == 10
    assert batched.shape == (5, 3, 320, 320) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, singles, atol=1e-5)


def test_cpu_inputs_change_the_output(models):
    with CpuBackend(models["unet"]) as b:
        base = b.run(_feeds(2))["output"]
        other_audio = b.run({"input": sample_visual(2), "audio": sample_audio("ave", 2, seed=9)})["output"]
        other_visual = b.run({"input": sample_visual(2, seed=9), "audio": sample_audio("ave", 2)})["output"]
    assert np.abs(base - other_audio).mean() > 1e-3
    assert np.abs(base - other_visual).mean() > 1e-3


def test_cpu_outputs_are_owned_by_the_caller(models):
    with CpuBackend(models["unet"]) as b:
        first = b.run(_feeds(1))["output"]
        keep = first.copy()
        b.run(_feeds(1, seed=3))
    np.testing.assert_array_equal(first, keep)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda f: {"input": f["input"]}, "missing 'audio'"),
        (lambda f: {**f, "extra": f["audio"]}, "unknown 'extra'"),
        (lambda f: {**f, "input": f["input"].astype(np.float64)}, "must be float32, got float64"),
        (lambda f: {**f, "input": (f["input"] * 255).astype(np.uint8)}, "uint8-visual"),
        (lambda f: {**f, "audio": np.zeros((2, 32, 32, 32), np.float32)}, r"dimension 2 is 32, the model needs 16"),
        (lambda f: {**f, "audio": np.zeros((2, 32, 16), np.float32)}, "must have 4 dimensions"),
        (lambda f: {**f, "audio": f["audio"][:1]}, "same batch size"),
        (lambda f: {"input": f["input"][:0], "audio": f["audio"][:0]}, "empty batch"),
        (lambda f: {**f, "audio": f["audio"].tolist()}, "must be a numpy array"),
    ],
)
def test_cpu_rejects_bad_feeds_with_clear_messages(models, mutate, match):
    with CpuBackend(models["unet"]) as b:
        with pytest.raises(BackendError, match=match):
            b.run(mutate(_feeds(2)))
        assert b.stats.calls == 0


def test_fixed_batch_and_max_batch_validation():
    inputs = [TensorInfo("x", (2, 3), np.dtype("float32"))]
    with pytest.raises(BackendError, match="fixed batch of 2"):
        check_feeds({"x": np.zeros((3, 3), np.float32)}, inputs)
    assert check_feeds({"x": np.zeros((2, 3), np.float32)}, inputs) == 2
    dyn = [TensorInfo("x", ("batch", 3), np.dtype("float32"))]
    with pytest.raises(BackendError, match="exceeds max_batch=4"):
        check_feeds({"x": np.zeros((5, 3), np.float32)}, dyn, max_batch=4)
    assert check_feeds({"x": np.zeros((4, 3), np.float32)}, dyn, max_batch=4) == 4
    with pytest.raises(BackendError, match="mapping"):
        check_feeds([np.zeros((1, 3))], dyn)  # type: ignore[arg-type]


def test_cpu_threads_and_optimization_options_reach_the_session(models):
    with CpuBackend(models["unet"], BackendOptions(threads=1, extra={"optimization": "disabled"})) as b:
        so = b._session.get_session_options()
        assert so.intra_op_num_threads == 1
        import onnxruntime as ort

        assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        out1 = b.run(_feeds(1))["output"]
    with CpuBackend(models["unet"], BackendOptions(threads=2)) as b:
        assert b._session.get_session_options().intra_op_num_threads == 2
        assert b._session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        np.testing.assert_allclose(b.run(_feeds(1))["output"], out1, atol=1e-5)


def test_cpu_profile_option_writes_a_profile(models, tmp_path):
    b = CpuBackend(models["unet"], BackendOptions(extra={"profile": str(tmp_path / "prof")}))
    b.run(_feeds(1))
    written = b._session.end_profiling()
    b.close()
    assert Path(written).is_file() and Path(written).name.startswith("prof")


@pytest.mark.parametrize(
    "options,error,match",
    [
        (BackendOptions(threads=0), ConfigError, "threads"),
        (BackendOptions(max_batch=0), ConfigError, "max_batch"),
        (BackendOptions(precision="int8"), ConfigError, "precision"),
        (BackendOptions(extra={"optimization": "max"}), ConfigError, "optimization"),
        (BackendOptions(extra={"no_such_option": 1}), ConfigError, "unknown option"),
        (BackendOptions(extra={"io_binding": False}), ConfigError, "unknown option"),  # a CUDA-only option
    ],
)
def test_cpu_rejects_bad_options(models, options, error, match):
    with pytest.raises(error, match=match):
        CpuBackend(models["unet"], options)


def test_cpu_bad_model_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        CpuBackend(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(BackendError, match="cannot load"):
        CpuBackend(tmp_path / "junk.onnx")


def test_cpu_closed_backend_refuses_to_run(models):
    b = CpuBackend(models["unet"])
    b.close()
    with pytest.raises(BackendError, match="closed"):
        b.run(_feeds(1))


def test_cpu_uint8_visual_option(models):
    x, a, want = _uint8_case(models["unet"], 3)
    with CpuBackend(models["unet"], BackendOptions(extra={"uint8_visual": True})) as b:
        assert np.dtype(b.inputs[0].dtype) == np.uint8
        assert b.model_file != models["unet"] and b.model_file.parent.name == "models"
        got = b.run({"input": x, "audio": a})["output"]
        with pytest.raises(BackendError, match="must be uint8"):
            b.run({"input": x.astype(np.float32), "audio": a})
    assert np.abs(want - got).max() <= 1e-6


def test_cpu_fp16_is_converted_checked_and_cached(models):
    feeds = _feeds(2)
    with CpuBackend(models["unet"]) as ref:
        want = ref.run(feeds)["output"]
    with CpuBackend(models["unet"], BackendOptions(precision="fp16")) as b:
        assert b.fp16_psnr is not None and b.fp16_psnr >= 40.0
        first_file = b.model_file
        assert first_file.name.endswith(".fp16.onnx")
        got = b.run(feeds)["output"]
        assert got.dtype == np.float32
    assert psnr(want, got) >= 40.0 and not np.array_equal(want, got)
    mtime = first_file.stat().st_mtime_ns
    with CpuBackend(models["unet"], BackendOptions(precision="fp16")) as again:
        assert again.model_file == first_file and first_file.stat().st_mtime_ns == mtime


def test_cpu_fp16_gate_refuses_an_inaccurate_conversion(models):
    with pytest.raises(BackendError, match="too inaccurate"):
        CpuBackend(models["unet"], BackendOptions(precision="fp16", extra={"fp16_min_psnr": 500}))
    with CpuBackend(models["unet"], BackendOptions(precision="fp16", extra={"fp16_min_psnr": 0})) as b:
        assert b.fp16_psnr is None  # 0 skips the check


def test_cpu_cache_dir_option(models, tmp_path):
    with CpuBackend(models["unet"], BackendOptions(extra={"uint8_visual": True, "cache_dir": str(tmp_path / "mine")})) as b:
        assert b.model_file.parent == tmp_path / "mine"


# --------------------------------------------------------------------------- onnx-cuda (CPU-side)


def test_onnx_cuda_availability_is_accurate_here():
    import onnxruntime

    a = OnnxCudaBackend.availability()
    driver_ok, reason, _ = cuda_driver_status()
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        # the CPU build replaced onnxruntime-gpu's module (pipecat-ai, the [pipecat] extra, requires it)
        assert not a.usable and "CPU build" in a.reason and "onnxruntime-gpu" in a.install
    elif not driver_ok:
        assert not a.usable
        assert reason in a.reason
        assert "libcuda.so.1" in a.reason or "GPU" in a.reason
        with pytest.raises(BackendUnavailable, match="onnx-cuda is unavailable"):
            OnnxCudaBackend("whatever.onnx")
        with pytest.raises(BackendUnavailable, match="onnx-cuda"):
            get_plugin_manager().backend_class("onnx-cuda")
    else:  # on a GPU machine the answer depends on the ONNX Runtime build
        assert a.usable or a.reason


def test_cuda_provider_options_follow_backend_options():
    po = cuda_provider_options(BackendOptions(device_id=3))
    assert po["device_id"] == "3" and po["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert "user_compute_stream" not in po and "gpu_mem_limit" not in po
    assert po["use_tf32"] == "0" and cuda_provider_options(BackendOptions(extra={"tf32": True}))["use_tf32"] == "1"
    po = cuda_provider_options(BackendOptions(extra={"cuda_stream": 1234, "gpu_mem_limit": 2 << 30, "cudnn_conv_algo_search": "HEURISTIC"}))
    assert po["user_compute_stream"] == "1234" and po["has_user_compute_stream"] == "1"
    assert po["gpu_mem_limit"] == str(2 << 30) and po["cudnn_conv_algo_search"] == "HEURISTIC"
    with pytest.raises(ConfigError, match="cudnn_conv_algo_search"):
        cuda_provider_options(BackendOptions(extra={"cudnn_conv_algo_search": "FAST"}))


# --------------------------------------------------------------------------- onnx-cuda (GPU)

needs_cuda = pytest.mark.skipif(not OnnxCudaBackend.availability().usable, reason="onnx-cuda is not usable here")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("io_binding", [True, False])
def test_gpu_onnx_cuda_matches_cpu(models, io_binding):
    feeds = _feeds(4)
    with CpuBackend(models["unet"]) as ref:
        want = ref.run(feeds)["output"]
        want1 = ref.run({k: v[:1] for k, v in feeds.items()})["output"]
    opts = BackendOptions(max_batch=4, extra={"io_binding": io_binding})
    with OnnxCudaBackend(models["unet"], opts) as b:
        assert "CUDAExecutionProvider" in b.providers
        got = b.run(feeds)["output"]
        got1 = b.run({k: v[:1] for k, v in feeds.items()})["output"]  # a tail batch: the batch-1 binding
        again = b.run(feeds)["output"]
        assert b.stats.calls == 3
        if io_binding:
            assert b.staging == "pinned" and sorted(b._bindings) == [1, 2, 4]
            with pytest.raises(BackendError, match="exceeds max_batch=4"):
                b.run(_feeds(5))
    assert np.abs(want - got).max() <= 1e-3
    assert np.abs(want1 - got1).max() <= 1e-3
    np.testing.assert_array_equal(got, again)
    assert not np.shares_memory(got, again)  # caller-owned copies


@pytest.mark.gpu
@needs_cuda
def test_gpu_onnx_cuda_fp16_and_uint8(models):
    x, a, want = _uint8_case(models["unet"], 4)
    with OnnxCudaBackend(models["unet"], BackendOptions(max_batch=4, extra={"uint8_visual": True})) as b:
        assert np.abs(b.run({"input": x, "audio": a})["output"] - want).max() <= 1e-3
    with OnnxCudaBackend(models["unet"], BackendOptions(max_batch=4, precision="fp16", extra={"uint8_visual": True})) as b:
        assert b.fp16_psnr is not None and b.fp16_psnr >= 40.0
        assert psnr(want, b.run({"input": x, "audio": a})["output"]) >= 40.0


@pytest.mark.gpu
@needs_cuda
def test_gpu_onnx_cuda_user_stream(models):
    cupy = pytest.importorskip("cupy")
    stream = cupy.cuda.Stream(non_blocking=True)
    with CpuBackend(models["unet"]) as ref:
        want = ref.run(_feeds(2))["output"]
    with OnnxCudaBackend(models["unet"], BackendOptions(max_batch=2, extra={"cuda_stream": stream.ptr})) as b:
        assert b.staging == "pinned" and b._staging.stream == stream.ptr  # copies and compute on the user's stream
        assert np.abs(b.run(_feeds(2))["output"] - want).max() <= 1e-3
    stream.synchronize()  # still alive: the backend did not destroy a stream it did not make


@pytest.mark.gpu
@needs_cuda
def test_gpu_onnx_cuda_places_compute_nodes_on_cuda_and_pads_partial_batches(models, caplog):
    feeds = _feeds(8)
    with CpuBackend(models["unet"]) as ref:
        want = ref.run(feeds)["output"]
    with caplog.at_level(logging.WARNING, logger="avatar_plugins.backends.ort"):
        opts = BackendOptions(max_batch=8, extra={"cpu_fallback": "error"})  # a compute node on the CPU fails the load
        with OnnxCudaBackend(models["unet"], opts) as b:
            assert b.node_placement.get("CUDAExecutionProvider", 0) > 0  # ONNX Runtime's real log was read
            assert sorted(b._bindings) == [1, 2, 4, 8]  # bound and warmed up at load
            for n in (3, 5, 7, 8, 1):  # live input's partial batches: padded, never a new binding
                np.testing.assert_allclose(b.run({k: v[:n] for k, v in feeds.items()})["output"], want[:n], atol=1e-3)
            assert sorted(b._bindings) == [1, 2, 4, 8]
    assert "could not read" not in caplog.text


@pytest.mark.gpu
@needs_cuda
def test_gpu_onnx_cuda_aliased_outputs_survive_close(models):
    import gc

    b = OnnxCudaBackend(models["unet"], BackendOptions(max_batch=2, extra={"alias_outputs": True}))
    st = b._staging
    assert b.staging == "pinned"
    out = b.run(_feeds(2))["output"]
    kept = out.copy()
    b.close()
    assert st._buffers  # not freed: an aliased output is alive
    np.testing.assert_array_equal(out, kept)
    del out
    gc.collect()
    assert st._buffers == []  # cudaFreeHost once the last alias died


@pytest.mark.gpu
@needs_cuda
def test_gpu_onnx_cuda_audio_encoder(models):
    mel = sample_mel(8)
    with CpuBackend(models["encoder"]) as ref, OnnxCudaBackend(models["encoder"], BackendOptions(max_batch=8)) as b:
        np.testing.assert_allclose(b.run({"mel": mel})["feature"], ref.run({"mel": mel})["feature"], atol=1e-3)


# --------------------------------------------------------------------------- benchmark script


def test_gpu_backends_benchmark_runs_on_cpu(tmp_path):
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_backends.py"
    res = subprocess.run(
        [sys.executable, str(script), "--tiny", "--batches", "1,2", "--repeats", "2", "--warmup", "1",
         "--cpu-repeats", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    (js,) = tmp_path.glob("gpu_*.json")
    doc = json.loads(js.read_text())
    assert js.with_suffix(".md").is_file()
    assert {"gpu", "cpu", "libraries"} & set(doc["device"]) and doc["device"]["libraries"]["onnxruntime"]
    rows = {r["variant"]: r for r in doc["results"]}
    cpu = rows["cpu"]
    assert cpu["status"] == "ok" and [c["batch"] for c in cpu["cells"]] == [1, 2]
    assert all(c["calls"] == 2 and c["median_ms"] > 0 and c["p95_ms"] >= c["median_ms"] for c in cpu["cells"])
    assert cpu["parity"]["max_abs"] == 0.0
    for label in ("onnx-cuda fp32", "tensorrt fp16"):
        assert rows[label]["status"] in ("ok", "skipped", "failed")
        if rows[label]["status"] == "skipped":
            assert rows[label]["reason"]
    # the table comes last on stdout
    assert res.stdout.strip().splitlines()[-1].startswith("| ")
    assert "| cpu | 2 |" in res.stdout


# --------------------------------------------------------------------------- IO binding logic on CPU memory


class _CpuMemoryStaging:
    """The staging interface over CPU memory: the same addresses and sizes, memmove for DMA.

    It counts the bytes each direction moves, so a test can see what crossed.
    """

    kind = "cpu-memory"
    stream = None

    def __init__(self) -> None:
        self.h2d_bytes = self.d2h_bytes = self.syncs = 0
        self.closed = False
        self._buffers: list[np.ndarray] = []

    def empty(self, shape, dtype):  # type: ignore[no-untyped-def]
        arr = np.full(shape, 7, dtype)  # not zeros: a missed copy must show
        self._buffers.append(arr)
        return arr

    def bind_thread(self) -> None:
        pass

    def to_device(self, dst_ptr, src):  # type: ignore[no-untyped-def]
        ctypes.memmove(dst_ptr, src.ctypes.data, src.nbytes)
        self.h2d_bytes += src.nbytes

    def to_host(self, dst, src_ptr):  # type: ignore[no-untyped-def]
        ctypes.memmove(dst.ctypes.data, src_ptr, dst.nbytes)
        self.d2h_bytes += dst.nbytes

    def synchronize(self) -> None:
        self.syncs += 1

    def close(self) -> None:
        """Like cudaFreeHost, but the bytes stay mapped and poisoned (NaN), so a read of freed memory shows."""
        for arr in self._buffers:
            arr.view(np.uint8).fill(0xFF)
        self._buffers = []
        self.closed = True


class _BoundOnCpu(OnnxCudaBackend):
    """onnx-cuda's IO-binding path with its buffers in CPU memory (same code, no GPU needed)."""

    name = "test-bound-cpu"
    provider = "CPUExecutionProvider"
    _device_type = "cpu"

    @classmethod
    def availability(cls):  # type: ignore[no-untyped-def]
        from avatar.interfaces import Availability

        return Availability.ok()

    _loads = availability

    def _providers(self):  # type: ignore[no-untyped-def]
        return ["CPUExecutionProvider"]

    def _new_staging(self, device_id, stream):  # type: ignore[no-untyped-def]
        return _CpuMemoryStaging()


class _RealStagingOnCpu(_BoundOnCpu):
    """As above, but with the real page-locked staging (which cannot start without a GPU)."""

    _new_staging = OnnxCudaBackend._new_staging


def test_io_binding_path_binds_fixed_sizes_at_load_and_pads_partial_batches(models):
    feeds = _feeds(4)
    with CpuBackend(models["unet"]) as ref:
        want = ref.run(feeds)["output"]
        want_tail = ref.run({k: v[:3] for k, v in feeds.items()})["output"]
    with _BoundOnCpu(models["unet"], BackendOptions(max_batch=4)) as b:
        st = b._staging
        assert sorted(b._bindings) == [1, 2, 4]  # every size a run will use, bound (and run once) at load
        assert b.staging == "cpu-memory" and {k: v.shape[0] for k, v in b._host.items()} == {"input": 4, "audio": 4, "output": 4}
        syncs_at_load = st.syncs
        got = b.run(feeds)["output"]
        tail = b.run({k: v[:3] for k, v in feeds.items()})["output"]  # runs in the batch-4 buffers
        assert sorted(b._bindings) == [1, 2, 4] and tail.shape[0] == 3  # no new binding; only the real rows back
        in_bytes = sum(v.nbytes for v in feeds.values())
        assert st.h2d_bytes == in_bytes + in_bytes * 3 // 4  # every input byte crossed; the tail only its rows
        assert st.d2h_bytes == want.nbytes + want_tail.nbytes and st.syncs - syncs_at_load == 2
        again = b.run(_feeds(4, seed=8))["output"]
        assert b.stats.calls == 3
        with pytest.raises(BackendError, match="exceeds max_batch=4"):
            b.run(_feeds(5))
    assert st.closed and b._host == {}
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(tail, want_tail, atol=1e-6)
    assert np.abs(again - got).mean() > 1e-3  # new inputs really reached the bound buffers
    assert not np.shares_memory(got, again)


def test_batch_sizes_option_pads_to_the_next_bound_size(models):
    feeds = _feeds(5)
    with CpuBackend(models["unet"]) as ref:
        want = ref.run(feeds)["output"]
    for staging in ("auto", "pageable"):
        opts = BackendOptions(max_batch=6, extra={"batch_sizes": "2,5", "staging": staging, "warmup": False})
        with _BoundOnCpu(models["unet"], opts) as b:
            assert sorted(b._bindings) == [2, 5, 6]  # max_batch is always bound
            for n in (1, 3, 5):
                out = b.run({k: v[:n] for k, v in feeds.items()})["output"]
                assert out.shape[0] == n
                np.testing.assert_allclose(out, want[:n], atol=1e-6)  # padding rows never leak into the result
            assert sorted(b._bindings) == [2, 5, 6]


def test_batch_sizes_default_and_validation():
    from avatar_plugins.backends.ort import batch_sizes

    assert batch_sizes(None, 8) == [1, 2, 4, 8] and batch_sizes(None, 6) == [1, 2, 4, 6] and batch_sizes(None, 1) == [1]
    assert batch_sizes("1,4", 8) == [1, 4, 8] and batch_sizes(3, 8) == [3, 8] and batch_sizes([2, 2], 2) == [2]
    for bad in ("0,4", "9", "a,b", ""):
        with pytest.raises(ConfigError, match="batch_sizes"):
            batch_sizes(bad, 8)


def test_warmup_runs_every_bound_size_at_load(models, monkeypatch):
    import onnxruntime as ort

    runs: list[int] = []
    real = ort.InferenceSession.run_with_iobinding

    def counting(self, iobinding, run_options=None):  # type: ignore[no-untyped-def]
        runs.append(1)
        return real(self, iobinding, run_options)

    monkeypatch.setattr(ort.InferenceSession, "run_with_iobinding", counting)
    with _BoundOnCpu(models["unet"], BackendOptions(max_batch=8)):
        assert len(runs) == 4  # 1, 2, 4, 8: the cuDNN algorithm search happens here, not mid-stream
    runs.clear()
    with _BoundOnCpu(models["unet"], BackendOptions(max_batch=8, extra={"warmup": False})):
        assert runs == []


def test_io_binding_can_be_switched_off(models):
    with _BoundOnCpu(models["unet"], BackendOptions(max_batch=2, extra={"io_binding": False})) as b:
        assert b._bindings == {}
        out = b.run(_feeds(5))["output"]  # no buffers, so no max_batch limit
        assert out.shape[0] == 5 and b._bindings == {}


def test_staged_uint8_visual_moves_a_quarter_of_the_bytes(models):
    x, a, want = _uint8_case(models["unet"], 2)
    with _BoundOnCpu(models["unet"], BackendOptions(max_batch=2, extra={"uint8_visual": True})) as b:
        assert b._host["input"].dtype == np.uint8
        got = b.run({"input": x, "audio": a})["output"]
        assert b._staging.h2d_bytes == x.nbytes + a.nbytes and x.nbytes * 4 == x.astype(np.float32).nbytes
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_alias_outputs_returns_the_staging_buffer(models):
    with _BoundOnCpu(models["unet"], BackendOptions(max_batch=2, extra={"alias_outputs": True})) as b:
        first = b.run(_feeds(2))["output"]
        kept = first.copy()
        second = b.run(_feeds(2, seed=5))["output"]
        assert np.shares_memory(first, second) and np.shares_memory(second, b._host["output"])
        np.testing.assert_array_equal(first, second)  # overwritten by the next run, as documented
        assert np.abs(kept - second).mean() > 1e-3
    with _BoundOnCpu(models["unet"], BackendOptions(max_batch=2)) as b:
        assert not np.shares_memory(b.run(_feeds(2))["output"], b._host["output"])


def test_pageable_staging_option_uses_ort_copies(models):
    feeds = _feeds(2)
    with _BoundOnCpu(models["unet"], BackendOptions(max_batch=2)) as staged:
        want = staged.run(feeds)["output"]
    with _BoundOnCpu(models["unet"], BackendOptions(max_batch=2, extra={"staging": "pageable"})) as b:
        assert b.staging == "pageable" and b._staging is None and b._host == {}
        np.testing.assert_array_equal(b.run(feeds)["output"], want)
    with _BoundOnCpu(models["unet"], BackendOptions(max_batch=2, extra={"io_binding": False})) as b:
        assert b.staging == "none" and b._staging is None
    with pytest.raises(ConfigError, match="staging must be auto, pinned or pageable"):
        _BoundOnCpu(models["unet"], BackendOptions(extra={"staging": "fast"}))


@pytest.mark.skipif(cuda_driver_status()[0], reason="checks the fallback where no GPU is usable")
def test_page_locked_staging_falls_back_or_fails_clearly_without_a_gpu(models, caplog):
    with caplog.at_level(logging.WARNING, logger="avatar_plugins.backends.ort"):
        with _RealStagingOnCpu(models["unet"], BackendOptions(max_batch=2)) as b:
            assert b.staging == "pageable"
            assert b.run(_feeds(2))["output"].shape == (2, 3, 320, 320)
    assert "copies through pageable memory" in caplog.text
    with pytest.raises(BackendUnavailable, match="cuda-bindings"):
        _RealStagingOnCpu(models["unet"], BackendOptions(extra={"staging": "pinned"}))


def test_pinned_staging_error_names_the_cuda_call_and_the_fix():
    pytest.importorskip("cuda.bindings")
    if cuda_driver_status()[0]:
        pytest.skip("a GPU is usable here")
    from avatar_plugins.backends._cuda_staging import MATCH_DRIVER, PinnedStaging

    with pytest.raises(BackendUnavailable) as err:
        PinnedStaging(0)
    msg = str(err.value)
    assert "cudaSetDevice failed: cudaError" in msg and MATCH_DRIVER in msg


def test_aliased_outputs_keep_the_staging_alive_after_close(models):
    import gc

    b = _BoundOnCpu(models["unet"], BackendOptions(max_batch=2, extra={"alias_outputs": True}))
    st = b._staging
    out = b.run(_feeds(2))["output"]
    kept = out.copy()
    view = out[1:]
    b.close()
    assert not st.closed  # an aliased output is alive: the staging is not freed under it
    np.testing.assert_array_equal(out, kept)  # no poison
    del out
    gc.collect()
    assert not st.closed  # a view of it still holds the lease
    np.testing.assert_array_equal(view, kept[1:])
    del view
    gc.collect()
    assert st.closed  # freed once the last alias died
    with pytest.raises(BackendError, match="closed"):
        b.run(_feeds(1))
    with _BoundOnCpu(models["unet"], BackendOptions(max_batch=2)) as b2:  # without aliasing: freed at close
        st2 = b2._staging
        b2.run(_feeds(1))
    assert st2.closed


# --------------------------------------------------------------------------- onnx-cuda: provider options, placement, availability


def test_cuda_provider_options_reach_the_session(models, ort_sessions):
    class _AsksForCuda(_BoundOnCpu):
        """The real onnx-cuda provider list; ONNX Runtime falls back to the CPU here (no GPU)."""

        _providers = OnnxCudaBackend._providers
        def _check_providers(self) -> None:  # the session has no CUDA here; the options are what is checked
            pass

    opts = BackendOptions(max_batch=2, device_id=0, extra={"cudnn_conv_algo_search": "HEURISTIC", "tf32": True, "warmup": False})
    with _AsksForCuda(models["unet"], opts) as b:
        assert b.run(_feeds(1))["output"].shape == (1, 3, 320, 320)
    (providers,) = [p for p in ort_sessions.providers if p]
    name, po = providers[0]
    assert name == "CUDAExecutionProvider" and providers[1] == "CPUExecutionProvider"
    assert po["cudnn_conv_algo_search"] == "HEURISTIC" and po["use_tf32"] == "1" and po["device_id"] == "0"
    with pytest.raises(ConfigError, match="cudnn_conv_algo_search"):
        _AsksForCuda(models["unet"], BackendOptions(extra={"cudnn_conv_algo_search": "FAST"}))


class _FallsBackToCpu(_BoundOnCpu):
    """Asks for CUDA, gets the CPU: the real ONNX Runtime log of a real session is what is checked."""

    provider = "CUDAExecutionProvider"

    def _check_providers(self) -> None:  # the session-level check would refuse first; test the node-level one
        self._check_placement(self.model_file)


def test_cpu_fallback_of_compute_nodes_is_visible(models, caplog, capfd):
    with caplog.at_level(logging.WARNING, logger="avatar_plugins.backends.ort"):
        with _FallsBackToCpu(models["unet"], BackendOptions(max_batch=1, extra={"warmup": False})) as b:
            pass
    assert "runs all 19 nodes of tiny.onnx on the CPU, not on CUDAExecutionProvider" in caplog.text
    assert b.node_placement == {"CPUExecutionProvider": 19}
    assert "VerifyEachNodeIsAssignedToAnEp" not in capfd.readouterr().err  # the VERBOSE log stays captured
    with pytest.raises(BackendError, match="on the CPU.*cpu_fallback=warn"):
        _FallsBackToCpu(models["unet"], BackendOptions(max_batch=1, extra={"cpu_fallback": "error"}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="avatar_plugins.backends.ort"):
        with _FallsBackToCpu(models["unet"], BackendOptions(max_batch=1, extra={"cpu_fallback": "off", "warmup": False})):
            pass
    assert "on the CPU" not in caplog.text
    with pytest.raises(ConfigError, match="cpu_fallback must be warn, error or off"):
        _BoundOnCpu(models["unet"], BackendOptions(extra={"cpu_fallback": "maybe"}))
    with _BoundOnCpu(models["unet"], BackendOptions(max_batch=1, extra={"warmup": False})):
        pass  # asks for the CPU and gets it: nothing to say


_MIXED_LOG = """\
2026-01-01 00:00:00.1 [V:onnxruntime:, session_state.cc:1578 VerifyEachNodeIsAssignedToAnEp] Node placements
2026-01-01 00:00:00.2 [V:onnxruntime:, session_state.cc:1590 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 3
  Conv (conv1)
  Relu (relu1)
  Conv (conv2)

2026-01-01 00:00:00.3 [V:onnxruntime:, session_state.cc:1590 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 4
  Shape (shape1)
  Gather (gather1)
  Resize (up1)
  Resize (up2)

2026-01-01 00:00:00.4 [W:onnxruntime:, session_state.cc:1200 VerifyEachNodeIsAssignedToAnEp] Some nodes were not assigned to the preferred execution providers
2026-01-01 00:00:00.5 [E:onnxruntime:, inference_session.cc:1 Init] something that must stay visible
a line another thread printed
"""


def test_node_placement_parsing_and_what_stays_visible():
    from avatar_plugins.backends import _ort_placement as pl

    placements = pl.node_placements(_MIXED_LOG)
    assert placements == {"CUDAExecutionProvider": (3, ["Conv", "Relu", "Conv"]), "CPUExecutionProvider": (4, ["Shape", "Gather", "Resize", "Resize"])}
    found = pl.cpu_fallbacks(placements, "CUDAExecutionProvider")
    assert found == (2, ["Resize", "Resize"])  # shape computations on the CPU are ORT's choice, not a fallback
    assert pl.describe(*found, 7) == "2 of 7 nodes (Resize x2)"
    only_shapes = {"CUDAExecutionProvider": (3, []), "CPUExecutionProvider": (2, ["Shape", "Gather"])}
    assert pl.cpu_fallbacks(only_shapes, "CUDAExecutionProvider") is None
    assert pl.cpu_fallbacks(placements, "CPUExecutionProvider") is None
    kept = pl.visible(_MIXED_LOG)
    assert kept.splitlines() == [
        "2026-01-01 00:00:00.5 [E:onnxruntime:, inference_session.cc:1 Init] something that must stay visible",
        "a line another thread printed",
    ]


def test_availability_does_not_load_the_cuda_provider_library(monkeypatch):
    """`avatar plugins` asks every backend; loading CUDA, cuBLAS and cuDNN there is seconds and hundreds of MB."""
    from avatar.interfaces import Availability
    from avatar_plugins.backends import ort as ort_mod

    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu installed (the default install)")
    loaded: list[str] = []
    real_cdll = ctypes.CDLL

    def recording_cdll(name, *a, **k):  # type: ignore[no-untyped-def]
        loaded.append(str(name))
        return real_cdll(name, *a, **k)

    monkeypatch.setattr(ctypes, "CDLL", recording_cdll)
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda *a, **k: loaded.append("preload_dlls"), raising=False)
    monkeypatch.setattr(ort_mod, "cuda_driver_status", lambda: (True, "", 1))  # as on a GPU machine
    assert ort_mod._cuda_provider_status.__wrapped__() == Availability.ok()
    assert loaded == []  # nothing loaded for the cheap check
    ort_mod._cuda_provider_loads.__wrapped__()  # the check at load does load it
    assert loaded[0] == "preload_dlls" and any("providers_cuda" in n for n in loaded)


def test_gpu_dependencies_pin_one_cuda_major():
    """onnxruntime-gpu and cuda-bindings must need the same CUDA major (13): one driver serves both."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = {r.name: r.specifier for r in map(Requirement, deps)}
    # 1.25 and older are CUDA 12 builds on PyPI, 1.27 to 1.31 CUDA 13 (read from their wheel metadata)
    assert [v in spec["onnxruntime-gpu"] for v in ("1.25.0", "1.27.0", "1.31.1", "1.32.0")] == [False, True, True, False]
    assert [v in spec["cuda-bindings"] for v in ("12.9.0", "13.0.0", "13.5.0", "14.0.0")] == [False, True, True, False]
    try:  # what is installed here agrees
        from onnxruntime.capi import build_and_package_info as info
        import cuda.bindings
    except ImportError:
        return
    if getattr(info, "package_name", "") == "onnxruntime-gpu":
        assert info.cuda_version.split(".")[0] == cuda.bindings.__version__.split(".")[0] == "13"


def _stateful_model(path: Path) -> Path:
    """A WeNet-like signature: a batch input beside fixed-size inputs (a cache, an offset) and outputs."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["cache"], ["total"], keepdims=0),
            helper.make_node("Cast", ["offset"], ["offset_f"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["total", "offset_f"], ["shift"]),
            helper.make_node("Add", ["x", "shift"], ["y"]),
            helper.make_node("Add", ["cache", "cache"], ["new_cache"]),
        ],
        "stateful",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4]),
            helper.make_tensor_value_info("offset", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("cache", TensorProto.FLOAT, [3, 2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4]),
            helper.make_tensor_value_info("new_cache", TensorProto.FLOAT, [3, 2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("staging", ["auto", "pageable"])
def test_bound_buffers_keep_fixed_size_inputs_and_outputs_whole(tmp_path, staging):
    model = _stateful_model(tmp_path / "stateful.onnx")
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((3, 2)).astype(np.float32)
    offset = np.array([2], np.int64)
    with _BoundOnCpu(model, BackendOptions(max_batch=4, extra={"staging": staging})) as b:
        for n in (4, 3, 1):
            x = rng.standard_normal((n, 4)).astype(np.float32)
            out = b.run({"x": x, "offset": offset, "cache": cache})
            np.testing.assert_allclose(out["y"], x + cache.sum() + 2, rtol=1e-6)
            np.testing.assert_array_equal(out["new_cache"], cache * 2)
