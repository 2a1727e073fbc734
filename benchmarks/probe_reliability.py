"""Reliability probe: signals, full disks, corrupt packages and hostile requests (issues 15 and 20, "Done when").

Runs the installed ``avatar`` console script as a user and an operator would and
checks every outcome against the bar of issue 15:

* a non-zero exit prints one line on stderr (``error: ...`` or ``interrupted``;
  a validator's ``  - `` detail lines and the library's own ``WARNING avatar...``
  log lines before it allowed), never a traceback, never
  ONNX Runtime's ``[E:onnxruntime`` lines or a NumPy RuntimeWarning;
* an output file is playable (decoded here with PyAV) or absent with the
  earlier file at that path intact (same bytes);
* no partial file (``.NAME.*partial*``, ``.NAME.partial-*``,
  ``cache/faces320.*.partial.npy``) and no ``.lock`` file is left;
* no process of the run outlives it (every run gets its own session id).

Usage::

    python benchmarks/probe_reliability.py [--workdir /tmp/probe] [--sanders /work/shared/data/sanders]
        [--out benchmarks/results/probe-reliability.md] [--seed 15]

Ctrl-C is sent to the run's process group (what a terminal does); SIGTERM to
the process only (``kill PID``, Docker's stop). A signal that ends the process
while the interpreter itself is still starting (before any avatar code runs:
CPython's initialisation, ``site`` and ``.pth`` files) is listed as n/a: no
Python program can handle it. Exits 1 when a case fails.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from avatar.bench.harness import cpu_model

ROOT = Path(__file__).resolve().parents[1]
AVATAR = str(Path(sys.executable).with_name("avatar"))
NOISE = ("Traceback", "[E:onnxruntime", "[W:onnxruntime", "RuntimeWarning", "UserWarning")
SECRET = "S3cr3tK3y"


# --------------------------------------------------------------------------- results


@dataclass
class Case:
    group: str
    name: str
    ok: bool
    outcome: str
    problems: list[str] = field(default_factory=list)
    note: str = ""


RESULTS: list[Case] = []


def record(group: str, name: str, outcome: str, problems: list[str], note: str = "") -> None:
    case = Case(group, name, not problems, outcome, problems, note)
    RESULTS.append(case)
    mark = "n/a " if note else "ok  " if case.ok else "FAIL"
    print(f"[{mark}] {group} / {name}: {outcome}" + ("" if case.ok else f"  <-- {'; '.join(problems)}"), flush=True)


# --------------------------------------------------------------------------- running


@dataclass
class Run:
    rc: int | None
    stdout: str
    stderr: str
    wall: float
    hung: bool = False
    leftover_pids: list[int] = field(default_factory=list)


def _session_members(sid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == sid:
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:  # fields: state ppid pgrp session
            out.append(int(entry))
    return out


def run(cmd: list[str], *, signal_at: float | None = None, sig: int = signal.SIGINT, group: bool = True,
        timeout: float = 120, env: dict[str, str] | None = None, cwd: Path | None = None,
        preexec: Callable[[], None] | None = None) -> Run:
    """Run ``cmd`` in its own session; optionally send ``sig`` after ``signal_at`` seconds."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                         env={**os.environ, **(env or {})}, start_new_session=True, preexec_fn=preexec)
    hung = False
    if signal_at is not None:
        try:
            p.wait(timeout=signal_at)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
    wall = time.monotonic() - t0
    time.sleep(0.3)
    left = _session_members(p.pid)
    for pid in left:  # the probe cleans up what it found (and reports it)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return Run(p.returncode, out, err, wall, hung, left)


def stderr_problems(r: Run, *, expect_rc: set[int] | None = None) -> list[str]:
    """The bar for what the user sees: one line for a failure, no traceback or library noise."""
    probs = []
    if r.hung:
        probs.append("did not exit within the time limit")
    if r.leftover_pids:
        probs.append(f"left processes {r.leftover_pids}")
    for n in NOISE:
        if n in r.stderr or n in r.stdout:
            probs.append(f"{n!r} on the terminal")
    if expect_rc is not None and r.rc not in expect_rc:
        probs.append(f"exit {r.rc}, expected {sorted(expect_rc)}")
    if r.rc not in (0, None):
        # a logged warning (the library's own, one line each) may come before the one error message
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING avatar")]
        if not lines:
            probs.append("non-zero exit with nothing on stderr")
        else:
            if not (lines[0].startswith("error: ") or lines[0] == "interrupted"):
                probs.append(f"first stderr line is not one message: {lines[0][:100]!r}")
            if any(not ln.startswith("  - ") for ln in lines[1:]):
                probs.append(f"{len(lines)} stderr lines")
    return probs


STARTUP_NOTE = "interpreter start-up, before any avatar code runs"


def in_interpreter_startup(r: Run, sig: int, delay: float) -> bool:
    """A signal that ended the process before our launcher ran (CPython initialising, site and .pth files).

    Once the launcher is imported a signal is never a bare kill: it is held, raised or ignored.
    """
    if "Fatal Python error" in r.stderr and ("init_import_site" in r.stderr or "init_sys_streams" in r.stderr):
        return True
    return r.rc == -sig and not r.stderr.strip() and delay < 0.15


