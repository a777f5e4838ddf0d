"""Convert a GGUF file into an MLX checkpoint in Hugging Face layout (SPEC §2.2).

General for the ``llama`` (SmolLM2, Llama, Mistral GGUFs) and ``gemma3`` architectures and for every
quant type llama.cpp's own reader (PyPI ``gguf``) can dequantize, K-quants included. Output:
``config.json``, ``model.safetensors`` (float32: dequantized values are kept exactly),
``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template), built from GGUF metadata
with the ``tokenizers`` library (no torch, no transformers).

Two conversion facts that decide correctness (each one measured, SPEC §2.2):
- llama: llama.cpp permutes the rows of attn_q / attn_k for its RoPE layout; undo it per head.
- gemma3: RMSNorm weights are stored as ``w + 1``; mlx-lm adds the 1 itself, so subtract it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from mlxgate.errors import UserError
from mlxgate.io import atomic_dir

SUPPORTED_ARCHS = ("llama", "gemma3")

# Gemma's turn format (SPEC §2.2): base GGUFs carry no template. Gemma has no system role, so
# the system text is folded into the first user turn, as Google's own template does.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_LLAMA_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GEMMA3_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def open_gguf(path: str | Path):
    """Open a GGUF file with llama.cpp's reader; a clear UserError if it is not a valid one."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
        # Touch every tensor's extent: a truncated file fails here, not halfway through a conversion.
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} extends past the end of the file")
        if not reader.tensors or "general.architecture" not in reader.fields:
            raise ValueError("it has no tensors or no general.architecture")
    except UserError:
        raise
    except Exception as err:  # gguf raises ValueError/struct.error/IndexError on bad files
        raise UserError(f"{path} is not a readable GGUF file (truncated or corrupt?): {err}") from None
    return reader


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def architecture(reader) -> str:
    return str(_field(reader, "general.architecture", "?"))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf Q/K row permutation (SPEC §2.2)."""
    out, inp = w.shape
    head_dim = out // n_head
    return w.reshape(n_head, head_dim // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _config_llama(reader) -> dict:
    a = "llama"
    n_embd = int(_field(reader, f"{a}.embedding_length"))
    n_head = int(_field(reader, f"{a}.attention.head_count"))
    vocab = _field(reader, f"{a}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": n_embd,
        "num_hidden_layers": int(_field(reader, f"{a}.block_count")),
        "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, f"{a}.attention.head_count_kv", n_head)),
        "head_dim": int(_field(reader, f"{a}.rope.dimension_count", n_embd // n_head)),
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(vocab),
        "rope_theta": float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{a}.context_length", 4096)),
        "tie_word_embeddings": not has_output,
        "rope_traditional": False,
    }


def _config_gemma3(reader) -> dict:
    a = "gemma3"
    n_head = int(_field(reader, f"{a}.attention.head_count"))
    head_dim = int(_field(reader, f"{a}.attention.key_length", 256))
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": int(_field(reader, f"{a}.embedding_length")),
        "num_hidden_layers": int(_field(reader, f"{a}.block_count")),
        "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_field(reader, f"{a}.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "rope_theta": float(_field(reader, f"{a}.rope.freq_base", 1_000_000.0)),
        # Not in the GGUF metadata; Gemma 3's published values (SPEC §2.2).
        "rope_local_base_freq": 10_000.0,
        "sliding_window": int(_field(reader, f"{a}.attention.sliding_window", 512)),
        "sliding_window_pattern": 6,
        "max_position_embeddings": int(_field(reader, f"{a}.context_length", 32768)),
        "tie_word_embeddings": True,
    }


def _hf_name(arch: str, gguf_name: str) -> str | None:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4:
        names = _LLAMA_NAMES if arch == "llama" else _GEMMA3_NAMES
        target = names.get(parts[2])
        if target:
            return f"model.layers.{parts[1]}.{target}.{parts[3]}"
    return None


def convert_weights(reader, arch: str, config: dict, progress: Callable[[int, int], None] | None = None) -> dict:
    """Dequantize every tensor to float32 numpy and map it to mlx-lm's parameter names."""
    from gguf.quants import dequantize

    weights = {}
    tensors = list(reader.tensors)
    for i, t in enumerate(tensors):
        name = _hf_name(arch, t.name)
        if name is None:
            if t.name.startswith("rope_freqs"):
                continue  # llama3-style rope scaling tables: recomputed by mlx-lm from config
            raise UserError(f"unexpected tensor {t.name!r} in a {arch} GGUF; this file is not supported")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        if arch == "llama" and t.name.endswith("attn_q.weight"):
            w = _unpermute(w, config["num_attention_heads"])
        elif arch == "llama" and t.name.endswith("attn_k.weight"):
            w = _unpermute(w, config["num_key_value_heads"])
        elif arch == "gemma3" and "norm" in t.name.split(".")[-2]:
            w = w - 1.0
        weights[name] = np.ascontiguousarray(w)
        if progress:
            progress(i + 1, len(tensors))
    return weights


