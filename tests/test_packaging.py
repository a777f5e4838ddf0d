"""The built wheel carries what the installed tool needs: kernels, tinymfv data, contexts."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_package_data(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.skip(f"could not build a wheel here: {proc.stderr.strip().splitlines()[-1:]}")
    (wheel,) = tmp_path.glob("mlxgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in sorted((ROOT / "kernels").iterdir()):
        assert f"mlxgate/kernels/{src.name}" in names
    assert "mlxgate/data/tinymfv/vignettes_classic_other_violate.jsonl" in names
    assert "mlxgate/data/tinymfv/NOTICE.md" in names
    assert "mlxgate/data/contexts.txt" in names
