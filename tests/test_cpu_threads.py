"""Per-stage CPU accounting, the native threads of a backend, the thread budget, and threads after sessions end."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from avatar.engine.cpu import CPU_STAGES, NativeThreads, StageCpu, cpu_per_frame
from avatar.engine.threads import ThreadBudget, machine_cores, thread_counts
from avatar.errors import ConfigError
from avatar.interfaces import BackendOptions


def _burn(cpu_s: float) -> None:
    t = time.thread_time()
    x = 0
    while time.thread_time() - t < cpu_s:
        x += 1


def test_stage_cpu_counts_this_threads_cpu_not_its_waiting() -> None:
    cpu = StageCpu()
    with cpu.measure("composite", kind="speech"):
        _burn(0.03)
    with cpu.measure("decode", kind="idle"):
        time.sleep(0.05)  # waiting costs no CPU
    s = cpu.snapshot()
    assert s["speech"]["composite"] >= 0.03
    assert s["idle"]["decode"] < 0.01
    assert set(s["speech"]) == set(CPU_STAGES)
    per = cpu_per_frame(cpu, speech_frames=3, idle_frames=0)
    assert set(per) == {"speech"}  # no idle frames: no idle row
    assert per["speech"]["composite"] == pytest.approx(1000 * s["speech"]["composite"] / 3)
    assert per["speech"]["total"] == pytest.approx(sum(v for k, v in per["speech"].items() if k != "total"))
    other = StageCpu()
    other.add("encode", 0.5, "idle")
    cpu.merge(other)
    assert cpu.snapshot()["idle"]["encode"] == 0.5


ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avatar.models.synthetic import make_unet

    return make_unet(tmp_path_factory.mktemp("cpu") / "unet.onnx", mode="ave", seed=0, tiny=True)


def _feeds(n: int = 2) -> dict[str, np.ndarray]:
    from avatar.models.synthetic import sample_audio, sample_visual

    return {"input": sample_visual(n), "audio": sample_audio("ave", n)}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread CPU needs /proc")
def test_native_threads_of_a_backend_are_found_and_their_cpu_read(unet: Path) -> None:
    if machine_cores() < 2:
        pytest.skip("an intra-op pool needs two cores")
    from avatar.plugins import get_plugin_manager

    be = get_plugin_manager().backend_class("cpu")(unet, BackendOptions(threads=2, max_batch=4))
    try:
        feeds = _feeds(4)
        be.run(feeds)
        # the pool's threads do work in a batch-4 call of the tiny UNet; spin off, so all of it is work
        _, pool = NativeThreads.discover(lambda: [be.run(feeds) for _ in range(20)])
        assert pool.threads >= 1  # the caller is not counted: only ONNX Runtime's own pool
        before = pool.cpu_s()
        for _ in range(40):
            be.run(feeds)
        assert pool.cpu_s() > before
    finally:
        be.close()


def test_ort_spin_option_reaches_the_session_and_is_checked() -> None:
    from avatar_plugins.backends.ort import session_options

    key = "session.intra_op.allow_spinning"
    assert session_options(BackendOptions(extra={"spin": "0"})).get_session_config_entry(key) == "0"
    assert session_options(BackendOptions()).get_session_config_entry(key) == "1"
    with pytest.raises(ConfigError, match="spin"):
        session_options(BackendOptions(extra={"spin": "maybe"}))


def test_thread_budget_plan_and_options() -> None:
    cpu = ThreadBudget.plan(4)
    assert (cpu.backend, cpu.encoder, cpu.opencv, cpu.spin) == (4, 1, 1, False)
    assert ThreadBudget.plan(4, gpu=True).backend == 1
    o = cpu.backend_options("cpu", BackendOptions(max_batch=8))
    assert o.threads == 4 and o.extra["spin"] == "0" and o.max_batch == 8
    assert cpu.backend_options("cpu", BackendOptions(threads=3)).threads == 3  # the user's choice wins
    # a backend without the option gets none (it would refuse an unknown option)
    assert "spin" not in cpu.backend_options("openvino").extra
    assert cpu.feature_options("ave", {"encoder": "e.onnx"}) == {"encoder": "e.onnx", "threads": 1, "min_rows": 2}
    assert ThreadBudget.plan(4, gpu=True).feature_options("ave", {}) == {"threads": 1}
    assert cpu.feature_options("ave", {"min_rows": 1})["min_rows"] == 1  # the user's choice wins
    assert cpu.feature_options("npy", {}) == {}


def test_thread_budget_lanes_become_openvino_streams() -> None:
    cpu = ThreadBudget.plan(4)
    assert cpu.lanes == 2 and ThreadBudget.plan(1).lanes == 1 and ThreadBudget.plan(4, gpu=True).lanes == 1
    ov = cpu.backend_options("openvino", BackendOptions(max_batch=4))
    assert ov.threads == 4 and dict(ov.extra) == {"streams": "2", "performance_hint": "THROUGHPUT"}
    # the user's hint or streams win; one lane changes nothing; a backend without streams gets none
    mine = cpu.backend_options("openvino", BackendOptions(extra={"performance_hint": "LATENCY"}))
    assert dict(mine.extra) == {"performance_hint": "LATENCY"}
    assert cpu.backend_options("openvino", BackendOptions(extra={"streams": "3"})).extra["streams"] == "3"
    assert "streams" not in ThreadBudget(cores=4, backend=4, lanes=1).backend_options("openvino").extra
    assert "streams" not in cpu.backend_options("cpu").extra and "performance_hint" not in cpu.backend_options("cpu").extra


def test_a_service_with_a_thread_budget_sizes_its_pools(tiny_job: dict[str, Path]) -> None:
    import cv2

    from avatar.engine import AvatarService, ServiceOptions

    before = cv2.getNumThreads()
    budget = ThreadBudget(cores=2, backend=2, encoder=1, opencv=1)
    try:
        with AvatarService(ServiceOptions(backend="cpu", warmup=False, threads=budget)) as svc:
            assert cv2.getNumThreads() == 1
            s = svc.open_session(tiny_job["pkg"], sinks=[_null()], model=tiny_job["unet"],
                                 feature_options={"encoder": str(tiny_job["enc"])})
            assert s.source.backend.options.threads == 1  # the audio encoder: one thread
            be = s.scheduler.backend.options
            assert be.threads == 2 and be.extra["spin"] == "0"
        with AvatarService(ServiceOptions(backend="cpu", warmup=False, threads=None)) as svc:  # the libraries' own
            s = svc.open_session(tiny_job["pkg"], sinks=[_null()], model=tiny_job["unet"],
                                 feature_options={"encoder": str(tiny_job["enc"])})
            assert s.source.backend.options.threads is None and "spin" not in s.scheduler.backend.options.extra
        with AvatarService(ServiceOptions(backend="cpu", warmup=False)) as svc:  # the default: planned here
            s = svc.open_session(tiny_job["pkg"], sinks=[_null()], model=tiny_job["unet"],
                                 feature_options={"encoder": str(tiny_job["enc"])})
            assert s.scheduler.backend.options.threads == machine_cores()
            assert s.scheduler.backend.options.extra["spin"] == "0"
        with pytest.raises(ConfigError, match="threads"):
            AvatarService(ServiceOptions(backend="cpu", threads="many"))
    finally:
        cv2.setNumThreads(before)


def _null():  # type: ignore[no-untyped-def]
    from avatar.interfaces import Sink, SinkReport

    class Null(Sink):
        name = "null"

        def open(self, info):  # type: ignore[no-untyped-def]
            pass

        def write(self, frame):  # type: ignore[no-untyped-def]
            pass

        def close(self, aborted: bool = False) -> SinkReport:
            return SinkReport()

    return Null()


def test_threads_come_back_after_n_sessions_open_and_close(tmp_path: Path) -> None:
    from avatar.demo import synthetic_frames
    from avatar.engine import AvatarService, Clock
    from avatar.models.synthetic import make_audio_encoder, make_unet
    from avatar.package import write_package

    frames, boxes = synthetic_frames(8, width=192, height=128)
    unet = make_unet(tmp_path / "unet.onnx", mode="ave", seed=1, tiny=True)
    enc = make_audio_encoder(tmp_path / "enc.onnx", seed=1, tiny=True)
    pkg = write_package(tmp_path / "a", iter(frames), boxes, fps=25, name="t", model=unet, audio_encoder=enc,
                        preset="ultrafast")

    from avatar.interfaces import Sink, SinkReport, StreamInfo, VideoFrame

    class Null(Sink):
        name = "null"

        def open(self, info: StreamInfo) -> None:
            pass

        def write(self, frame: VideoFrame) -> None:
            pass

        def close(self, aborted: bool = False) -> SinkReport:
            return SinkReport()

    base = thread_counts()
    svc = AvatarService(backend="cpu", clock=Clock.scaled(2.0), warmup=False)
    sessions = [svc.open_session(pkg, sinks=[Null()]) for _ in range(3)]
    opened = thread_counts()
    per_session = (opened["python"] - base["python"] - 1) / 3  # less the shared scheduler thread
    assert per_session >= 2  # each session runs its own stages
    for s in sessions:
        s.push_audio(np.zeros(8000, np.float32))
        s.flush()
    time.sleep(0.3)
    for s in sessions:
        s.close()
    after_sessions = thread_counts()
    assert after_sessions["python"] == base["python"] + 1  # only the shared scheduler is left
    more = [svc.open_session(pkg, sinks=[Null()]) for _ in range(3)]
    for s in more:
        s.close()
    again = thread_counts()  # open and close again: nothing piles up
    assert again["python"] == after_sessions["python"]
    assert again["total"] <= after_sessions["total"] + 2  # a native decoder thread may come and go
    svc.close()
    end = thread_counts()
    assert end["python"] == base["python"]
    assert end["total"] <= base["total"] + 2  # a native pool of the closed backends may linger in the runtime


def test_a_render_report_has_cpu_per_frame_by_stage(tiny_job: dict[str, Path], tmp_path: Path) -> None:
    from avatar.render import render

    report = render(tiny_job["pkg"], tiny_job["long"], model=tiny_job["unet"], backend="cpu",
                    feature_options={"encoder": str(tiny_job["enc"])},
                    sinks=[("file", {"path": str(tmp_path / "o.mp4")})], batch_size=4)
    cpu = report.to_dict()["cpu_ms_per_frame"]
    assert set(cpu) == {"speech"}  # an offline render has no idle frames
    row = cpu["speech"]
    # every stage did work for these frames, and the total is their sum
    for stage in ("decode", "features", "visual", "inference", "composite", "encode"):
        assert row[stage] > 0, stage
    assert row["total"] == pytest.approx(sum(v for k, v in row.items() if k != "total"))


def test_metrics_show_cpu_by_stage_and_kind(tiny_job: dict[str, Path]) -> None:
    pytest.importorskip("prometheus_client")
    from types import SimpleNamespace

    from avatar.engine import AvatarService, Clock
    from avatar.serve.live import LiveSession
    from avatar.serve.metrics import MeterSink, ServerMetrics
    from avatar.serve.sessions import _collect_cpu

    metrics = ServerMetrics()
    record = SimpleNamespace(cpu_seen={}, frames_seen={})
    with AvatarService(backend="cpu", clock=Clock.scaled(2.0), warmup=False) as svc:
        s = svc.open_session(tiny_job["pkg"], sinks=[MeterSink()], model=tiny_job["unet"],
                             feature_options={"encoder": str(tiny_job["enc"])})
        live = LiveSession(s, s.fps)
        deadline = time.monotonic() + 30
        while s.frames < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        _collect_cpu(metrics, record, live.stats())
        first = dict(record.frames_seen)
        _collect_cpu(metrics, record, live.stats())  # collecting again adds only what is new
        text = metrics.render()[0].decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("avatar_")}
    assert values['avatar_frames_kind_total{kind="idle"}'] >= first["idle"] >= 20
    assert values['avatar_stage_cpu_seconds_total{kind="idle",stage="decode"}'] > 0
    assert values['avatar_stage_cpu_seconds_total{kind="idle",stage="encode"}'] >= 0


def test_avatar_run_renders_under_the_thread_budget_unless_threads_are_given(tiny_job: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    import json

    import cv2
    from click.testing import CliRunner

    from avatar.cli import cli
    from avatar.render import render

    before = cv2.getNumThreads()
    base = ["run", "--avatar", str(tiny_job["pkg"]), "--audio", str(tiny_job["short"]), "--model", str(tiny_job["unet"]),
            "--ave-encoder", str(tiny_job["enc"]), "--backend", "cpu"]
    try:
        r = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "a.mp4"), "--report", str(tmp_path / "a.json")])
        assert r.exit_code == 0, r.output
        report = json.loads((tmp_path / "a.json").read_text())
        assert report["threads"] == ThreadBudget.plan().to_dict()
        assert report["batch_size"] == 8  # (a file: the default batch; a real-time sink on a CPU gets 1)
        assert cv2.getNumThreads() == 1  # the budget's OpenCV pool
        cv2.setNumThreads(before)
        r = CliRunner().invoke(cli, [*base, "--threads", "1", "-o", str(tmp_path / "b.mp4"),
                                     "--report", str(tmp_path / "b.json")])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / "b.json").read_text())["threads"] is None  # exactly the threads asked for
        assert cv2.getNumThreads() == before
        with pytest.raises(ConfigError, match="threads"):
            render(tiny_job["pkg"], tiny_job["short"], model=tiny_job["unet"], backend="cpu", threads="many",
                   feature_options={"encoder": str(tiny_job["enc"])}, sinks=[("file", {"path": str(tmp_path / "c.mp4")})])
    finally:
        cv2.setNumThreads(before)
