"""spectrum: end to end on tiny fixtures, layer metrics against float64 numpy (covariance eigenvalues),
adapter ΔW spectra against numpy SVD of scale·(lora_a @ lora_b), bad adapters."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from _adapter_fixture import make_adapter
from mlxgate.analysis.spectral import PHI, spectral_status
from mlxgate.cli import main
from mlxgate.measure import PROBE_PROMPTS
from mlxgate.prompts import prompt_ids

LAYER_FIELDS = {"layer", "spectral_entropy", "effective_rank", "dominant_ratio", "phi_proximity", "eigenvalues", "rank", "n_tokens", "dim", "total_variance", "status"}


def run(args):
    return CliRunner().invoke(main, ["spectrum", *args])


def run_json(args) -> dict:
    result = run([*args, "--format", "json"])
    assert result.exit_code == 0, result.output + str(result.exception)
    return json.loads(result.stdout)


def np_metrics(lam: np.ndarray) -> dict:
    """SPEC §3.5 from covariance eigenvalues (float64, descending, positive)."""
    p = lam / lam.sum()
    h = -(p * np.log(p)).sum()
    return {
        "spectral_entropy": h / math.log(lam.size),
        "effective_rank": math.exp(h),
        "dominant_ratio": p[0],
        "phi_proximity": 1 - min(abs(lam[0] / lam[1] - PHI) / PHI, 1),
    }


@pytest.fixture(scope="module")
def adapter_dir(tiny_dirs, tmp_path_factory):
    return str(make_adapter(tiny_dirs["llama"], tmp_path_factory.mktemp("spec") / "adapter", rank=4, scale=2.0, num_layers=2))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_layers_match_covariance_eigenvalues(tiny_dirs, tiny_models, family):
    from mlxgate.hooks import hidden_states

    import mlx.core as mx

    report = run_json(["-m", tiny_dirs[family]])
    model, tok, info = tiny_models[family]
    lengths = [len(prompt_ids(tok, p)) for p in PROBE_PROMPTS]
    assert report["probes"]["n"] == len(PROBE_PROMPTS) and report["probes"]["tokens"] == sum(lengths)
    assert [r["layer"] for r in report["layers"]] == list(range(info.n_layers))
    assert report["adapter"] is None
    # Oracle: covariance eigenvalues (eigvalsh, not an SVD) of each layer's stacked probe rows.
    rows = {}
    for p in PROBE_PROMPTS:
        for layer, h in hidden_states(model, mx.array([prompt_ids(tok, p)])).items():
            rows.setdefault(layer, []).append(np.array(h[0], dtype=np.float64))
    for r in report["layers"]:
        assert set(r) == LAYER_FIELDS
        x = np.concatenate(rows[r["layer"]])
        assert x.shape == (sum(lengths), info.hidden_size) == (r["n_tokens"], r["dim"])
        lam = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
        assert r["rank"] == info.hidden_size  # hundreds of tokens in 64 dims: full rank
        ref = np_metrics(lam)
        for k, v in ref.items():
            assert r[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
        np.testing.assert_allclose(r["eigenvalues"], lam[: len(r["eigenvalues"])], rtol=1e-4)
        assert r["total_variance"] == pytest.approx(lam.sum(), rel=1e-5)
        assert r["status"] == spectral_status(r["spectral_entropy"], r["dominant_ratio"])
    counts = report["summary"]["status_counts"]
    assert sum(counts.values()) == info.n_layers


def test_adapter_delta_spectra_match_numpy_svd(tiny_dirs, adapter_dir, tmp_path):
    report = run_json(["-m", tiny_dirs["llama"], "--adapter", adapter_dir])
    a = report["adapter"]
    assert a["scale"] == 2.0 and a["rank"] == 4 and a["num_layers"] == 2 and a["fine_tune_type"] == "lora"
    weights = load_file(f"{adapter_dir}/adapters.safetensors")  # an independent reader
    modules = sorted({k.rsplit(".", 1)[0] for k in weights})
    assert len(a["modules"]) == len(modules) == 14  # 7 linear layers x the last 2 blocks
    assert {m["layer"] for m in a["modules"]} == {2, 3}
    by_name = {m["name"]: m for m in a["modules"]}
    for name in modules:
        la, lb = weights[f"{name}.lora_a"].astype(np.float64), weights[f"{name}.lora_b"].astype(np.float64)
        s = np.linalg.svd(2.0 * (la @ lb), compute_uv=False)  # ΔW.T: same singular values
        m = by_name[name]
        assert (m["in"], m["out"], m["lora_rank"]) == (la.shape[0], lb.shape[1], 4)
        assert m["sigma_max"] == pytest.approx(s[0], rel=1e-6)
        nz = s[s > s[0] * max(la.shape[0], lb.shape[1]) * np.finfo(np.float32).eps]
        assert m["rank"] == nz.size == 4
        p = nz / nz.sum()
        assert m["spectral_entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(nz.size), rel=1e-6)
        np.testing.assert_allclose(m["singular_values"], s[:4], rtol=1e-6)
    # the hidden states are those of the adapted model: they differ from the base model's
    base = run_json(["-m", tiny_dirs["llama"]])
    assert base["layers"][3]["total_variance"] != report["layers"][3]["total_variance"]
    assert base["layers"][0]["total_variance"] == pytest.approx(report["layers"][0]["total_variance"], rel=1e-6)  # before the LoRA layers
    # table and plot
    png = tmp_path / "spec.png"
    result = run(["-m", tiny_dirs["llama"], "--adapter", adapter_dir, "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "hidden-state spectrum by layer" in result.stdout and "LoRA ΔW" in result.stdout
    assert result.stdout.count("HEALTHY") + result.stdout.count("DRIFTING") + result.stdout.count("WARNING") >= 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_thresholds_are_parameters(tiny_dirs):
    report = run_json(["-m", tiny_dirs["llama"], "-p", "one probe", "-p", "and another one", "--healthy-entropy", "0.999", "--drifting-entropy", "0.999"])
    assert report["probes"]["n"] == 2
    assert report["thresholds"]["healthy_entropy"] == 0.999
    assert {r["status"] for r in report["layers"]} == {"WARNING"}


def _write_broken(tmp_path, adapter_dir, case):
    d = tmp_path / case
    d.mkdir()
    cfg = json.loads(open(f"{adapter_dir}/adapter_config.json").read())
    w = load_file(f"{adapter_dir}/adapters.safetensors")
    if case == "bad_json":
        (d / "adapter_config.json").write_text("{not json")
        save_file(w, str(d / "adapters.safetensors"))
    elif case == "no_scale":
        del cfg["lora_parameters"]["scale"]
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(w, str(d / "adapters.safetensors"))
    elif case == "unpaired":
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        save_file({k: v for k, v in w.items() if not k.endswith("q_proj.lora_b")}, str(d / "adapters.safetensors"))
    elif case == "corrupt":
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        (d / "adapters.safetensors").write_bytes(b"garbage" * 10)
    return str(d)


@pytest.mark.parametrize(
    "case, needle",
    [
        ("bad_json", "cannot read"),
        ("no_scale", "scale is missing"),
        ("unpaired", "not its partner"),
        ("corrupt", "cannot read"),
        ("mismatch", "does not match model"),
        ("missing", "adapter directory not found"),
    ],
)
def test_bad_adapter_exit_2(tiny_dirs, adapter_dir, tmp_path, case, needle):
    if case == "mismatch":
        from mlxgate.fixtures import make_tiny_checkpoint

        small = make_tiny_checkpoint(tmp_path / "small", "llama", hidden=32)
        bad = str(make_adapter(str(small), tmp_path / "small_adapter"))
    elif case == "missing":
        bad = str(tmp_path / "nowhere")
    else:
        bad = _write_broken(tmp_path, adapter_dir, case)
    result = run(["-m", tiny_dirs["llama"], "--adapter", bad])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output
