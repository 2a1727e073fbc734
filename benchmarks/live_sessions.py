"""Live sessions: N concurrent real-time sessions, with and without cross-session batching.

    python benchmarks/live_sessions.py                      # tiny + full UNet-328, 30 s per point
    python benchmarks/live_sessions.py --models tiny --seconds 10 --sessions tiny=1,2,4

Results (JSON + Markdown) go to benchmarks/results/ (see avatar.bench.live).
On a shared machine run it under ``flock /tmp/avatar-bench.lock``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from avatar.bench.harness import default_name
from avatar.bench.live import LiveConfig, run_live_bench, write_live_reports

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,full", help="tiny, full or both (comma-separated)")
    ap.add_argument("--sessions", action="append", default=[], help="MODEL=N,N,... e.g. tiny=1,2,4,8,16 (repeatable)")
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds per point (N, mode)")
    ap.add_argument("--speech", help="speech file pushed by every session (default: ../shared/data/audio/talk_hb.wav if present)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", help="results file stem (default: live-sessions-<machine>)")
    ap.add_argument("--workdir", help="where the test models and avatars are made (default: a temporary folder)")
    args = ap.parse_args()

    cfg = LiveConfig(models=tuple(m for m in args.models.split(",") if m), seconds=args.seconds)
    for spec in args.sessions:
        model, ns = spec.split("=", 1)
        cfg.sessions[model] = tuple(int(n) for n in ns.split(","))
    speech = Path(args.speech) if args.speech else ROOT.parent / "shared" / "data" / "audio" / "talk_hb.wav"
    cfg.speech = str(speech) if speech.exists() else None
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="avatar-live-bench-"))
    result = run_live_bench(cfg, work)
    paths = write_live_reports(result, Path(args.out), args.name or f"live-sessions-{default_name(result['environment'])}")
    print(paths["md"].read_text())
    print(f"wrote {paths['json']} and {paths['md']}")


if __name__ == "__main__":
    main()
