"""Backend: OpenBLAS is loaded before mlx.core in every entry point; device and dtype reporting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxgate import _blas, backend

SNIPPET = "import json, mlxgate.backend as b; print(json.dumps(b.info_dict()))"


def _info(env_extra: dict) -> dict:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout), out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux") or not any(Path(p).exists() for p in _blas._CANDIDATES), reason="no system OpenBLAS here")
def test_openblas_loaded_on_linux():
    info, stderr = _info({})
    assert info["blas"].startswith("openblas (") and info["label"] == "cpu+openblas"
    assert "reference BLAS" not in stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS preloading is Linux-only")
def test_reference_blas_when_asked():
    info, _ = _info({"MLXGATE_BLAS": "reference"})
    assert info["blas"].startswith("reference") and info["label"] == "cpu+refblas"


def test_compute_dtype():
    import mlx.core as mx

    expected = mx.float32 if backend.device_name() == "cpu" else mx.bfloat16
    assert backend.compute_dtype() == expected
    assert backend.compute_dtype("bfloat16") == mx.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        backend.compute_dtype("float8")


def test_info_cli_json():
    from click.testing import CliRunner

    from mlxgate.cli import main

    result = CliRunner().invoke(main, ["info", "--format", "json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["device"] in ("cpu", "metal", "cuda")
    assert {"mlx_active_bytes", "mlx_peak_bytes", "mlx_cache_bytes", "system_total_bytes"} <= set(data["memory"])
    assert data["memory"]["system_total_bytes"] > 0
