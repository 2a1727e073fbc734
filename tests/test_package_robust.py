"""Corrupt or hostile packages and sources, full disks, signals and concurrent imports.

Each case goes through the real CLI (click's runner, or a real ``avatar``
process where signals, file-size limits or mount namespaces are involved) or
the public API, and ends in one clear error line — never a traceback, a crash
or a file left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from avatar import vision
from avatar.cli import cli
from avatar.errors import AvatarPackageError
from avatar.importers import import_synctalk
from avatar.package import FACES, AvatarPackage
from click.testing import CliRunner
from test_importers import FAST, make_spec, make_synctalk

AVATAR = [sys.executable, "-m", "avatar"]
FACE_BYTES = 320 * 320 * 3


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synctalk(tmp_path_factory.mktemp("src") / "ds")


@pytest.fixture(scope="module")
def pkg_dir(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Path:
    return import_synctalk(source, tmp_path_factory.mktemp("pkg") / "avatar", **FAST)


def copy_pkg(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(p: Path, change: object) -> None:
    m = json.loads((p / "avatar.json").read_text())
    if callable(change):
        m = change(m)
    (p / "avatar.json").write_text(json.dumps(m))


def run_cli(pkg: Path, tmp_path: Path) -> object:
    """``avatar run`` on ``pkg``: the package is opened (and refused) before any model or audio is touched."""
    return CliRunner().invoke(cli, ["run", "--avatar", str(pkg), "--audio", str(tmp_path / "a.wav"),
                                    "-o", str(tmp_path / "o.mp4"), "--no-progress"])


def one_error_line(output: str) -> str:
    """The one error message (validation lists each problem of a package on its own ``  - `` line)."""
    lines = [line for line in output.strip().splitlines() if line]
    assert lines and lines[0].startswith("error: "), output
    assert all(line.startswith("  - ") for line in lines[1:]), output
    assert "Traceback" not in output
    return " ".join(lines)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if "partial" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------- manifest schema (15.6)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda m: [], "a JSON object is expected"),
        (lambda m: {**m, "crop": []}, "crop: [] is not of type 'object'"),
        (lambda m: {**m, "model": "x"}, "model: 'x'"),
        (lambda m: {**m, "fps": 0}, "fps: 0 is less than or equal to the minimum of 0"),
        (lambda m: {**m, "fps": "25"}, "fps: '25' is not of type 'number'"),
        (lambda m: {**m, "frame_count": 8.0}, "frame_count: 8.0 is not of type 'integer'"),
        (lambda m: {**m, "width": "256"}, "width: '256' is not of type 'integer'"),
        (lambda m: {**m, "height": True}, "height: True is not of type 'integer'"),
        (lambda m: {k: v for k, v in m.items() if k != "name"}, "'name' is a required property"),
        (lambda m: {**m, "crop": {"interpolation": "bogus"}}, "crop.interpolation: 'bogus' is not one of"),
        (lambda m: {**m, "model": {"file": "m.onnx", "padding": "mirror"}}, "model.padding"),
        (lambda m: {**m, "video": {**m["video"], "codec": "vp9"}}, "video.codec"),
    ],
)
def test_a_bad_manifest_is_one_clear_error(pkg_dir: Path, tmp_path: Path, change: object, words: str) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    edit_manifest(p, change)
    with pytest.raises(AvatarPackageError, match="avatar.json") as e:
        AvatarPackage.open(p)
    assert words in str(e.value)
    assert words in one_error_line(run_cli(p, tmp_path).output)


@pytest.mark.parametrize("text", ["{fps: 25", "\udcff"], ids=["not JSON", "not UTF-8"])
def test_an_unreadable_manifest_says_what_to_do(pkg_dir: Path, tmp_path: Path, text: str) -> None:
    """The reliability probe: `avatar.json` that is not JSON said only the parser's complaint."""
    p = copy_pkg(pkg_dir, tmp_path / "p")
    (p / "avatar.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    line = one_error_line(run_cli(p, tmp_path).output)
    assert "avatar.json" in line and line.endswith("; fix the manifest or re-import the avatar"), line


# --------------------------------------------------------------------------- paths stay inside (15.7)


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_manifest_files_must_stay_inside_the_package(pkg_dir: Path, tmp_path: Path, where: str) -> None:
    from test_importers import tiny_unet_onnx

    outside = tiny_unet_onnx(tmp_path / "x.onnx", [32, 16, 16])  # a real model a hostile package points at
    p = copy_pkg(pkg_dir, tmp_path / "pkgs" / "p")
    name = {"dotdot": "../../x.onnx", "absolute": str(outside), "symlink": "link.onnx"}[where]
    if where == "symlink":
        (p / "link.onnx").symlink_to(outside)
    edit_manifest(p, lambda m: {**m, "model": {"file": name, "feature_type": "ave"}})
    with pytest.raises(AvatarPackageError, match="package"):
        AvatarPackage.open(p, validate=False)
    line = one_error_line(run_cli(p, tmp_path).output)
    assert "outside the package" in line or "not a path inside the package" in line
    edit_manifest(p, lambda m: {**m, "model": None, "audio_features": {"file": name}})
    with pytest.raises(AvatarPackageError, match="package"):
        AvatarPackage.open(p)


# --------------------------------------------------------------------------- boxes and the face cache (15.8)


def test_a_huge_box_is_refused_before_anything_is_allocated(pkg_dir: Path, tmp_path: Path) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    b = np.load(p / "boxes.npy")
    b[2] = (0, 0, 100000, 100000)  # a 28 GiB crop if anything tried it
    np.save(p / "boxes.npy", b)
    with pytest.raises(AvatarPackageError, match=r"larger than 512 px.*frame 2"):
        AvatarPackage.open(p)
    with AvatarPackage.open(p, validate=False) as pkg, pytest.raises(AvatarPackageError, match="more than 2x"):
        vision.face_320(pkg.frame(2), tuple(pkg.boxes[2]))
    assert "larger than 512 px" in one_error_line(run_cli(p, tmp_path).output)


@pytest.mark.parametrize("kind", ["random bytes", "object array", "floats", "empty file"])
def test_bad_boxes_files_are_one_clear_error(pkg_dir: Path, tmp_path: Path, kind: str) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    f = p / "boxes.npy"
    if kind == "random bytes":
        f.write_bytes(np.random.default_rng(0).bytes(4000))
    elif kind == "object array":
        np.save(f, np.array([{"x": 1}] * 8, dtype=object), allow_pickle=True)
    elif kind == "floats":
        np.save(f, np.load(f).astype(np.float64) + 0.5)
    else:
        f.write_bytes(b"")
    with pytest.raises(AvatarPackageError, match="boxes.npy"):
        AvatarPackage.open(p, validate=False)
    assert "boxes.npy" in one_error_line(run_cli(p, tmp_path).output)


def test_a_truncated_face_cache_is_detected_and_rebuilt(pkg_dir: Path, tmp_path: Path) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    with AvatarPackage.open(p) as pkg:
        whole = np.array(pkg.faces)
    f = p / FACES
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 3)
    with AvatarPackage.open(p) as pkg:
        faces = pkg.faces
        assert faces.shape == whole.shape
        # rebuilt from the stored (H.264) frames: the crop rule on them
        assert np.array_equal(faces[5], vision.face_320(pkg.frame(5), tuple(pkg.boxes[5])))
    assert f.stat().st_size > FACE_BYTES * len(whole)
    assert leftovers(p) == []