# ----------------------------------------------------------------------------- tokenizer


def _bpe_merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece-BPE merges from the vocabulary: every split of a token into two vocabulary
    pieces is a merge, ranked by the merged token's score (higher first), as SentencePiece merges."""
    vocab = {tok: i for i, tok in enumerate(tokens) if types[i] in (_NORMAL, _BYTE, _UNKNOWN)}
    merges = []
    for tok, idx in vocab.items():
        if types[idx] != _NORMAL or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                merges.append((scores[idx], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in merges]


def build_tokenizer(reader) -> tuple["object", dict]:
    """A ``tokenizers.Tokenizer`` and the tokenizer_config dict from GGUF metadata.

    ``gpt2`` models (SmolLM2) -> byte-level BPE from tokens + merges; ``llama`` models (Gemma) ->
    SentencePiece BPE from tokens + scores with byte fallback. Control tokens become special added
    tokens; user-defined ones (Gemma's newline/tab runs, HTML tags) become non-special added tokens
    that are matched whole, as llama.cpp does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type", [_NORMAL] * len(tokens))]
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
    pad_id = _field(reader, "tokenizer.ggml.padding_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama"))
    vocab = {tok: i for i, tok in enumerate(tokens)}

    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        pre = str(_field(reader, "tokenizer.ggml.pre", "default"))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in ("smollm", "starcoder", "refact", "qwen2", "llama3", "llama-bpe"):
            # llama.cpp splits digits one by one for these (llama-vocab.cpp, *_PRE_TYPE_*).
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = [float(s) for s in _field(reader, "tokenizer.ggml.scores")]
        merges = _bpe_merges_from_scores(tokens, scores, types)
        unk = tokens[unk_id] if unk_id is not None else None
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        norms = []
        if _field(reader, "tokenizer.ggml.add_space_prefix", False):
            norms.append(normalizers.Prepend("▁"))
        norms.append(normalizers.Replace(Regex(" "), "▁"))
        tok.normalizer = normalizers.Sequence(norms)
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if _field(reader, "tokenizer.ggml.add_space_prefix", False):
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
    else:
        raise UserError(f"GGUF tokenizer type {kind!r} is not supported (supported: gpt2, llama)")

    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == _CONTROL or (ty == _UNKNOWN and kind == "gpt2"):
            added.append(AddedToken(t, special=True, normalized=False))
        elif ty == _USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
    tok.add_tokens(added)  # ids already exist in the vocab, so these keep their GGUF ids

    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )

    template = _field(reader, "tokenizer.chat_template")
    if template is None and architecture(reader) == "gemma3":
        template = GEMMA_CHAT_TEMPLATE
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos_id] if bos_id is not None else None,
        "eos_token": tokens[eos_id] if eos_id is not None else None,
        "unk_token": tokens[unk_id] if unk_id is not None else None,
        "pad_token": tokens[pad_id] if pad_id is not None else None,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    if template:
        config["chat_template"] = template
    return tok, config


def _eos_ids(reader, tokens: list[str], config: dict) -> list[int]:
    """EOS ids for generation: the GGUF eos plus the chat end-of-turn marker when present."""
    ids = []
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if eos is not None:
        ids.append(int(eos))
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None:
        ids.append(int(eot))
    for marker in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):
        if marker in tokens:
            ids.append(tokens.index(marker))
    return sorted(set(ids))


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """Convert ``gguf_path`` into an HF-layout MLX checkpoint at ``out_dir`` (atomically).

    The directory appears complete or not at all: everything is written into a temporary sibling
    directory first, then renamed.
    """
    import mlx.core as mx

    reader = open_gguf(gguf_path)
    arch = architecture(reader)
    if arch not in SUPPORTED_ARCHS:
        raise UserError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)}; "
            "mistral GGUFs use 'llama')"
        )
    config = _config_llama(reader) if arch == "llama" else _config_gemma3(reader)
    tokenizer, tok_config = build_tokenizer(reader)
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    config["eos_token_id"] = _eos_ids(reader, tokens, tok_config)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)
    config["torch_dtype"] = "float32"
    config["mlxgate_source"] = {"gguf": Path(gguf_path).name, "general.name": str(_field(reader, "general.name", ""))}

    weights = convert_weights(reader, arch, config, progress)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()}, metadata={"format": "mlx"})
        del weights
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": config["eos_token_id"]}, indent=2))
    return out_dir
