"""Tiny random checkpoints in Hugging Face layout, for tests that need an architecture, not weights.

``make_tiny_checkpoint(dir, family)`` writes config.json, model.safetensors, tokenizer.json and
tokenizer_config.json (with the family's chat template) for ``llama`` (ChatML, like SmolLM2),
``mistral`` ([INST] turns, BOS added) or ``gemma3_text`` (Gemma turns, BOS added, sliding window).
The result loads through :func:`mlxgate.models.load` exactly like a download. The tokenizer is
byte-level BPE with no merges (vocabulary = 256 bytes + the family's special tokens), so every
text round-trips and token ids are predictable.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxgate.gguf_import import GEMMA_CHAT_TEMPLATE

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

FAMILIES = ("llama", "mistral", "gemma3_text")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-Instruct v0.2 has no system role; fold it into the first user turn, as Gemma does.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST] ' + (prefix if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else -%}{{ message['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)

_SPECIALS = {
    "llama": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "mistral": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
    "gemma3_text": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (what ByteLevel pre-tokenizers use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _tokenizer(family: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = _SPECIALS[family]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for byte, char in sorted(_bytes_to_unicode().items()):
        vocab[char] = len(specials) + byte
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    names = {
        "llama": dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, template=CHATML_TEMPLATE),
        "mistral": dict(bos="<s>", eos="</s>", pad="</s>", unk="<unk>", template=MISTRAL_TEMPLATE),
        "gemma3_text": dict(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", template=GEMMA_CHAT_TEMPLATE),
    }[family]
    if names["bos"]:
        bos = names["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names["bos"],
        "eos_token": names["eos"],
        "pad_token": names["pad"],
        "unk_token": names["unk"],
        "add_bos_token": names["bos"] is not None,
        "chat_template": names["template"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    eos_ids = sorted({vocab[names["eos"]]} | ({vocab["<end_of_turn>"]} if family == "gemma3_text" else set()))
    return tok, config, len(vocab), eos_ids, (vocab[names["bos"]] if names["bos"] else None)


def tiny_config(family: str, vocab_size: int, n_layers: int = 4, hidden: int = 64) -> dict:
    base = {
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
    }
    if family == "llama":
        return {**base, "model_type": "llama", "rope_theta": 10000.0, "tie_word_embeddings": True}
    if family == "mistral":
        return {**base, "model_type": "mistral", "rope_theta": 1_000_000.0, "tie_word_embeddings": False}
    if family == "gemma3_text":
        return {
            **base,
            "model_type": "gemma3_text",
            "rms_norm_eps": 1e-6,
            "query_pre_attn_scalar": hidden // 4,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            # Small window + pattern so short tests cross the sliding-window boundary.
            "sliding_window": 16,
            "sliding_window_pattern": 2,
        }
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def make_tiny_checkpoint(out_dir: str | Path, family: str = "llama", seed: int = 0, n_layers: int = 4, hidden: int = 64) -> Path:
    """Write a tiny random ``family`` checkpoint in HF layout to ``out_dir`` and return it."""
    from mlx_lm.utils import _get_classes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok, tok_config, vocab_size, eos_ids, bos_id = _tokenizer(family)
    config = tiny_config(family, vocab_size, n_layers=n_layers, hidden=hidden)
    config["eos_token_id"] = eos_ids
    if bos_id is not None:
        config["bos_token_id"] = bos_id
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Random init is N(0, 1/fan_in)-ish already; scale embeddings so logits are not all ~0.
    weights = dict(tree_flatten(model.parameters()))
    if family == "gemma3_text":
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head")}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return out