def first_line(r: Run) -> str:
    """The message (with a validator's detail lines, shortened), or the last line of a successful run."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if r.rc == 0:
        return lines[-1][:200] if lines else ""
    return " ".join(ln.strip() for ln in lines[:3])[:300]


# --------------------------------------------------------------------------- files


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def playable(path: Path) -> tuple[bool, str]:
    """Decode every packet with PyAV: (ok, 'N frames, audio A s')."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                return False, "no video stream"
            has_audio = bool(c.streams.audio)
            n = 0
            for frame in c.decode(video=0):
                n += 1
            if n == 0:
                return False, "no decodable video frame"
            return True, f"{n} frames{', audio' if has_audio else ', NO audio'}"
    except Exception as exc:  # noqa: BLE001 - any decode failure means unplayable
        return False, f"unplayable: {type(exc).__name__}: {exc}"


def leftovers(*folders: Path) -> list[str]:
    found = []
    for folder in folders:
        if not folder.exists():
            continue
        for p in folder.rglob("*"):
            n = p.name
            if "partial" in n or n.endswith(".lock") or ".old-" in n:
                found.append(str(p.relative_to(folder.parent)))
    return sorted(found)


def output_problems(out: Path, earlier: str | None, rc: int | None, *, need_audio: bool = True) -> tuple[str, list[str]]:
    """Output playable, or absent/unchanged with the earlier file intact."""
    if not out.exists():
        if earlier is not None:
            return "output gone", ["the earlier output was destroyed"]
        return "no output", []
    if earlier is not None and sha(out) == earlier:
        return "earlier output intact", []
    ok, what = playable(out)
    probs = [] if ok else [what]
    if ok and need_audio and "NO audio" in what:
        probs.append("output has no audio stream")
    return what, probs


# --------------------------------------------------------------------------- assets


def write_wav_raw(path: Path, pcm: np.ndarray, rate: int = 16000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())


def build_assets(work: Path, sanders: Path, import_frames: int) -> dict[str, Path]:
    from avatar.demo import build_demo, speechlike_audio

    paths = build_demo(work / "demo", tiny=True)
    a = dict(paths)
    a["long"] = work / "long.wav"
    if not a["long"].exists():
        write_wav_raw(a["long"], speechlike_audio(20.0))
    # a self-contained package: the tiny models inside it (avatar run --avatar needs nothing else)
    a["pkg"] = work / "pkg"
    if not a["pkg"].exists():
        shutil.copytree(paths["avatar"], a["pkg"])
        shutil.copy(paths["model"], a["pkg"] / "unet.onnx")
        shutil.copy(paths["encoder"], a["pkg"] / "ave_encoder.onnx")
        m = json.loads((a["pkg"] / "avatar.json").read_text())
        m["model"] = {"file": "unet.onnx", "feature_type": "ave", "audio_encoder": "ave_encoder.onnx"}
        (a["pkg"] / "avatar.json").write_text(json.dumps(m, indent=2))
    # a copy of part of the sanders dataset (the shared folder is never modified)
    src = work / "sanders"
    if not src.exists():
        (src / "full_body_img").mkdir(parents=True)
        (src / "landmarks").mkdir()
        for i in range(import_frames):
            shutil.copy(sanders / "full_body_img" / f"{i}.jpg", src / "full_body_img")
            shutil.copy(sanders / "landmarks" / f"{i}.lms", src / "landmarks")
        shutil.copy(sanders / "aud_ave.npy", src / "aud_ave.npy")
    a["sanders"] = src
    return a


def run_cmd(pkg: Path, audio: Path, out: Path, *extra: str) -> list[str]:
    return [AVATAR, "run", "--avatar", str(pkg), "--audio", str(audio), "-o", str(out), "--no-progress", *extra]


# --------------------------------------------------------------------------- signals


def probe_render_signals(a: dict[str, Path], work: Path, rng: random.Random, n_int: int, n_term: int,
                         nginx: Any) -> None:
    base = work / "sig"
    base.mkdir(exist_ok=True)
    earlier_src = base / "earlier.mp4"
    r = run(run_cmd(a["pkg"], a["audio"], earlier_src))
    assert r.rc == 0, r.stderr
    t = run(run_cmd(a["pkg"], a["long"], base / "timing.mp4"))
    span = t.wall
    print(f"(a full render of 20 s audio takes {span:.1f} s here)", flush=True)
    delays = [rng.uniform(0, 0.3) for _ in range(4)] + [rng.uniform(0.3, span) for _ in range(n_int - 4)]
    plan = [("SIGINT", signal.SIGINT, d, False) for d in delays]
    plan += [("SIGTERM", signal.SIGTERM, rng.uniform(0.2, span), False) for _ in range(n_term - (1 if nginx else 0))]
    if nginx is not None:
        plan.append(("SIGTERM", signal.SIGTERM, rng.uniform(1.0, span * 0.8), True))
    for i, (name, sig, delay, rtmp) in enumerate(plan):
        d = base / f"run{i:02d}"
        d.mkdir(exist_ok=True)
        out = d / "out.mp4"
        shutil.copy(earlier_src, out)
        earlier = sha(out)
        extra = ["--report", str(d / "report.json")]
        if rtmp:
            extra += ["--sink", "file", "--sink", "rtmp", "--rtmp-url", nginx.url(f"key{i}")]
        r = run(run_cmd(a["pkg"], a["long"], out, *extra), signal_at=delay, sig=sig,
                group=(sig == signal.SIGINT))
        expect = {0, 128 + sig}
        probs = stderr_problems(r, expect_rc=expect)
        what, oprobs = output_problems(out, earlier, r.rc)
        probs += oprobs
        if r.rc == 0 and sha(out) == earlier:
            probs.append("exit 0 but the output was not written")
        if r.rc == 0 and r.wall - delay > 1.5:
            probs.append(f"the signal was ignored: it ran on for {r.wall - delay:.1f} s and exited 0")
        left = leftovers(d, a["pkg"])
        if left:
            probs.append(f"leftovers {left}")
        sink = "file+rtmp" if rtmp else "file"
        note = STARTUP_NOTE if probs and not oprobs and in_interpreter_startup(r, sig, delay) else ""
        record("render signals", f"{name} at {delay:.2f} s ({sink})",
               f"exit {r.rc}, '{first_line(r)[:200]}', {what}", [] if note else probs, note=note)


