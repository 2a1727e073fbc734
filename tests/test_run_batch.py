"""``avatar run-batch`` without Ray: reading jobs, local renders, atomic outputs, reports, failures.

(The Ray path — workers, a killed worker, retries — is in tests/test_scale_ray.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from avatar.errors import ConfigError
from avatar.scale.batch import read_jobs


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from avatar.demo import build_demo, speechlike_audio, write_wav

    work = tmp_path_factory.mktemp("batch")
    paths = build_demo(work / "demo", tiny=True)
    (work / "audio").mkdir()
    for k in range(2):
        write_wav(work / "audio" / f"a{k}.wav", speechlike_audio(0.4, seed=k))
    return {**paths, "work": work}


def test_jobs_from_csv_jsonl_and_a_folder(kit: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = kit["work"]
    csv = w / "jobs.csv"
    csv.write_text('id,avatar,audio,options\nfirst,demo/avatar,audio/a0.wav,"{""walk_start"": 3}"\n'
                   'second,demo/avatar,audio/a1.wav,\n')
    monkeypatch.chdir(tmp_path)  # a row's relative path is relative to the jobs file, not the working folder
    jobs = read_jobs(csv, model=str(kit["model"]), encoder=str(kit["encoder"]))
    assert [j.id for j in jobs] == ["first", "second"]
    assert jobs[0].avatar == str(kit["avatar"].resolve()) and jobs[0].options == {"walk_start": 3}
    assert jobs[0].output == "first.mp4" and jobs[0].feature_options == {"encoder": str(kit["encoder"].resolve())}
    jsonl = w / "jobs.jsonl"
    jsonl.write_text(json.dumps({"avatar": "demo/avatar", "audio": "audio/a0.wav", "output": "x.mp4"}) + "\n\n")
    assert [(j.id, j.output) for j in read_jobs(jsonl)] == [("a0", "x.mp4")]
    folder = read_jobs(w / "audio", avatar=str(kit["avatar"]))
    assert [j.id for j in folder] == ["a0", "a1"]

    bad = {
        "no avatar": ({"audio": "audio/a0.wav"}, "no 'avatar'"),
        "missing audio": ({"avatar": "demo/avatar", "audio": "audio/nope.wav"}, "does not exist"),
        "output outside": ({"avatar": "demo/avatar", "audio": "audio/a0.wav", "output": "../x.mp4"}, "plain .mp4"),
        "unknown option": ({"avatar": "demo/avatar", "audio": "audio/a0.wav", "options": {"sinks": 1}}, "options may set"),
    }
    for what, (row, msg) in bad.items():
        jsonl.write_text(json.dumps(row) + "\n")
        with pytest.raises(ConfigError, match=msg):
            read_jobs(jsonl)
    jsonl.write_text(json.dumps({"avatar": "demo/avatar", "audio": "audio/a0.wav"}) + "\n" +
                     json.dumps({"avatar": "demo/avatar", "audio": "audio/a0.wav"}) + "\n")
    with pytest.raises(ConfigError, match="two jobs have the id 'a0'"):
        read_jobs(jsonl)
    jsonl.write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"jobs.jsonl:1: not a JSON object"):
        read_jobs(jsonl)
    with pytest.raises(ConfigError, match="--avatar"):
        read_jobs(w / "audio")


def test_run_batch_command_locally(kit: dict[str, Path], tmp_path: Path) -> None:
    import av

    from avatar.cli import cli

    w = kit["work"]
    (tmp_path / "broken.wav").write_bytes(b"RIFF but no wave")
    jobs = tmp_path / "jobs.jsonl"
    rows = [{"id": "plain", "audio": str(w / "audio" / "a0.wav")},
            {"id": "walked", "audio": str(w / "audio" / "a0.wav"), "options": {"walk_start": 5}},
            {"id": "broken", "audio": "broken.wav"}]
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["run-batch", str(jobs), "-o", str(out), "--avatar", str(kit["avatar"]),
                                   "--model", str(kit["model"]), "--ave-encoder", str(kit["encoder"]),
                                   "--backend", "cpu", "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "2 done, 1 failed" in res.output and "failed broken (attempts 1):" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == ["batch-report.json", "plain.mp4", "reports", "walked.mp4"]
    frames = {}
    for name in ("plain", "walked"):
        with av.open(str(out / f"{name}.mp4")) as c:
            frames[name] = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames[name]) == 10
        report = json.loads((out / "reports" / f"{name}.json").read_text())
        assert report["status"] == "done" and report["frames"] == 10 and report["worker"] == "local"
    # the job's options reach the render: another walk start, other frames
    assert any((a != b).any() for a, b in zip(frames["plain"], frames["walked"]))
    failed = json.loads((out / "reports" / "broken.json").read_text())
    assert failed["status"] == "failed" and failed["error"]
    assert json.loads((out / "batch-report.json").read_text())["failures"][0]["id"] == "broken"


def test_a_lent_backend_renders_the_same_and_stays_open(kit: dict[str, Path], tmp_path: Path) -> None:
    from avatar.interfaces import BackendOptions
    from avatar.render import open_backend, render

    audio = kit["work"] / "audio" / "a0.wav"
    opts = {"model": kit["model"], "feature_options": {"encoder": str(kit["encoder"])}}
    render(kit["avatar"], str(audio), sinks=[("file", {"path": str(tmp_path / "own.mp4")})], backend="cpu", **opts)
    backend, _ = open_backend("cpu", kit["model"], BackendOptions(max_batch=8))
    try:
        for k in range(2):  # two renders on the one loaded backend, as a batch worker does
            report = render(kit["avatar"], str(audio), sinks=[("file", {"path": str(tmp_path / f"lent{k}.mp4")})],
                            backend=backend, **opts)
            assert report.backend_calls > 0
            assert (tmp_path / f"lent{k}.mp4").read_bytes() == (tmp_path / "own.mp4").read_bytes()
        assert backend.stats.calls >= 2 * report.backend_calls  # it ran both renders and is still open
        from avatar.models.synthetic import make_unet

        make_unet(tmp_path / "other.onnx", mode="ave", seed=1, tiny=True)
        with pytest.raises(ConfigError, match="the backend given runs"):
            render(kit["avatar"], str(audio), sinks=[("file", {"path": str(tmp_path / "x.mp4")})], backend=backend,
                   model=tmp_path / "other.onnx", feature_options={"encoder": str(kit["encoder"])})
    finally:
        backend.close()
