"""A real nginx-rtmp server for tests and benchmarks, on a free loopback port.

nginx runs with its own config, prefix and logs in a temporary directory (no
root-owned paths), listens on 127.0.0.1 only and records every published
stream (``record all``, ``record_unique on``: each publish, e.g. after a
reconnect, gets its own ``<key>-<unix time>.flv``). It is started and stopped by
PID, can be restarted on the same port, and its worker process can be stalled
(SIGSTOP) and resumed (SIGCONT) to simulate a server that stops reading.

Every wait here is bounded. Use :func:`nginx_rtmp_available` to skip cleanly
when nginx or its RTMP module is not installed (CI installs them with
``apt-get install -y nginx libnginx-mod-rtmp``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/usr/local/nginx/modules")
MODULE_NAME = "ngx_rtmp_module.so"

CONFIG = """\
load_module {module};
{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{port};
        chunk_size 4096;
        application {app} {{
            live on;
            allow publish 127.0.0.1;
            deny publish all;
            record all;
            record_path {prefix}/rec;
            record_unique on;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    """Path of the nginx binary, or None."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/nginx/sbin/nginx") if os.path.exists(p)), None
    )


def find_rtmp_module() -> str | None:
    """Path of ngx_rtmp_module.so, or None."""
    for d in MODULE_DIRS:
        p = Path(d) / MODULE_NAME
        if p.exists():
            return str(p)
    return None


def nginx_rtmp_available() -> tuple[bool, str]:
    """(usable, reason) — reason names what to install when not usable."""
    if find_nginx() is None:
        return False, "nginx is not installed (apt-get install -y nginx libnginx-mod-rtmp)"
    if find_rtmp_module() is None:
        return False, "the nginx RTMP module is not installed (apt-get install -y libnginx-mod-rtmp)"
    return True, ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc; Linux only)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name may contain spaces; fields after the closing paren are fixed
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


class NginxRtmp:
    """One nginx-rtmp server process tree, owned by this object.

    ``url(key)`` is the publish URL; ``recordings()`` lists the FLV files.
    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, port: int | None = None, app: str = "live", workdir: str | Path | None = None) -> None:
        ok, reason = nginx_rtmp_available()
        if not ok:
            raise RuntimeError(reason)
        self.binary = find_nginx()
        self.module = find_rtmp_module()
        self.app = app
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.prefix = Path(workdir or tempfile.mkdtemp(prefix="nginx-rtmp-"))
        (self.prefix / "rec").mkdir(parents=True, exist_ok=True)
        (self.prefix / "logs").mkdir(exist_ok=True)
        self.conf = self.prefix / "nginx.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped_worker: int | None = None
        # nginx runs in its own session: make sure an aborted test run does not leave it behind
        atexit.register(self.close)

    # ------------------------------------------------------------------ lifecycle

    def url(self, key: str = "stream") -> str:
        return f"rtmp://127.0.0.1:{self.port}/{self.app}/{key}"

    @property
    def record_dir(self) -> Path:
        return self.prefix / "rec"

    def start(self, timeout: float = 10.0) -> "NginxRtmp":
        """Start nginx (foreground master, one worker) and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.conf.write_text(
            CONFIG.format(module=self.module, prefix=self.prefix, port=self.port, app=self.app,
                          user=_user_directive())
        )
        self.proc = subprocess.Popen(
            [str(self.binary), "-p", str(self.prefix), "-c", str(self.conf), "-e",
             str(self.prefix / "error.log"), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.prefix / "stderr.log", "ab"),
            start_new_session=True,  # a Ctrl-C in the terminal must not reach it first
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    if self.worker_pids():
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"nginx did not listen on 127.0.0.1:{self.port} within {timeout} s: {self.log_tail()}")

    def worker_pids(self) -> list[int]:
        return _children(self.proc.pid) if self.proc is not None and self.proc.poll() is None else []

    def kill(self, timeout: float = 5.0) -> None:
        """Kill master and workers at once (SIGKILL): the server vanishes mid-stream."""
        if self.proc is None:
            return
        self.resume()
        pids = self.worker_pids()
        for pid in [self.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap(pids, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop (SIGQUIT lets the worker finish and close recordings), then SIGKILL."""
        if self.proc is None:
            return
        self.resume()
        pids = self.worker_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        for pid in [self.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._reap(pids, timeout)

    def _reap(self, workers: list[int], timeout: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        # workers are re-parented when the master dies; wait until they are gone
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and
                                                   "Z" not in _state(p) for p in workers):
            time.sleep(0.02)
        self.proc = None

    def restart(self, timeout: float = 10.0) -> "NginxRtmp":
        """Start again on the same port (after :meth:`kill` or :meth:`stop`)."""
        if self.proc is not None:
            self.kill()
        return self.start(timeout)

    def stall(self) -> int:
        """SIGSTOP the worker: connections stay open but nothing is read. Returns its PID."""
        pids = self.worker_pids()
        if not pids:
            raise RuntimeError("nginx has no worker process to stall")
        os.kill(pids[0], signal.SIGSTOP)
        self.stopped_worker = pids[0]
        return pids[0]

    def resume(self) -> None:
        """SIGCONT a stalled worker."""
        if self.stopped_worker is not None:
            try:
                os.kill(self.stopped_worker, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.stopped_worker = None

    def close(self) -> None:
        self.stop()
        atexit.unregister(self.close)
        if self._own_dir:
            shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> "NginxRtmp":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ results

    def recordings(self, key: str = "") -> list[Path]:
        """Recorded FLV files (oldest first), optionally only those of ``key``."""
        files = [p for p in self.record_dir.glob("*.flv") if p.name.startswith(key)]
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def wait_recordings_closed(self, timeout: float = 5.0, settle: float = 0.3) -> None:
        """Wait (bounded) until no recording grew for ``settle`` seconds."""
        deadline = time.monotonic() + timeout
        last: tuple[int, ...] = ()
        still_since = time.monotonic()
        while time.monotonic() < deadline:
            sizes = tuple(p.stat().st_size for p in self.recordings())
            if sizes != last:
                last, still_since = sizes, time.monotonic()
            elif time.monotonic() - still_since >= settle:
                return
            time.sleep(0.05)

    def log_tail(self, n: int = 2000) -> str:
        parts = []
        for name in ("error.log", "stderr.log"):
            p = self.prefix / name
            if p.exists():
                parts.append(p.read_text(errors="replace")[-n:])
        return "\n".join(parts)


def _user_directive() -> str:
    """Run the worker as the current user when started as root.

    nginx started by root otherwise switches its workers to ``nobody``, which
    cannot write recordings into our private temporary directory.
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        import pwd

        return f"user {pwd.getpwuid(0).pw_name};\n"
    return ""


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return stat[stat.rfind(")") + 2 :].split()[0]