def probe_import_signals(a: dict[str, Path], work: Path, rng: random.Random) -> None:
    base = work / "imp-sig"
    base.mkdir(exist_ok=True)
    earlier_pkg = base / "earlier"
    r = run([AVATAR, "import", "synctalk", str(a["sanders"]), "-o", str(earlier_pkg), "--limit", "20",
             "--preset", "ultrafast"])
    assert r.rc == 0, r.stderr
    t = run([AVATAR, "import", "synctalk", str(a["sanders"]), "-o", str(base / "timing")])
    span = t.wall
    print(f"(a full import takes {span:.1f} s here)", flush=True)
    cases = [(s, rng.uniform(0, 0.3) if k == 0 else rng.uniform(0.3, span), force)
             for s in (signal.SIGINT, signal.SIGTERM) for k in range(3) for force in ([False, True] if k == 1 else [False])]
    for i, (sig, delay, force) in enumerate(cases):
        d = base / f"run{i:02d}"
        d.mkdir(exist_ok=True)
        dst = d / "pkg"
        before = None
        if force:
            shutil.copytree(earlier_pkg, dst)
            before = {p.name: sha(p) for p in dst.iterdir() if p.is_file()}
        cmd = [AVATAR, "import", "synctalk", str(a["sanders"]), "-o", str(dst)] + (["--force"] if force else [])
        r = run(cmd, signal_at=delay, sig=sig, group=(sig == signal.SIGINT))
        probs = stderr_problems(r, expect_rc={0, 128 + sig})
        if r.rc == 0:
            state = "completed"
            chk = run([AVATAR, "run", "--avatar", str(dst), "--audio", str(a["audio"]), "--model",
                       str(a["model"]), "--ave-encoder", str(a["encoder"]), "-o", str(d / "check.mp4"),
                       "--no-progress", "--frames", "10"])
            if chk.rc != 0:
                probs.append(f"the imported package does not render: {first_line(chk)}")
        elif dst.exists():
            now = {p.name: sha(p) for p in dst.iterdir() if p.is_file()}
            state = "earlier package intact" if before == now else "package changed"
            if before is None:
                probs.append(f"a destination was left: {sorted(os.listdir(dst))}")
            elif before != now:
                probs.append("the earlier package was modified")
        else:
            state = "no package"
            if before is not None:
                probs.append("the earlier package was destroyed")
        left = leftovers(d)
        if left:
            probs.append(f"leftovers {left}")
        name = signal.Signals(sig).name
        note = STARTUP_NOTE if probs and state in ("no package", "earlier package intact") and not left \
            and in_interpreter_startup(r, sig, delay) else ""
        record("import signals", f"{name} at {delay:.2f} s{' --force over a package' if force else ''}",
               f"exit {r.rc}, '{first_line(r)[:200]}', {state}", [] if note else probs, note=note)


def probe_startup(rng: random.Random, work: Path, n: int = 16) -> None:
    """Signals in the first 60 ms: the interpreter's start-up, the console script, the launcher's imports."""
    outside = 0
    starts = []
    for _ in range(5):  # the bare interpreter's start-up here (site and .pth files included): nothing of ours runs
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        starts.append(time.monotonic() - t)
    bare = min(starts)
    print(f"(a bare interpreter starts in {bare * 1000:.0f} ms here)", flush=True)
    for i in range(n):
        sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
        delay = 0.06 * i / n
        r = run([AVATAR, "plugins"], signal_at=delay, sig=sig, group=(sig == signal.SIGINT), cwd=work)
        name = signal.Signals(sig).name
        probs = stderr_problems(r, expect_rc={0, 128 + sig})
        # before any of our code runs (CPython initialising, site and .pth files) no program can catch a signal
        if probs and in_interpreter_startup(r, sig, min(delay, bare)):
            outside += 1
            record("start-up window", f"{name} at {delay * 1000:.0f} ms", f"exit {r.rc}, '{first_line(r)[:90]}'", [],
                   note=STARTUP_NOTE)
            continue
        record("start-up window", f"{name} at {delay * 1000:.0f} ms", f"exit {r.rc}, '{first_line(r)[:90]}'", probs)
    print(f"({outside} of {n} signals landed in the interpreter's own start-up)", flush=True)


# --------------------------------------------------------------------------- full disks


