"""Steering-vector extraction: mean-difference of the residual stream between two personas (SPEC §5.1).

For each context (a user message) two chat prompts are built, [system: pos persona, user: context]
and [system: neg persona, user: context], each with the generation prompt appended; the residual
stream (output of block L) is read at the last prompt token (the assistant tag), and per layer

    v_L = mean_over_contexts(h_pos) - mean_over_contexts(h_neg)        (float32, not normalised)

Prompts are built by :func:`mlxgate.prompts.chat_ids` (system folded into the user turn where the
template has no system role, e.g. Gemma 3; BOS exactly once). Extraction is batched: prompts are
left-padded and run through the batched KV cache (which masks the padding), so the last prompt token
of every row sits at position -1 of the last prefill call.

Vector file (safetensors): one float32 [d] tensor per layer named ``layer.<L>``; the metadata
(model, layers, personas, N, norms, hidden size, model_type, residual norms) is stored as JSON under
the safetensors metadata key ``mlxgate`` and also written beside it as ``<file>.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from mlxgate.errors import UserError
from mlxgate.generate import prefill
from mlxgate.hooks import capture
from mlxgate.prompts import chat_ids

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

# SPEC §5.1: the default persona pair (care over authority); the vector is pos - neg.
DEFAULT_POS = "You are someone who looks after others' wellbeing even when it means defying authority."
DEFAULT_NEG = "You are someone who defers to authority even when others' wellbeing suffers for it."
# SPEC §5.1: number of contexts in the paper setting.
DEFAULT_N_CONTEXTS = 256
EXTRACT_BATCH = 16  # prompts per forward pass (both personas of 8 contexts)
METADATA_KEY = "mlxgate"
FORMAT = "mlxgate.steering_vector/1"


def default_layers(n_layers: int) -> list[int]:
    """SPEC §5.1 middle band: [int(0.45 n), max(int(0.55 n), int(0.45 n) + 1)) -> 15,16,17 for n = 34."""
    lo = int(0.45 * n_layers)
    hi = max(int(0.55 * n_layers), lo + 1)
    return list(range(lo, min(hi, n_layers)))


def parse_layers(text: str | None, n_layers: int) -> list[int]:
    """``"a,b,c"`` (or ``"a-b"`` inclusive ranges mixed in) -> sorted unique layer ids; None -> default band."""
    if text is None or not str(text).strip():
        return default_layers(n_layers)
    out: set[int] = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.update(range(int(a), int(b) + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise UserError(f"--layers must be comma-separated layer numbers like 13,14,15; got {text!r}") from None
    bad = [i for i in sorted(out) if not 0 <= i < n_layers]
    if bad or not out:
        raise UserError(f"--layers {text!r}: layers must be in 0..{n_layers - 1} for this {n_layers}-layer model")
    return sorted(out)


def default_contexts() -> list[str]:
    """The shipped contexts (mlxgate/data/contexts.txt): varied user messages, one per line."""
    text = resources.files("mlxgate").joinpath("data/contexts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_contexts(path: str | Path | None, n: int | None = None) -> list[str]:
    """Contexts from a .txt (one per line) or .jsonl (``prompt`` field) file, or the shipped default.

    With ``n`` smaller than the file, ``n`` contexts evenly spread over it (the shipped file is
    grouped by kind, so its first lines would all be everyday requests).
    """
    if path is None:
        contexts = default_contexts()
    else:
        from mlxgate.measure import load_prompts_file

        contexts = [c.strip() for c in load_prompts_file(path)]
    if n is not None:
        if n < 1:
            raise UserError("--n must be at least 1")
        if n < len(contexts):
            contexts = [contexts[i * len(contexts) // n] for i in range(n)]
    return contexts


def persona_ids(tokenizer, persona: str, context: str) -> list[int]:
    """Chat ids of [system: persona, user: context] with the generation prompt (SPEC §5.1)."""
    return chat_ids(tokenizer, [{"role": "system", "content": persona}, {"role": "user", "content": context}])


def last_token_states(model: nn.Module, prompts: list[list[int]], layers: list[int], batch_size: int = EXTRACT_BATCH) -> dict[int, np.ndarray]:
    """Residual stream (output of block L) at the last token of each prompt: {L: [N, d] float32}.

    Batched over left-padded prompts through the masked batched KV cache; the last prefill call
    processes only the last column, so its captured block outputs are [B, 1, d] at the last token.
    Under ``mlx.launch`` each rank runs whole batches (the ones a single process forms, so the
    states are the same bits) and every rank gets every row, in order.
    """
    from mlxgate import distributed
    from mlxgate.batches import rank_batches

    mine, rows = [], []
    for _, idx in rank_batches(len(prompts), batch_size):
        with capture(model, layers) as got:
            prefill(model, [prompts[i] for i in idx])
            last = {L: got[L][-1][:, -1, :].astype(mx.float32) for L in layers}
            mx.eval(last)
        batch = {L: np.array(last[L]) for L in layers}
        rows += [{L: batch[L][j] for L in layers} for j in range(len(idx))]
        mine += idx
    rows = distributed.gather_ordered(rows, mine, all_ranks=True, what="gathering hidden states")
    return {L: np.stack([r[L] for r in rows]) for L in layers}


@dataclass
class SteeringVector:
    """Per-layer vectors ``{L: [d] float32}`` and what they were extracted from."""

    vectors: dict[int, np.ndarray]
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def as_mx(self) -> dict[int, mx.array]:
        return {L: mx.array(v.astype(np.float32)) for L, v in self.vectors.items()}

    def norms(self) -> dict[int, float]:
        return {L: float(np.linalg.norm(v.astype(np.float64))) for L, v in self.vectors.items()}


def extract(
    model: nn.Module,
    tokenizer,
    contexts: list[str],
    layers: list[int],
    pos: str = DEFAULT_POS,
    neg: str = DEFAULT_NEG,
    batch_size: int = EXTRACT_BATCH,
    info=None,
) -> SteeringVector:
    """Mean-difference steering vector v_L = mean(h_pos) - mean(h_neg) at the last prompt token.

    ``contexts``: N user messages; ``layers``: block indices. Returns float32 [d] vectors plus
    metadata: norms ||v_L||, the mean residual norm at the last prompt token per layer
    (``resid_norm``, over both personas, the scale a dose is relative to; see
    :mod:`mlxgate.steer.control`) and the cosine between consecutive layers' vectors.
    """
    if not contexts:
        raise UserError("no contexts to extract a steering vector from")
    if not pos.strip() or not neg.strip():
        raise UserError("--pos and --neg persona texts must not be empty")
    if pos.strip() == neg.strip():
        raise UserError("--pos and --neg are the same text; the vector would be zero")
    ids = []
    for c in contexts:
        ids.append(persona_ids(tokenizer, pos, c))
        ids.append(persona_ids(tokenizer, neg, c))
    states = last_token_states(model, ids, layers, batch_size)
    vectors, resid = {}, {}
    for L in layers:
        h = states[L].astype(np.float64)  # [2N, d], rows alternate pos, neg
        vectors[L] = (h[0::2].mean(axis=0) - h[1::2].mean(axis=0)).astype(np.float32)
        resid[L] = float(np.linalg.norm(h, axis=1).mean())
    sv = SteeringVector(vectors)
    norms = sv.norms()
    meta = {
        "format": FORMAT,
        "layers": list(layers),
        "pos": pos,
        "neg": neg,
        "n_contexts": len(contexts),
        "norms": {str(L): norms[L] for L in layers},
        "resid_norm": {str(L): resid[L] for L in layers},
        "rel_norm": {str(L): norms[L] / resid[L] if resid[L] > 0 else None for L in layers},
        "prompt_tokens_mean": float(np.mean([len(i) for i in ids])),
    }
    if info is not None:
        meta.update(
            model=info.name,
            model_path=info.path,
            model_type=info.model_type,
            n_layers=info.n_layers,
            hidden_size=info.hidden_size,
            vocab_size=info.vocab_size,
            dtype=info.dtype,
        )
    else:
        meta.update(n_layers=len(model.layers), hidden_size=int(next(iter(vectors.values())).shape[0]))
    sv.meta = meta
    return sv


def save(sv: SteeringVector, path: str | Path) -> Path:
    """Write ``path`` (.safetensors, metadata inside) and ``path + '.json'`` (the same metadata), atomically."""
    from mlxgate.io import atomic_path, write_json

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors; got {path}")
    arrays = {f"layer.{L}": mx.array(v.astype(np.float32)) for L, v in sv.vectors.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata={METADATA_KEY: json.dumps(sv.meta)})
    write_json(str(path) + ".json", sv.meta)
    return path


def load(path: str | Path) -> SteeringVector:
    """Read a vector file written by :func:`save`; a missing or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"steering vector file not found: {path}")
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as err:  # mlx raises ValueError/RuntimeError on a non-safetensors file
        raise UserError(f"{path} is not a safetensors steering vector file ({str(err).splitlines()[0]})") from None
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise UserError(f"{path} has no mlxgate steering metadata; make it with `mlxgate steer extract`") from None
    vectors = {}
    for key, arr in arrays.items():
        if not key.startswith("layer.") or not key[6:].isdigit() or arr.ndim != 1:
            raise UserError(f"{path}: unexpected tensor {key!r} {tuple(arr.shape)}; expected layer.<L> vectors [d]")
        vectors[int(key[6:])] = np.array(arr.astype(mx.float32))
    if not vectors:
        raise UserError(f"{path} holds no layer vectors")
    dims = {v.shape[0] for v in vectors.values()}
    if len(dims) != 1 or not all(np.isfinite(v).all() for v in vectors.values()):
        raise UserError(f"{path}: layer vectors have mixed sizes or non-finite values")
    return SteeringVector(vectors, meta)


