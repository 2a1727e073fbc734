"""The rtmp sink against a real nginx-rtmp server (tests/rtmp_server.py).

Every test is bounded by an alarm (``bounded`` fixture) so a bug can fail a
test but never hang the suite. Timing figures are printed (``-s``) and checked
only against generous bounds; speed is measured by benchmarks/rtmp_pacing.py.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from fractions import Fraction
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from avatar import ConfigError, StreamError, get_plugin_manager
from avatar.interfaces import StreamInfo, VideoFrame
from avatar_plugins.sinks.rtmp import RtmpSink, redact_url, scrub

from rtmp_server import NginxRtmp, free_port, nginx_rtmp_available

FPS = 25
SR = 16000
W, H = 640, 360
KEY = "sEcReTkEy42"
TOKEN = "hushhush99"

rtmp = pytest.mark.rtmp
needs_nginx = pytest.mark.skipif(not nginx_rtmp_available()[0], reason=nginx_rtmp_available()[1])


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def bounded():
    """Fail (never hang) a test that runs past 60 s."""

    def expire(signum, frame):  # type: ignore[no-untyped-def]
        raise TimeoutError("test exceeded its 60 s bound")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def server():
    srv = NginxRtmp().start()
    yield srv
    srv.close()


@pytest.fixture
def secret_logs(caplog):
    caplog.set_level(logging.DEBUG)
    yield caplog
    assert KEY not in caplog.text and TOKEN not in caplog.text


def pattern(i: int, flash: bool = False) -> np.ndarray:
    if flash:
        return np.full((H, W, 3), 255, np.uint8)
    img = np.full((H, W, 3), 40, np.uint8)
    x = (i * 8) % (W - 60)
    img[:, x : x + 60] = (0, 160, 220)
    img[(i * 3) % (H - 30) : (i * 3) % (H - 30) + 30, :] = (200, 80, 0)
    return img


def noise(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 255, (H, W, 3), dtype=np.uint8)


def share(i: int, click: bool = False) -> np.ndarray:
    n = SR // FPS
    pcm = (0.1 * np.sin(2 * np.pi * 440 * (np.arange(n) + i * n) / SR)).astype(np.float32)
    if click:
        pcm[:80] = 0.9
    return pcm


def push(sink: RtmpSink, n: int, image=pattern, events=None, flashes=(), start: int = 0) -> list[float]:
    """Write frames start..start+n-1; ``events[i]()`` runs before frame i. Returns write-return times."""
    times = []
    for i in range(start, start + n):
        if events and i in events:
            events[i]()
        f = i in flashes
        img = pattern(i, flash=True) if f else image(i)
        sink.write(VideoFrame(i, Fraction(i, FPS), img, share(i, click=f)))
        times.append(time.monotonic())
    return times


def probe(path: Path) -> dict:
    """Packets per stream (pts seconds, keyframe) and the codecs of a recorded FLV."""
    import av

    out: dict = {"video": [], "audio": [], "key": []}
    with av.open(str(path)) as c:
        out["vcodec"] = c.streams.video[0].codec_context.name if c.streams.video else None
        out["acodec"] = c.streams.audio[0].codec_context.name if c.streams.audio else None
        out["rate"] = c.streams.audio[0].codec_context.sample_rate if c.streams.audio else None
        for p in c.demux():
            if p.pts is None or p.size == 0:
                continue
            t = float(p.pts * p.time_base)
            if p.stream.type == "video":
                out["video"].append(t)
                out["key"].append(bool(p.is_keyframe))
            else:
                out["audio"].append((t, float(p.duration * p.time_base) if p.duration else 0.0))
    return out


def flash_times(path: Path) -> list[float]:
    import av

    with av.open(str(path)) as c:
        return [float(f.pts * f.time_base) for f in c.decode(video=0)
                if f.to_ndarray(format="gray").mean() > 200]


def click_times(path: Path) -> list[float]:
    import av

    with av.open(str(path)) as c:
        frames = list(c.decode(audio=0))
    rate = frames[0].sample_rate
    t0 = float(frames[0].pts * frames[0].time_base)
    pcm = np.concatenate([f.to_ndarray()[0] for f in frames])
    loud = np.flatnonzero(np.abs(pcm) > 0.5)
    onsets = [loud[0]] + [b for a, b in zip(loud, loud[1:]) if b - a > rate // 2] if len(loud) else []
    return [t0 + k / rate for k in onsets]


def info() -> StreamInfo:
    return StreamInfo(W, H, Fraction(FPS), SR, title="test")


def no_feed_threads() -> bool:
    return not any(t.name == "rtmp-feed" and t.is_alive() for t in threading.enumerate())


# --------------------------------------------------------------------------- no server needed


def test_redact_url_hides_key_query_and_password() -> None:
    url = f"rtmp://user:pw123@live.example.com:1935/app/{KEY}?token={TOKEN}"
    red = redact_url(url)
    assert red == "rtmp://user:***@live.example.com:1935/app/***?***"
    assert redact_url("rtmps://a.rtmp.youtube.com/live2/abcd-efgh") == "rtmps://a.rtmp.youtube.com/live2/***"
    assert redact_url("rtmp://host/app") == "rtmp://host/***"  # one component may be the key
    assert redact_url("not a url") == "<url redacted>"
    text = scrub(f"Connection refused: '{url}' while sending {KEY}", url)
    assert KEY not in text and TOKEN not in text and "pw123" not in text and red in text


def test_every_form_of_the_url_is_redacted() -> None:
    for url, red in [
        (f"rtmp://live.example.com/{KEY}", "rtmp://live.example.com/***"),  # the key as the only component
        (f"rtmp://127.0.0.1:1935/{KEY}/", "rtmp://127.0.0.1:1935/***"),
        (f"rtmps://host/app/{KEY}#{TOKEN}", "rtmps://host/app/***#***"),
        (f"rtmp://host/app/{KEY}%21?t={TOKEN}", "rtmp://host/app/***?***"),
        (f"rtmp://host:port/{KEY}", "<url redacted>"),  # a malformed port: nothing of it is shown
    ]:
        assert redact_url(url) == red, url
        # FFmpeg quotes the URL, the key alone, or the key percent-decoded, or a query value
        key = url.split("/")[-1].split("?")[0].split("#")[0] or url.split("/")[-2]
        text = scrub(f"failed: '{url}' publishing {key} ({unquote(key)}) token {TOKEN}", url)
        assert KEY not in text and (TOKEN not in url or TOKEN not in text), (url, text)


def test_the_url_can_come_from_a_file_or_the_environment(tmp_path: Path, tiny_job, secret_logs) -> None:  # type: ignore[no-untyped-def]
    """Through `avatar run`: no key on the command line, and none in what it prints."""
    from click.testing import CliRunner

    from avatar.cli import cli

    url = f"rtmp://127.0.0.1:{free_port()}/{KEY}"  # nothing listens: the run fails at connect
    secret = tmp_path / "rtmp-url"
    secret.write_text(f"\n{url}\n")
    assert RtmpSink(url_file=str(secret)).url == url
    base = ["run", "--avatar", str(tiny_job["pkg"]), "--audio", str(tiny_job["short"]), "--model", str(tiny_job["unet"]),
            "--ave-encoder", str(tiny_job["enc"]), "--backend", "cpu", "--no-progress", "--sink", "rtmp"]
    for args, env in (([], {"AVATAR_RTMP_URL": url}), (["--rtmp-url-file", str(secret)], {})):
        r = CliRunner().invoke(cli, base + args, env=env)
        assert r.exit_code != 0
        assert f"cannot publish to rtmp://127.0.0.1:{url.split(':')[2].split('/')[0]}/***" in r.output, r.output
        assert KEY not in r.output
    r = CliRunner().invoke(cli, base + ["--rtmp-url-file", str(secret)], env={"AVATAR_RTMP_URL": url})
    assert r.exit_code != 0 and "give the RTMP URL once" in r.output and KEY not in r.output
    r = CliRunner().invoke(cli, base, env={"AVATAR_RTMP_URL": ""})
    assert r.exit_code != 0 and "--rtmp-url-file FILE, AVATAR_RTMP_URL=" in r.output
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        RtmpSink(url_file=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="cannot read the RTMP URL file"):
        RtmpSink(url_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="once"):
        RtmpSink(url=url, url_file=str(secret))


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="needs url"):
        RtmpSink()
    with pytest.raises(ConfigError, match="rtmp://") as e:
        RtmpSink(url=f"http://host/app/{KEY}")
    assert KEY not in str(e.value)
    ok = f"rtmp://127.0.0.1/live/{KEY}"
    for bad in ({"on_lag": "skip"}, {"bitrate": "fast"}, {"keyint_s": 0}, {"preset": "warp"},
                {"reconnect": -1}, {"stall_timeout_s": 0}, {"audio_rate": 16000}, {"nope": 1}):
        with pytest.raises(ConfigError):
            RtmpSink(url=ok, **bad)
    sink = get_plugin_manager().sink("rtmp", url=ok)
    assert isinstance(sink, RtmpSink) and sink.realtime


# --------------------------------------------------------------------------- against nginx


@rtmp
@needs_nginx
def test_no_server_is_a_clear_fast_error(secret_logs) -> None:
    url = f"rtmp://127.0.0.1:{free_port()}/live/{KEY}?token={TOKEN}"
    sink = RtmpSink(url=url)
    t0 = time.monotonic()
    with pytest.raises(StreamError, match="cannot publish") as e:
        sink.open(info())
    took = time.monotonic() - t0
    assert KEY not in str(e.value) and TOKEN not in str(e.value) and "/live/***" in str(e.value)
    assert took < 8, took
    retry = RtmpSink(url=url, connect_retries=2, reconnect_backoff_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(StreamError):
        retry.open(info())
    assert time.monotonic() - t0 >= 0.2 + 0.4  # two backoffs were waited
    assert sink.close().frames == 0 and retry.close().frames == 0
    print(f"\nno server: StreamError after {took:.2f} s")


@rtmp
@needs_nginx
def test_paced_push_is_recorded_in_sync(server, secret_logs) -> None:
    n = 200  # 8 s
    # a generous max_lag_s: a busy CI machine must not turn a hiccup into dropped frames here
    sink = RtmpSink(url=server.url(KEY), max_lag_s=5.0)
    sink.open(info())
    t0 = time.monotonic()
    push(sink, n, flashes=(25, 175))
    wall = time.monotonic() - t0
    live = sink.stats
    report = sink.close()
    assert no_feed_threads()
    server.wait_recordings_closed()
    (rec,) = server.recordings(KEY)
    p = probe(rec)
    assert (p["vcodec"], p["acodec"], p["rate"]) == ("h264", "aac", 44100)
    assert len(p["video"]) == n and report.frames == n and live.frames_in == n
    assert (report.dropped, report.reconnects, report.gap_s) == (0, 0, 0.0)
    # keyframes every 2 s (keyint_s default) and no B-frames (pts increase)
    assert [i for i, k in enumerate(p["key"]) if k] == [0, 50, 100, 150]
    assert all(b > a for a, b in zip(p["video"], p["video"][1:]))
    # duration: the audio stream spans the pushed audio (within one frame)
    a_end = p["audio"][-1][0] + p["audio"][-1][1]
    a_len = a_end - (p["audio"][0][0] + 1024 / 44100)  # the first packet is AAC priming
    assert abs(a_len - n / FPS) <= 1 / FPS, a_len
    v_len = p["video"][-1] + 1 / FPS - p["video"][0]
    assert abs(v_len - n / FPS) <= 1 / FPS
    # A/V: streams start and end together, and flash/click pairs line up
    assert abs((p["audio"][0][0] + 1024 / 44100) - p["video"][0]) <= 0.040
    assert abs(a_end - (p["video"][-1] + 1 / FPS)) <= 0.040
    flashes, clicks = flash_times(rec), click_times(rec)
    assert len(flashes) == 2 and len(clicks) == 2, (flashes, clicks)
    offsets = [c - f for f, c in zip(flashes, clicks)]
    assert all(abs(o) <= 0.040 for o in offsets), offsets
    # pacing: 8 s of media took about 8 s of wall time
    assert abs(wall - (n - 1) / FPS) < 1.0, wall
    for k in ("lag_p50_s", "lag_p95_s", "lag_max_s"):
        assert k in report.details
    print(f"\npaced push: {n / FPS:.1f} s of media in {wall:.2f} s wall; A/V offsets "
          f"{[round(o * 1000, 1) for o in offsets]} ms; lag p50 {report.details['lag_p50_s'] * 1000:.1f} ms "
          f"p95 {report.details['lag_p95_s'] * 1000:.1f} ms max {report.details['lag_max_s'] * 1000:.1f} ms")


@rtmp
@needs_nginx
def test_server_restart_reconnects_and_reports_the_gap(server, secret_logs) -> None:
    sink = RtmpSink(url=server.url(KEY), reconnect=5, reconnect_backoff_s=0.3)
    sink.open(info())
    killed_at: list[float] = []

    def kill() -> None:
        server.kill()
        killed_at.append(time.monotonic())

    def restart() -> None:
        server.restart()

    t0 = time.monotonic()
    push(sink, 225, events={50: kill, 90: restart})
    wall = time.monotonic() - t0
    report = sink.close()
    assert report.reconnects >= 1 and report.gap_s > 0
    assert report.frames + report.details["gap_frames"] == 225
    assert abs(wall - 224 / FPS) < 1.5, wall  # the clock went on through the outage
    server.wait_recordings_closed()
    recs = server.recordings(KEY)
    assert len(recs) >= 2
    after = probe(recs[-1])
    # the new stream starts with a keyframe and continues on the audio clock
    assert after["key"][0] and after["video"][0] >= 90 / FPS - 0.05
    assert abs(after["video"][-1] - 224 / FPS) < 0.05
    print(f"\nrestart: reconnects {report.reconnects}, gap {report.gap_s:.2f} s "
          f"({report.details['gap_frames']} frames), new stream from {after['video'][0]:.2f} s")


@rtmp
@needs_nginx
def test_stalled_server_is_detected_and_fails_cleanly(server, secret_logs) -> None:
    sink = RtmpSink(url=server.url(KEY), reconnect=0, stall_timeout_s=1.5, bitrate="8M")
    sink.open(info())
    push(sink, 25, image=noise)
    server.stall()
    t_stall = time.monotonic()
    with pytest.raises(StreamError, match="stopped reading") as e:
        push(sink, 20 * FPS, image=noise, start=25)
    detected = time.monotonic() - t_stall
    assert KEY not in str(e.value)
    t0 = time.monotonic()
    report = sink.close(aborted=True)
    assert time.monotonic() - t0 < 3.0
    assert no_feed_threads()
    assert report.details["stalls_detected"] == 1 and report.gap_s > 0
    assert detected < 1.5 + 8.0, detected
    print(f"\nstall detected {detected:.2f} s after SIGSTOP (stall_timeout_s 1.5, 8 Mbit/s)")


@rtmp
@needs_nginx
def test_stall_then_resume_reconnects(server, secret_logs) -> None:
    sink = RtmpSink(url=server.url(KEY), reconnect=3, reconnect_backoff_s=0.2, stall_timeout_s=1.5,
                    connect_timeout_s=2.0, bitrate="8M")
    sink.open(info())
    push(sink, 25, image=noise)
    server.stall()
    i = 25
    while sink.stats.stalls_detected == 0 and i < 25 + 15 * FPS:
        push(sink, 1, image=noise, start=i)
        i += 1
    assert sink.stats.stalls_detected == 1
    server.resume()
    push(sink, 3 * FPS, image=noise, start=i)
    report = sink.close()
    assert report.reconnects >= 1 and report.gap_s > 0 and report.frames > 25


@rtmp
@needs_nginx
def test_ctrl_c_during_a_stall_closes_in_bounded_time(server) -> None:
    sink = RtmpSink(url=server.url(KEY), stall_timeout_s=30, bitrate="8M")
    sink.open(info())
    push(sink, 10, image=noise)
    server.stall()
    i = 10
    while sink.stats.frames_sent - sink.stats.frames_acked < 5 and i < 10 + 15 * FPS:
        push(sink, 1, image=noise, start=i)
        i += 1
    t0 = time.monotonic()
    report = sink.close(aborted=True)
    took = time.monotonic() - t0
    assert took < 4.0, took
    assert no_feed_threads()
    assert report.details["aborted"] is True
    print(f"\nclose(aborted=True) while the worker was blocked: {took:.2f} s")


@rtmp
@needs_nginx
@pytest.mark.parametrize("policy", ["drop", "stall"])
def test_late_frames_follow_on_lag(server, policy: str) -> None:
    n, pause_at, pause = 75, 20, 0.8
    sink = RtmpSink(url=server.url(KEY), on_lag=policy, max_lag_s=0.3, keyint_s=1.0, bitrate="400k",
                    audio_rate=48000)
    sink.open(info())
    t0 = time.monotonic()
    push(sink, n, events={pause_at: lambda: time.sleep(pause)})  # the generator hiccups
    wall = time.monotonic() - t0
    report = sink.close()
    server.wait_recordings_closed()
    (rec,) = server.recordings(KEY)
    p = probe(rec)
    assert p["rate"] == 48000  # audio_rate
    assert [i for i, k in enumerate(p["key"]) if k][:2] == [0, 25] or policy == "drop"  # keyint_s=1
    a_end = p["audio"][-1][0] + p["audio"][-1][1]
    a_len = a_end - (p["audio"][0][0] + 1024 / 48000)
    assert abs(a_len - n / FPS) <= 1 / FPS  # audio is never dropped
    bytes_per_s = rec.stat().st_size / (n / FPS)
    assert bytes_per_s < 1.6 * (400_000 + 128_000) / 8  # bitrate caps the stream
    assert report.details["lag_max_s"] >= pause - 0.1
    if policy == "drop":
        assert report.dropped >= 1 and report.stalled_s == 0
        assert len(p["video"]) == n - report.dropped
        assert abs(wall - (n - 1) / FPS) < 1.0  # the clock did not slip
    else:
        assert report.dropped == 0 and report.stalled_s >= pause - 0.1
        assert len(p["video"]) == n
        assert wall >= (n - 1) / FPS + pause - 0.1  # the clock slipped by the pause
    print(f"\non_lag={policy}: dropped {report.dropped}, stalled {report.stalled_s:.2f} s, wall {wall:.2f} s")
