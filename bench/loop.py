"""Wall time per stage and peak memory of `mlxgate loop --preset quick` (default model: the embedded
SmolLM2-135M-Instruct), run in a subprocess through the CLI exactly as a user would.

    .venv/bin/python bench/loop.py [--model smollm2-135m-instruct] [--run-dir DIR] [--out bench/results/loop.json]

Records per round the stage timings the loop writes into rounds/r<N>/done.json, the total wall
time, the child's peak RSS (getrusage of the finished child), the MLX peak, the load average
before and after (the machine is shared), and then checks that `mlxgate dashboard --run DIR
--once` renders the finished run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "loop.json"))
    ap.add_argument("extra", nargs="*", help="extra `mlxgate loop` flags (after --)")
    args = ap.parse_args()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="mlxgate-loop-bench-")) / "run"
    cmd = [sys.executable, "-m", "mlxgate.cli", "loop", "--model", args.model, "--preset", args.preset, "--run-dir", str(run_dir), *args.extra]
    load_before = os.getloadavg()
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - tic
    load_after = os.getloadavg()
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"loop failed with exit {proc.returncode}")

    rounds = []
    for p in sorted((run_dir / "rounds").glob("r*/done.json"), key=lambda p: int(p.parent.name[1:])):
        d = json.loads(p.read_text())
        rounds.append({
            "round": d["round"], "timings_s": d["timings"], "kept": d.get("kept"), "generated": d.get("generated"), "kappa": d.get("kappa"),
            "auth_nats": d["eval"]["auth_nats"], "coherence": d["eval"]["coherence"], "kl": d.get("kl"),
            "mlx_peak_bytes": d.get("mlx_peak_bytes"), "peak_rss_bytes": d.get("peak_rss_bytes"),
        })
    stages: dict[str, float] = {}
    for r in rounds:
        for k, v in r["timings_s"].items():
            stages[k] = stages.get(k, 0.0) + v
    dash = subprocess.run([sys.executable, "-m", "mlxgate.cli", "dashboard", "--run", str(run_dir), "--once"], cwd=ROOT, capture_output=True, text=True)
    result = {
        "command": " ".join(cmd[2:]),
        "run_dir": str(run_dir),
        "wall_s": wall,
        "stage_totals_s": stages,
        "rounds": rounds,
        "peak_rss_bytes_child": child.ru_maxrss * 1024,
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "cpus": os.cpu_count(),
        "dashboard_once_rc": dash.returncode,
        "dashboard_once_lines": len(dash.stdout.splitlines()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    print(dash.stdout[-3000:])


if __name__ == "__main__":
    main()