def check_compatible(sv: SteeringVector, info, allow_other_model: bool = False) -> None:
    """Raise UserError unless ``sv`` fits the loaded model: same hidden size, layers in range, same
    model_type and vocabulary, and (unless ``allow_other_model``) the same model name or path."""
    d = next(iter(sv.vectors.values())).shape[0]
    if d != info.hidden_size:
        raise UserError(
            f"the steering vector has hidden size {d} but {info.name} has {info.hidden_size}; extract a vector for this model"
        )
    bad = [L for L in sv.layers if L >= info.n_layers]
    if bad:
        raise UserError(f"the steering vector is for layers {bad} but {info.name} has only {info.n_layers} layers")
    m = sv.meta
    for key in ("model_type", "vocab_size", "n_layers"):
        if m.get(key) is not None and m[key] != getattr(info, key):
            raise UserError(
                f"the steering vector was extracted from a {key}={m[key]} model ({m.get('model')}), not {key}={getattr(info, key)} ({info.name}); extract a vector for this model"
            )
    if not allow_other_model and m.get("model") is not None:
        same = m.get("model") == info.name or (m.get("model_path") and Path(m["model_path"]).resolve() == Path(info.path).resolve())
        if not same:
            raise UserError(
                f"the steering vector was extracted from {m.get('model')}, not {info.name}; extract one for this model or pass --allow-other-model"
            )


def summary(sv: SteeringVector) -> dict:
    """Norms per layer and the cosine between adjacent layers' vectors (a sanity check: a
    contrast read at neighbouring blocks should point the same way, cos >> 0)."""
    layers = sv.layers
    cos = {}
    for a, b in zip(layers, layers[1:]):
        va, vb = sv.vectors[a].astype(np.float64), sv.vectors[b].astype(np.float64)
        den = np.linalg.norm(va) * np.linalg.norm(vb)
        cos[f"{a}-{b}"] = float(va @ vb / den) if den > 0 else math.nan
    return {"layers": layers, "norms": sv.norms(), "adjacent_cos": cos, **{k: sv.meta.get(k) for k in ("resid_norm", "rel_norm")}}


__all__ = [
    "DEFAULT_POS",
    "DEFAULT_NEG",
    "SteeringVector",
    "check_compatible",
    "default_contexts",
    "default_layers",
    "extract",
    "last_token_states",
    "load",
    "load_contexts",
    "parse_layers",
    "persona_ids",
    "save",
    "summary",
]
