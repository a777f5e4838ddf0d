"""Bad input: one clear line on stderr, exit code 2, no traceback (run as a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, env_extra: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mlxgate.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def assert_user_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"MLXGATE_HOME": str(root / "home"), "HF_HUB_CACHE": str(root / "hub")}


def test_unknown_alias(cli_env):
    assert_user_error(run_cli("measure", "--model", "no-such-model", env_extra=cli_env), "unknown model 'no-such-model'")


def test_missing_path(cli_env, tmp_path):
    assert_user_error(run_cli("measure", "--model", str(tmp_path / "absent.gguf"), env_extra=cli_env), "model path not found")


def test_truncated_gguf(cli_env, tmp_path):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(20))
    assert_user_error(run_cli("measure", "--model", str(bad), env_extra=cli_env), "not a readable GGUF")


def test_unsupported_architecture(cli_env, tmp_path, tiny_dirs):
    import json
    import shutil

    d = tmp_path / "qwen"
    shutil.copytree(tiny_dirs["llama"], d)
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "qwen2"
    (d / "config.json").write_text(json.dumps(config))
    assert_user_error(run_cli("measure", "--model", str(d), "-p", "hi", env_extra=cli_env), "architecture 'qwen2'")


def test_empty_prompt_file(cli_env, tmp_path, tiny_dirs):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert_user_error(run_cli("measure", "--model", tiny_dirs["llama"], "--prompts", str(empty), env_extra=cli_env), "has no prompts")


def test_max_tokens_zero(cli_env, tiny_dirs):
    assert_user_error(run_cli("measure", "--model", tiny_dirs["llama"], "--max-tokens", "0", env_extra=cli_env), "--max-tokens must be at least 1")


def test_hub_id_not_cached_offline(cli_env):
    proc = run_cli("measure", "--model", "someone/not-cached-model", env_extra=cli_env)
    assert_user_error(proc, "someone/not-cached-model is not in the local Hugging Face cache")
    assert cli_env["HF_HUB_CACHE"] in proc.stderr and "mlxgate models fetch" in proc.stderr


def test_output_not_half_written(cli_env, tmp_path, tiny_dirs):
    out = tmp_path / "report.json"
    out.write_text("previous\n")
    proc = run_cli("measure", "--model", "no-such-model", "--format", "json", "--out", str(out), env_extra=cli_env)
    assert proc.returncode == 2
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report")] == []