# --------------------------------------------------------------------------- bad import sources (15.9)


def test_import_refuses_a_truncated_jpeg(tmp_path: Path) -> None:
    src = make_synctalk(tmp_path / "ds")
    jpg = src / "full_body_img" / "5.jpg"
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) // 3])  # libjpeg only warns "Premature end of JPEG file"
    res = CliRunner().invoke(cli, ["import", "synctalk", str(src), "-o", str(tmp_path / "p"), *("--preset", "ultrafast")])
    assert res.exit_code == 1
    line = one_error_line(res.output)
    assert "5.jpg" in line and "truncated" in line
    assert not (tmp_path / "p").exists()
    # padding after the end marker, as some writers add, is not truncation
    jpg.write_bytes(data + b"\0" * 7)
    res = CliRunner().invoke(cli, ["import", "synctalk", str(src), "-o", str(tmp_path / "p"), *("--preset", "ultrafast")])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("bad", [np.zeros((5, 3), np.float32), np.zeros((8, 512), np.int64), np.zeros(512, np.float32)])
def test_import_refuses_audio_features_that_are_not_ave(tmp_path: Path, bad: np.ndarray) -> None:
    src = make_synctalk(tmp_path / "ds")
    np.save(src / "aud_ave.npy", bad)
    res = CliRunner().invoke(cli, ["import", "synctalk", str(src), "-o", str(tmp_path / "p")])
    assert res.exit_code == 1
    line = one_error_line(res.output)
    assert "aud_ave.npy is not AVE features" in line and str(list(bad.shape)) in line
    spec = make_spec(tmp_path / "spec", rois=False)
    np.save(spec / "aud_ave.npy", bad)
    res = CliRunner().invoke(cli, ["import", "spec", str(spec), "-o", str(tmp_path / "q")])
    assert res.exit_code == 1 and "is not AVE features" in one_error_line(res.output)