def in_tmpfs(size: int, script: str, keep: Path) -> Run:
    """Run ``script`` with ``$MNT`` a fresh tmpfs of ``size`` bytes; copy its contents to ``keep`` afterwards."""
    keep.mkdir(parents=True, exist_ok=True)
    mnt = keep.parent / (keep.name + "-mnt")
    mnt.mkdir(exist_ok=True)
    body = (f"mount -t tmpfs -o size={size} none {mnt} && export MNT={mnt} && ({script}); rc=$?; "
            f"cp -a {mnt}/. {keep}/; exit $rc")
    return run(["unshare", "-rm", "sh", "-c", body], timeout=300)


def can_tmpfs() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"], capture_output=True).returncode == 0


def fsize_limit(limit: int) -> Callable[[], None]:
    def pre() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, as a full disk's ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def probe_full_disks(a: dict[str, Path], work: Path) -> None:
    base = work / "disk"
    base.mkdir(exist_ok=True)
    earlier = base / "earlier.mp4"
    r = run(run_cmd(a["pkg"], a["audio"], earlier))
    assert r.rc == 0, r.stderr
    esize = earlier.stat().st_size
    q = lambda p: f"'{p}'"  # noqa: E731
    if can_tmpfs():
        # import: no room at all / room for the faces but not the frames
        faces = 300 * 320 * 320 * 3  # the face cache of the 300-frame import: the frames then fill the disk
        for label, size in (("import onto a 256 KiB tmpfs", 256 << 10),
                            ("import onto a tmpfs that fills while writing frames.mp4", faces + (3 << 20))):
            keep = base / label.replace(" ", "_")
            r = in_tmpfs(size, f"{AVATAR} import synctalk {q(a['sanders'])} -o $MNT/pkg", keep)
            probs = stderr_problems(r, expect_rc={1})
            if list(keep.iterdir()):
                probs.append(f"left on the disk: {sorted(os.listdir(keep))}")
            record("full disk", label, f"exit {r.rc}, '{first_line(r)}'", probs)
        # render: an earlier output on the disk, and room for less than a second one
        keep = base / "render_tmpfs"
        size = esize + (esize // 3 // 4096) * 4096
        script = (f"cp {q(earlier)} $MNT/out.mp4 && {AVATAR} run --avatar {q(a['pkg'])} --audio {q(a['long'])} "
                  "-o $MNT/out.mp4 --no-progress")
        r = in_tmpfs(size, script, keep)
        probs = stderr_problems(r, expect_rc={1})
        what, oprobs = output_problems(keep / "out.mp4", sha(earlier), r.rc)
        probs += oprobs + ([f"leftovers {leftovers(keep)}"] if leftovers(keep) else [])
        record("full disk", f"render onto a {size >> 10} KiB tmpfs holding an earlier output",
               f"exit {r.rc}, '{first_line(r)}', {what}", probs)
        # render with a package whose face cache must be rebuilt on a full disk
        keep = base / "cache_tmpfs"
        files = " ".join(q(p) for p in a["pkg"].iterdir() if p.is_file())
        script = (f"mkdir $MNT/p && cp {files} $MNT/p/ && free=$(df --output=avail -B1 $MNT | tail -1) && "
                  f"head -c $(( free - 7000000 )) /dev/zero > $MNT/fill; {AVATAR} run --avatar $MNT/p --audio {q(a['audio'])} -o {q(base / 'c.mp4')} "
                  "--no-progress; rc=$?; rm -f $MNT/fill; exit $rc")
        r = in_tmpfs(40 << 20, script, keep)
        probs = stderr_problems(r, expect_rc={1})
        left = leftovers(keep)
        if left:
            probs.append(f"leftovers {left}")
        record("full disk", "render rebuilding the face cache on a full tmpfs", f"exit {r.rc}, '{first_line(r)}'", probs)
    else:
        record("full disk", "tmpfs in a user namespace", "not available here: only RLIMIT_FSIZE cases", [])
    # RLIMIT_FSIZE: the same through a file-size limit
    d = base / "fsize"
    d.mkdir(exist_ok=True)
    out = d / "out.mp4"
    shutil.copy(earlier, out)
    rep = d / "report.json"
    r = run(run_cmd(a["pkg"], a["long"], out, "--report", str(rep)), preexec=fsize_limit(esize // 2))
    probs = stderr_problems(r, expect_rc={1})
    what, oprobs = output_problems(out, sha(earlier), r.rc)
    probs += oprobs + ([f"leftovers {leftovers(d)}"] if leftovers(d) else [])
    if not rep.exists() or "error" not in json.loads(rep.read_text()):
        probs.append("no --report with the error")
    record("full disk", f"render under RLIMIT_FSIZE {esize // 2 >> 10} KiB", f"exit {r.rc}, '{first_line(r)}', {what}", probs)
    d = base / "fsize-cache"
    shutil.copytree(a["pkg"], d / "p", ignore=shutil.ignore_patterns("cache"))
    r = run(run_cmd(d / "p", a["audio"], d / "out.mp4"), preexec=fsize_limit(3 * 320 * 320 * 3))
    probs = stderr_problems(r, expect_rc={1}) + ([f"leftovers {leftovers(d)}"] if leftovers(d) else [])
    if (d / "out.mp4").exists():
        probs.append("an output was written")
    record("full disk", "render rebuilding the face cache under RLIMIT_FSIZE 900 KiB", f"exit {r.rc}, '{first_line(r)}'",
           probs)
    d = base / "fsize-imp"
    d.mkdir(exist_ok=True)
    r = run([AVATAR, "import", "synctalk", str(a["sanders"]), "-o", str(d / "pkg")], preexec=fsize_limit(4 << 20))
    probs = stderr_problems(r, expect_rc={1}) + ([f"left {sorted(os.listdir(d))}"] if list(d.iterdir()) else [])
    record("full disk", "import under RLIMIT_FSIZE 4 MiB", f"exit {r.rc}, '{first_line(r)}'", probs)


# --------------------------------------------------------------------------- corrupt packages and inputs


def edit(p: Path, fn: Callable[[dict[str, Any]], Any]) -> None:
    m = json.loads((p / "avatar.json").read_text())
    (p / "avatar.json").write_text(json.dumps(fn(m)))


def set_key(k: str, v: Any) -> Callable[[dict[str, Any]], Any]:
    def f(m: dict[str, Any]) -> dict[str, Any]:
        m[k] = v
        return m
    return f


def set_model_file(v: str) -> Callable[[dict[str, Any]], Any]:
    def f(m: dict[str, Any]) -> dict[str, Any]:
        m["model"]["file"] = v
        return m
    return f


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def probe_corrupt_packages(a: dict[str, Path], work: Path) -> None:
    base = work / "corrupt"
    base.mkdir(exist_ok=True)
    outside = work / "m"
    outside.mkdir(exist_ok=True)
    shutil.copy(a["model"], outside / "x.onnx")
    rng = np.random.default_rng(0)

    def boxes_random(p: Path) -> None:
        (p / "boxes.npy").write_bytes(rng.bytes(928))

    def boxes_object(p: Path) -> None:
        np.save(p / "boxes.npy", np.array([[0, 0, 1, 1]] * 50, dtype=object), allow_pickle=True)

    def boxes_huge(p: Path) -> None:
        b = np.load(p / "boxes.npy")
        b[:] = (0, 0, 100000, 100000)
        np.save(p / "boxes.npy", b)

    def model_random(p: Path) -> None:
        (p / "unet.onnx").write_bytes(rng.bytes(50000))

    cases: list[tuple[str, Callable[[Path], None], set[int]]] = [
        ("manifest []", lambda p: (p / "avatar.json").write_text("[]"), {1}),
        ("manifest not JSON", lambda p: (p / "avatar.json").write_text("{fps: 25"), {1}),
        ('"crop": []', lambda p: edit(p, set_key("crop", [])), {1}),
        ('"model": "x"', lambda p: edit(p, set_key("model", "x")), {1}),
        ("fps: 0", lambda p: edit(p, set_key("fps", 0)), {1}),
        ('fps: "25"', lambda p: edit(p, set_key("fps", "25")), {1}),
        ("fps: 29.97 (a fractional rate is valid)", lambda p: edit(p, set_key("fps", 29.97)), {0}),
        ('frame_count: "50"', lambda p: edit(p, set_key("frame_count", "50")), {1}),
        ("width: 640.0", lambda p: edit(p, set_key("width", 640.0)), {1}),
        ("model.file ../../m/x.onnx", lambda p: edit(p, set_model_file("../../m/x.onnx")), {1}),
        ("model.file absolute", lambda p: edit(p, set_model_file(str(outside / "x.onnx"))), {1}),
        ("box (0,0,100000,100000)", boxes_huge, {1}),
        ("boxes.npy random bytes", boxes_random, {1}),
        ("boxes.npy object array", boxes_object, {1}),
        ("cache/faces320.npy truncated (rebuilt)", lambda p: truncate(p / "cache" / "faces320.npy", 0.5), {0}),
        ("frames.mp4 truncated", lambda p: truncate(p / "frames.mp4", 0.3), {1}),
        ("aud_ave.npy (5,3) in the package",
         lambda p: (np.save(p / "aud_ave.npy", np.zeros((5, 3), np.float32)),
                    edit(p, set_key("audio_features", {"file": "aud_ave.npy", "feature_type": "ave"}))), {1}),
        ("unet.onnx random bytes", model_random, {1}),
    ]
    for name, corrupt, expect in cases:
        p = base / f"pkg-{len(os.listdir(base))}"
        shutil.copytree(a["pkg"], p)
        corrupt(p)
        out = p.parent / (p.name + ".mp4")
        r = run(run_cmd(p, a["audio"], out), timeout=120)
        probs = stderr_problems(r, expect_rc=expect)
        what, oprobs = output_problems(out, None, r.rc)
        probs += oprobs
        if r.rc != 0 and out.exists():
            probs.append("an output was written by a failed run")
        left = leftovers(p) + leftovers(out.parent) if r.rc else leftovers(p)
        left = [x for x in left if x.endswith(".lock") or "partial" in x]
        if left:
            probs.append(f"leftovers {sorted(set(left))}")
        if expect == {0} and r.rc == 0:
            cache_ok = (p / "cache" / "faces320.npy").stat().st_size > (a["pkg"] / "cache" / "faces320.npy").stat().st_size * 0.9
            if not cache_ok:
                probs.append("the truncated cache was not rebuilt")
        record("corrupt package", name, f"exit {r.rc}, '{first_line(r) or what}'", probs)

    # import of corrupt sources: a JPEG truncated to a third, aud_ave.npy of shape (5, 3)
    def src_copy(tag: str) -> Path:
        s = base / f"src-{tag}"
        (s / "full_body_img").mkdir(parents=True)
        (s / "landmarks").mkdir()
        for i in range(12):
            shutil.copy(a["sanders"] / "full_body_img" / f"{i}.jpg", s / "full_body_img")
            shutil.copy(a["sanders"] / "landmarks" / f"{i}.lms", s / "landmarks")
        return s

    s = src_copy("jpeg")
    truncate(s / "full_body_img" / "5.jpg", 1 / 3)
    s2 = src_copy("ave")
    np.save(s2 / "aud_ave.npy", np.zeros((5, 3), np.float32))
    s3 = src_copy("lms")
    (s3 / "landmarks" / "3.lms").write_text("1 2\nnot numbers\n")
    for name, src in (("JPEG truncated to a third", s), ("aud_ave.npy of shape (5, 3)", s2), ("malformed .lms", s3)):
        dst = src.parent / (src.name + "-pkg")
        r = run([AVATAR, "import", "synctalk", str(src), "-o", str(dst)])
        probs = stderr_problems(r, expect_rc={1})
        if dst.exists():
            probs.append("a package was written")
        left = leftovers(src.parent)
        if left:
            probs.append(f"leftovers {left}")
        record("corrupt import source", name, f"exit {r.rc}, '{first_line(r)}'", probs)


def probe_smaller(a: dict[str, Path], work: Path, nginx: Any) -> None:
    base = work / "small"
    base.mkdir(exist_ok=True)
    # 10. the RTMP key, in every form, never printed (also not with -vv, nor in the report)
    dead = free_port()
    urlfile = base / "url.txt"
    forms = [
        ("app/KEY", f"rtmp://127.0.0.1:{dead}/live/{SECRET}"),
        ("single segment", f"rtmp://127.0.0.1:{dead}/{SECRET}"),
        ("query token", f"rtmp://127.0.0.1:{dead}/live/stream?token={SECRET}"),
        ("user:password", f"rtmp://user:{SECRET}@127.0.0.1:{dead}/live/stream"),
        ("rtmps", f"rtmps://127.0.0.1:{dead}/live/{SECRET}"),
        ("nested path", f"rtmp://127.0.0.1:{dead}/live/sub/{SECRET}"),
        ("malformed", f"rtmp:/{SECRET}"),
        ("not rtmp", f"http://127.0.0.1:{dead}/{SECRET}"),
    ]
    if nginx is not None:
        forms.append(("live server", nginx.url(SECRET)))
    for name, url in forms:
        for how in ("--rtmp-url", "env", "file"):
            if how != "--rtmp-url" and name not in ("app/KEY", "single segment"):
                continue
            extra: list[str] = []
            env = {}
            if how == "--rtmp-url":
                extra = ["--rtmp-url", url]
            elif how == "env":
                env = {"AVATAR_RTMP_URL": url}
            else:
                urlfile.write_text(url + "\n")
                extra = ["--rtmp-url-file", str(urlfile)]
            rep = base / "rep.json"
            rep.unlink(missing_ok=True)
            cmd = [AVATAR, "-vv", "run", "--avatar", str(a["pkg"]), "--audio", str(a["audio"]), "--sink", "rtmp",
                   "--no-progress", "--report", str(rep), "--sink-opt", "rtmp.reconnect=1", *extra]
            r = run(cmd, env=env, timeout=120)
            text = r.stdout + r.stderr + (rep.read_text() if rep.exists() else "")
            probs = [f"the key is printed: ...{text[max(0, text.find(SECRET) - 60):text.find(SECRET) + 10]!r}"] \
                if SECRET in text else []
            probs += [p for p in stderr_problems(r) if "stderr lines" not in p and "first stderr" not in p]
            last = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
            record("rtmp key (-vv)", f"{name} via {how}", f"exit {r.rc}, '{(last[-1] if last else first_line(r))[:120]}'",
                   probs)
    # 11. a 1-sample WAV; a header claiming 6 h with 1 s of data
    one = base / "one.wav"
    write_wav_raw(one, np.zeros(1, np.float32))
    out = base / "one.mp4"
    r = run(run_cmd(a["pkg"], one, out))
    probs = stderr_problems(r, expect_rc={0, 1})
    what, oprobs = output_problems(out, None, r.rc)
    record("audio", "1-sample WAV", f"exit {r.rc}, '{first_line(r) or what}'", probs + oprobs)
    lie = base / "lie.wav"
    write_wav_raw(lie, 0.1 * np.sin(np.arange(16000) / 10).astype(np.float32))
    data = bytearray(lie.read_bytes())
    claimed = 6 * 3600 * 16000 * 2
    data[4:8] = (claimed + 36).to_bytes(4, "little")
    data[40:44] = claimed.to_bytes(4, "little")
    lie.write_bytes(bytes(data))
    out = base / "lie.mp4"
    r = run(run_cmd(a["pkg"], lie, out))
    probs = stderr_problems(r, expect_rc={0, 1})
    what, oprobs = output_problems(out, None, r.rc)
    warned = "warn" in r.stderr.lower() or "header" in r.stderr.lower() or "shorter" in r.stderr.lower()
    if r.rc == 0 and not warned:
        probs.append("no warning about the header")
    record("audio", "WAV header claims 6 h, 1 s of data", f"exit {r.rc}, '{first_line(r) or what}'", probs + oprobs)
    # 13. library noise: a model that returns NaN must not print NumPy/ORT noise either (checked by stderr_problems)
    empty = base / "empty.wav"
    empty.write_bytes(b"")
    r = run(run_cmd(a["pkg"], empty, base / "empty.mp4"))
    record("audio", "empty audio file", f"exit {r.rc}, '{first_line(r)}'", stderr_problems(r, expect_rc={1}))


# --------------------------------------------------------------------------- serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def probe_serve(a: dict[str, Path], work: Path) -> None:
    import asyncio

    import aiohttp

    port = free_port()
    errlog = work / "serve.stderr"
    p = subprocess.Popen([AVATAR, "serve", "--demo", "--tiny", "--workdir", str(work / "demo"), "--port", str(port),
                          "--max-message-bytes", "65536"],
                         stdout=subprocess.DEVNULL, stderr=open(errlog, "w"), start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    async def scenario() -> list[tuple[str, str, list[str]]]:
        results: list[tuple[str, str, list[str]]] = []
        async with aiohttp.ClientSession() as c:
            for _ in range(300):
                try:
                    async with c.get(base + "/health") as h:
                        if h.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)

            async def expect(name: str, method: str, path: str, want: set[int], **kw: Any) -> Any:
                try:
                    async with c.request(method, base + path, **kw) as resp:
                        body = await resp.text()
                        probs = [] if resp.status in want else [f"status {resp.status}, expected {sorted(want)}"]
                        if "Traceback" in body:
                            probs.append("a traceback in the response")
                        results.append((name, f"{resp.status} {body[:90]}", probs))
                        return body
                except aiohttp.ClientError as exc:
                    results.append((name, f"client error {type(exc).__name__}", [f"{exc}"]))
                    return None

            await expect("malformed JSON", "POST", "/v1/sessions", {400}, data=b"{not json",
                         headers={"Content-Type": "application/json"})
            await expect("JSON list body", "POST", "/v1/sessions", {400}, json=[1, 2])
            await expect("unknown avatar", "POST", "/v1/sessions", {400, 404}, json={"avatar": "nope"})
            await expect("outputs not a list", "POST", "/v1/sessions", {400}, json={"outputs": "webrtc"})
            await expect("file output without --output-dir", "POST", "/v1/sessions", {400, 403},
                         json={"outputs": [{"type": "file", "path": "../../etc/x.mp4"}]})
            await expect("huge body (40 MiB)", "POST", "/v1/sessions", {413}, data=b"x" * (40 << 20))
            body = await expect("create a session", "POST", "/v1/sessions", {201}, json={})
            sess = json.loads(body) if body else {}
            sid, tok = sess.get("id", "x"), sess.get("token", "x")
            await expect("wrong token", "GET", f"/v1/sessions/{sid}", {401}, headers={"Authorization": "Bearer nope"})
            await expect("no token", "GET", f"/v1/sessions/{sid}", {401})
            await expect("unknown session", "GET", "/v1/sessions/zzz", {401, 404}, headers={"Authorization": f"Bearer {tok}"})
            await expect("speak garbage bytes", "POST", f"/v1/sessions/{sid}/speak", {400},
                         data=os.urandom(5000), headers={"Authorization": f"Bearer {tok}"})
            await expect("speak empty body", "POST", f"/v1/sessions/{sid}/speak", {400},
                         data=b"", headers={"Authorization": f"Bearer {tok}"})
            await expect("webrtc malformed offer", "POST", f"/v1/sessions/{sid}/webrtc", {400},
                         json={"sdp": "garbage", "type": "offer"}, headers={"Authorization": f"Bearer {tok}"})
            try:
                async with c.ws_connect(f"{base}/v1/sessions/{sid}/audio?token=wrong") as ws:
                    results.append(("audio socket, wrong token", "connected", ["a wrong token was accepted"]))
            except aiohttp.WSServerHandshakeError as exc:
                results.append(("audio socket, wrong token", f"refused {exc.status}", [] if exc.status == 401 else ["not 401"]))
            async with c.ws_connect(f"{base}/v1/sessions/{sid}/audio?token={tok}") as ws:
                ready = await ws.receive_json(timeout=10)

                async def answer(name: str, send: Callable[[], Any]) -> None:
                    await send()
                    try:
                        while True:
                            m = await ws.receive(timeout=10)
                            if m.type != aiohttp.WSMsgType.TEXT:
                                results.append((name, f"socket {m.type.name} {m.data}", [] if name.startswith("oversize") else ["socket closed"]))
                                return
                            ev = json.loads(m.data)
                            if ev["type"] == "error":
                                results.append((name, f"error event: {ev['message'][:80]}", []))
                                return
                    except asyncio.TimeoutError:
                        results.append((name, "no answer in 10 s", ["no error event"]))

                await answer("binary before format", lambda: ws.send_bytes(b"\x00\x01" * 800))
                await answer("malformed JSON text", lambda: ws.send_str("{nope"))
                await answer("unknown message type", lambda: ws.send_str('{"type": "dance"}'))
                await answer("format with rate 1", lambda: ws.send_str('{"type": "format", "sample_rate": 1}'))
                await answer("format with a string rate", lambda: ws.send_str('{"type": "format", "sample_rate": "x"}'))
                await ws.send_str('{"type": "format", "sample_rate": 16000}')
                await answer("odd-length PCM", lambda: ws.send_bytes(b"\x00" * 801))
                await answer("oversize message (1 MiB > 64 KiB limit)", lambda: ws.send_bytes(b"\x00" * (1 << 20)))
                results.append(("audio socket ready event", ready.get("type", "?"), [] if ready.get("type") == "ready" else ["no ready"]))
            await expect("health after all that", "GET", "/health", {200})
            await expect("delete the session", "DELETE", f"/v1/sessions/{sid}", {200}, headers={"Authorization": f"Bearer {tok}"})
        return results

    try:
        results = asyncio.run(scenario())
    finally:
        alive = p.poll() is None
        if alive:
            p.send_signal(signal.SIGINT)
        try:
            rc = p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = None
    for name, outcome, probs in results:
        record("serve (hostile requests)", name, outcome, probs)
    err = errlog.read_text()
    probs = [] if alive else ["the server died during the hostile requests"]
    probs += [f"{n!r} in the server's stderr" for n in NOISE if n in err]
    if rc != 130:
        probs.append(f"exit {rc} after SIGINT, not 130")
    left = _session_members(p.pid)
    if left:
        probs.append(f"left processes {left}")
    record("serve (hostile requests)", "server alive, then SIGINT", f"alive={alive}, exit {rc}, stderr {len(err.splitlines())} lines", probs)


# --------------------------------------------------------------------------- main




def write_markdown(path: Path, header: list[str]) -> None:
    lines = ["# Reliability probe (issue 15, \"Done when\")", "", *header, "",
             f"**{sum(c.ok and not c.note for c in RESULTS)} of {len(RESULTS)} cases meet the bar; "
             f"{sum(bool(c.note) for c in RESULTS)} n/a (outside the program); "
             f"{sum(not c.ok for c in RESULTS)} fail.**", ""]
    group = None
    for c in RESULTS:
        if c.group != group:
            group = c.group
            lines += ["", f"## {group}", "", "| case | outcome | verdict |", "|---|---|---|"]
        outcome = c.outcome.replace("|", "\\|").replace("\n", " ")
        verdict = f"n/a: {c.note}" if c.note else "ok" if c.ok else "**FAIL**: " + "; ".join(c.problems).replace("|", "\\|")
        lines.append(f"| {c.name} | {outcome} | {verdict} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/avatar-probe"))
    ap.add_argument("--sanders", type=Path, default=ROOT.parent / "shared" / "data" / "sanders")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "probe-reliability.md")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--sigints", type=int, default=20)
    ap.add_argument("--sigterms", type=int, default=5)
    ap.add_argument("--only", default="", help="comma-separated groups: startup,render,import,disk,corrupt,small,serve,"
                                               "hostile (serve under hostile use and the precision gates, issue 20)")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the nginx it started is stopped on the way out
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    load0 = os.getloadavg()
    a = build_assets(work, args.sanders, 300)
    only = set(filter(None, args.only.split(",")))
    want = lambda g: not only or g in only  # noqa: E731
    nginx = None
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from rtmp_server import NginxRtmp, nginx_rtmp_available

        if nginx_rtmp_available()[0]:
            nginx = NginxRtmp().start()
    except Exception as exc:  # noqa: BLE001 - the probe runs without RTMP then
        print(f"(no nginx-rtmp: {exc})")
    try:
        if want("startup"):
            probe_startup(rng, work)
        if want("render"):
            probe_render_signals(a, work, rng, args.sigints, args.sigterms, nginx)
        if want("import"):
            probe_import_signals(a, work, rng)
        if want("disk"):
            probe_full_disks(a, work)
        if want("corrupt"):
            probe_corrupt_packages(a, work)
        if want("small"):
            probe_smaller(a, work, nginx)
        if want("serve"):
            probe_serve(a, work)
        if want("hostile"):
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from _probe_serve_hostile import run as probe_hostile

            probe_hostile(work, AVATAR, record, NOISE)
    finally:
        if nginx is not None:
            nginx.close()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    header = [
        f"- machine: {platform.node()}, {cpu_model()}, {os.cpu_count()} CPUs (shared with other sessions), "
        f"load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
        f"- code: `{commit}`; Python {platform.python_version()}; `{' '.join(sys.argv)}` (seed {args.seed})",
        f"- wall time {time.monotonic() - t0:.0f} s; nginx-rtmp: {'yes' if nginx else 'no'}; "
        f"tmpfs in a user namespace: {'yes' if can_tmpfs() else 'no'}",
        "- SIGINT goes to the process group (a terminal's Ctrl-C), SIGTERM to the process (`kill PID`).",
        "- bar: one stderr line for a non-zero exit, no traceback or library noise, output playable (PyAV decode) "
        "or absent with the earlier file intact, no partial or lock files, no processes left.",
    ]
    write_markdown(args.out, header)
    print(f"\n{sum(c.ok for c in RESULTS)}/{len(RESULTS)} ok; table in {args.out}")
    return 0 if all(c.ok for c in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
