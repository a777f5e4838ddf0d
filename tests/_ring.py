"""Shared by the 2-rank tests: start ``mlx.launch -n 2 --backend ring`` jobs, and a module fixture
that skips (with the reason) where the ring backend cannot start on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PY = sys.executable
LAUNCH = Path(sys.executable).parent / "mlx.launch"

PROBE = (
    "import mlxgate, mlx.core as mx\nfrom mlxgate import distributed as D\nfrom mlxgate.batches import rank_batches\n"
    "x = mx.distributed.all_sum(mx.array([D.rank() + 1.0]))\nprint('SUM', D.size(), x.item())\n"
    "print('BCAST', D.broadcast({'r': D.rank()}), D.gather_ordered([D.rank() * 10], [D.rank()], all_ranks=True), rank_batches(5, 2))\n"
)


def launch(command: list[str], cwd: Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``mlx.launch -n 2 --backend ring -- *command`` (the program and its arguments, as given)."""
    return subprocess.run(
        [str(LAUNCH), "-n", "2", "--backend", "ring", "--", *command],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def ring_dir(tmp_path_factory) -> Path:
    """A working directory where a 2-rank ring job is known to run (its probe's stdout in
    probe.out); skips the calling test otherwise."""
    if not LAUNCH.exists():
        pytest.skip(f"mlx.launch not found beside {PY}")
    d = tmp_path_factory.mktemp("ring")
    (d / "probe.py").write_text(PROBE)
    try:
        p = launch([PY, "probe.py"], d, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("mlx.launch --backend ring did not finish a 2-rank all_sum in 60 s")
    if p.stdout.count("SUM 2 3.0") != 2:
        pytest.skip(f"mlx.launch --backend ring cannot start 2 ranks here: {(p.stderr or p.stdout).strip()[-300:]}")
    (d / "probe.out").write_text(p.stdout)
    return d