def test_a_packaged_features_file_of_the_wrong_shape_is_refused_on_open(pkg_dir: Path, tmp_path: Path) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    np.save(p / "aud_ave.npy", np.zeros((5, 3), np.float32))
    with pytest.raises(AvatarPackageError, match="not AVE features"):
        AvatarPackage.open(p)


# --------------------------------------------------------------------------- full disks (15.3)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"], capture_output=True)
    return r.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs in a user namespace here")


def _in_small_tmpfs(tmp_path: Path, size: int, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (sh) with ``$MNT``, a fresh tmpfs of ``size`` bytes, in a private mount namespace."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    body = f"mount -t tmpfs -o size={size} none {mnt} && export MNT={mnt} && {script}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["unshare", "-rm", "sh", "-c", body], capture_output=True, text=True, env=env, timeout=300)


@needs_tmpfs
@pytest.mark.parametrize("room", ["none", "for the faces only"])
def test_import_onto_a_full_disk_fails_with_one_line_and_leaves_nothing(source: Path, tmp_path: Path, room: str) -> None:
    n = 8
    size = 256 * 1024 if room == "none" else n * FACE_BYTES + 16 * 1024  # then the frames fill it mid-write
    cmd = " ".join(AVATAR) + f" import synctalk {source} -o $MNT/pkg --preset ultrafast --crf 0"
    r = _in_small_tmpfs(tmp_path, size, f"{cmd}; echo rc=$?; ls -A $MNT")
    out = r.stdout.strip().splitlines()
    assert out[0] == "rc=1", r.stdout + r.stderr  # the old code: SIGBUS (rc=135), no message
    assert out[1:] == []  # nothing left on the disk
    line = one_error_line(r.stderr)
    assert "free disk space" in line, line


@needs_tmpfs
def test_rebuilding_the_face_cache_on_a_full_disk_fails_with_one_line(pkg_dir: Path, tmp_path: Path) -> None:
    size = 4 * 1024 * 1024
    code = textwrap.dedent("""
        import sys
        from avatar.errors import AvatarError
        from avatar.package import AvatarPackage
        try:
            with AvatarPackage.open(sys.argv[1]) as pkg:
                pkg.faces
        except AvatarError as e:
            print("error:", e, file=sys.stderr)
            sys.exit(1)
    """)
    (tmp_path / "open.py").write_text(code)
    filler = 4 * 1024 * 1024 - 8 * FACE_BYTES // 2  # leaves room for half the cache
    script = (f"cp -r {pkg_dir} $MNT/p && rm -r $MNT/p/cache && head -c {filler} /dev/zero > $MNT/fill 2>/dev/null; "
              f"{sys.executable} {tmp_path / 'open.py'} $MNT/p; echo rc=$?; ls -A $MNT/p/cache")
    r = _in_small_tmpfs(tmp_path, size, script)
    assert r.stdout.splitlines()[0] == "rc=1", r.stdout + r.stderr
    assert r.stdout.splitlines()[1:] == []  # no partial cache left
    assert "disk space" in one_error_line(r.stderr)


def test_a_file_size_limit_during_the_face_cache_build_is_one_line(pkg_dir: Path, tmp_path: Path) -> None:
    """The same through RLIMIT_FSIZE, where no tmpfs can be mounted: the write fails mid-way."""
    import resource

    p = copy_pkg(pkg_dir, tmp_path / "p")
    shutil.rmtree(p / "cache")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, as ENOSPC would be
        resource.setrlimit(resource.RLIMIT_FSIZE, (FACE_BYTES * 3, FACE_BYTES * 3))

    code = "from avatar.package import AvatarPackage; import sys; AvatarPackage.open(sys.argv[1]).faces"
    wrapper = (f"import logging, sys\nlogging.disable(logging.WARNING)\ntry:\n    {code}\n"
               "except Exception as e:\n    print('error:', e, file=sys.stderr); sys.exit(1)")
    r = subprocess.run([sys.executable, "-c", wrapper, str(p)], capture_output=True, text=True, preexec_fn=limit,
                       timeout=120)
    assert r.returncode == 1, r.stderr
    line = one_error_line(r.stderr)
    assert "File too large" in line and "free disk space" in line and "cache/faces320.npy:" in line
    assert list((p / "cache").iterdir()) == []


# --------------------------------------------------------------------------- signals and concurrency (15.4)


def big_source(root: Path, n: int = 40) -> Path:
    """A source slow enough to interrupt: larger frames, encoded with a slow preset."""
    import cv2

    (root / "full_body_img").mkdir(parents=True)
    (root / "landmarks").mkdir()
    rng = np.random.default_rng(1)
    lms = np.full((110, 2), 100.0)
    lms[1, 0], lms[52, 1], lms[31, 0] = 200, 150, 400
    for k in range(n):
        img = cv2.resize(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), (960, 720), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(root / "full_body_img" / f"{k}.jpg"), img)
        (root / "landmarks" / f"{k}.lms").write_text("\n".join(f"{x} {y}" for x, y in lms))
    return root


def start_import(src: Path, dst: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*AVATAR, "import", "synctalk", str(src), "-o", str(dst), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_partial(parent: Path, name: str, proc: subprocess.Popen[str], timeout: float = 60) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = [p for p in parent.glob(f".{name}.partial-*") if (p / "frames.mp4").exists()]
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the import never started writing")


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return big_source(tmp_path_factory.mktemp("slow") / "ds")


def test_sigterm_during_import_is_handled_like_ctrl_c(slow_source: Path, tmp_path: Path) -> None:
    proc = start_import(slow_source, tmp_path / "pkg", "--preset", "veryslow")
    wait_for_partial(tmp_path, "pkg", proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    # 143, the shell's status for SIGTERM as a render's (the probe's repeat saw 130, Ctrl-C's); older code: -15
    assert proc.returncode == 143, err
    assert err.strip() == "interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_next_import_removes_what_a_killed_one_left(slow_source: Path, source: Path, tmp_path: Path) -> None:
    proc = start_import(slow_source, tmp_path / "pkg", "--preset", "veryslow")
    partial = wait_for_partial(tmp_path, "pkg", proc)
    proc.kill()  # SIGKILL: no handler runs, the partial stays
    proc.communicate(timeout=60)
    assert partial.is_dir()
    res = CliRunner().invoke(cli, ["import", "synctalk", str(source), "-o", str(tmp_path / "pkg"), "--preset", "ultrafast"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_opening_removes_dead_builders_partial_caches_but_not_live_ones(pkg_dir: Path, tmp_path: Path) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    dead = p / "cache" / "faces320.dead.partial.npy"
    live = p / "cache" / "faces320.live.partial.npy"
    dead.write_bytes(b"\0" * 1000)
    live.write_bytes(b"\0" * 1000)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        AvatarPackage.open(p).close()
        assert not dead.exists() and live.exists()  # a live builder's file is never touched
    finally:
        holder.kill()
        holder.wait()
    AvatarPackage.open(p).close()
    assert not live.exists()


READER = """
import sys
from pathlib import Path
from avatar.errors import AvatarError
from avatar.package import AvatarPackage

dst, stop = Path(sys.argv[1]), Path(sys.argv[2])
opened = 0
while not stop.exists():
    try:
        AvatarPackage.open(dst).close()
        opened += 1
    except AvatarError as e:
        print("reader:", e, flush=True)
        sys.exit(1)
print(opened, flush=True)
"""


def test_concurrent_forced_imports_to_one_destination(source: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    dst = work / "pkg"
    import_synctalk(source, dst, **FAST)
    stop = tmp_path / "stop"
    # a render opening the package meanwhile must always find one (the replacement is an atomic exchange)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(dst), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        for round_ in range(3):
            procs = [start_import(source, dst, "--force", "--preset", "ultrafast", "--name", f"n{k}") for k in range(2)]
            results = [proc.communicate(timeout=120) for proc in procs]
            for proc, (out, err) in zip(procs, results):
                assert proc.returncode == 0, err  # the old code: FileNotFoundError in 1 of 3 rounds
                assert "Traceback" not in err
            with AvatarPackage.open(dst) as pkg:
                assert pkg.name in ("n0", "n1") and pkg.frame_count == 8
            assert sorted(p.name for p in work.iterdir()) == ["pkg"]
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0 and int(out) > 0, out
