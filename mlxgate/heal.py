"""Heal: a fresh LoRA round trained on kept completions under a KL barrier (SPEC §5.4, §5.8, §7).

    loss = SFT                                   token-mean NLL over the micro-batch's completion tokens
         + λ_r · relu(agg_{t∈S} KL_t − τ)        hinge on the aggregate KL, S = completion positions pooled
         + 0.01 · mean_modules σ_max(ΔW)          spectral term, 3 power-iteration steps
         [− λ_H · H]                              objective sft-entropy (IRIS Gate's CE − λH)

KL_t = KL(student_t ‖ reference_t) (``kl="rev"``; ``"fwd"`` swaps them). The reference is the same
frozen weights with this round's adapter off (``ref="prev"``) or every round off (``ref="base"``),
run under ``mx.stop_gradient``: earlier rounds live in a :mod:`mlxgate.lora` stack, never in a
second copy of the weights. Prompt and padding positions are masked out of every term (SPEC §7).

``heal(model, tokenizer, examples, HealConfig(...), prev_adapters=[dirs])`` trains in place and
returns a :class:`HealResult`; ``save_adapter`` writes the round in mlx-lm's adapter format.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from mlxgate import distributed as D  # noqa: E402
from mlxgate import lora, ops  # noqa: E402
from mlxgate.analysis.kl_stats import KL_AGGS, RMSE_EPS, aggregate_kl, kl_aggregates  # noqa: E402
from mlxgate.analysis.spectral import power_iteration_sigma_max  # noqa: E402
from mlxgate.errors import UserError  # noqa: E402
from mlxgate.io import atomic_dir  # noqa: E402

# SPEC §5.4 (defaults; every one is a HealConfig field and recorded with the adapter).
LAM, LAM_POW, TAU, AGG, REF, KL_DIR = 0.3, 0.0, 0.5, "rmse", "prev", "rev"
SPECTRAL_LAM, POWER_STEPS = 0.01, 3
LR, BETAS, WARMUP_FRAC, GRAD_CLIP, EPOCHS = 1e-4, (0.9, 0.95), 0.1, 1.0, 6
RANK, ALPHA = 32, 64.0
VAL_FRAC = 1 / 8
REFS, KL_DIRS, OBJECTIVES = ("prev", "base"), ("rev", "fwd"), ("sft", "sft-entropy")
HEAL_RECORD = "heal.json"


@dataclass
class HealConfig:
    """Every heal setting (SPEC §5.4 defaults). ``scale`` = alpha / rank (mlx-lm's LoRALinear
    multiplies by it directly). λ_r = lam · (1 + round)^lam_pow; ``round`` None = the number of
    earlier adapters passed to :func:`heal`."""

    lam: float = LAM
    lam_pow: float = LAM_POW
    round: int | None = None
    tau: float = TAU  # nats
    agg: str = AGG
    ref: str = REF
    kl: str = KL_DIR
    objective: str = "sft"
    entropy_lam: float = 0.0
    spectral_lam: float = SPECTRAL_LAM
    power_steps: int = POWER_STEPS
    lr: float = LR
    betas: tuple[float, float] = BETAS
    # SPEC is silent; PyTorch's AdamW default (the original's optimizer), bias correction on.
    weight_decay: float = 0.01
    warmup_frac: float = WARMUP_FRAC
    grad_clip: float = GRAD_CLIP
    epochs: int = EPOCHS
    rank: int = RANK
    alpha: float = ALPHA
    batch_size: int = 4  # micro-batch (SPEC: 1-4)
    grad_accum: int = 1  # micro-batches per optimizer step
    val_frac: float = VAL_FRAC
    max_seq_len: int = 2048  # tokens per example (prompt + completion); longer ones are dropped
    seed: int = 0
    compile: bool = True  # mx.compile the step: fuses the vocabulary-sized intermediates (3x less memory)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def lam_r(self, r: int) -> float:
        return self.lam * (1 + r) ** self.lam_pow

    def validate(self) -> None:
        checks = [
            (self.agg in KL_AGGS, f"--agg must be one of {', '.join(KL_AGGS)}"),
            (self.ref in REFS, f"--ref must be one of {', '.join(REFS)}"),
            (self.kl in KL_DIRS, f"--kl must be one of {', '.join(KL_DIRS)}"),
            (self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}"),
            (self.lam >= 0 and self.tau >= 0 and self.spectral_lam >= 0, "--lam, --tau and the spectral weight must be >= 0"),
            (self.lr > 0 and self.epochs >= 1, "--lr must be > 0 and --epochs >= 1"),
            (self.rank >= 1 and self.alpha > 0, "--rank must be >= 1 and --alpha > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
            (0.0 <= self.val_frac < 1.0, "the validation fraction must be in [0, 1)"),
            (self.max_seq_len >= 2, "--max-seq-len must be >= 2"),
            (math.isfinite(self.entropy_lam), "--entropy-lam must be finite"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)


@dataclass
class Example:
    """One training sequence: chat-templated prompt ids, then completion ids (EOS included)."""

    prompt_ids: list[int]
    completion_ids: list[int]


@dataclass
class HealResult:
    """``weights``: this round's {path.lora_a|lora_b: array}; ``history``: one dict per micro-step;
    ``val``: one dict per epoch; ``summary``: totals (hinge-active fraction, tokens/s, ...)."""

    weights: dict[str, mx.array]
    n_layers: int
    config: HealConfig
    history: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    adapter_dir: Path | None = None


# ----------------------------------------------------------------------------- data


def read_records(path: str | Path) -> list[dict]:
    """Lines of a kept.jsonl: {"prompt", "completion"[, "prompt_ids", "completion_ids", "finish",
    "kept"]}. Lines with "kept": false are skipped. Raises UserError on unreadable/malformed data."""
    from mlxgate.io import read_jsonl

    records = []
    for no, rec in read_jsonl(path, "data file"):
        has_text = isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str)
        has_ids = _is_ids(rec.get("prompt_ids")) and _is_ids(rec.get("completion_ids"))
        if not has_text and not has_ids:
            raise UserError(f"{path}:{no}: needs string fields 'prompt' and 'completion' (or integer lists 'prompt_ids' and 'completion_ids')")
        if rec.get("kept", True) is False:
            continue
        records.append(rec)
    if not records:
        raise UserError(f"{path} has no examples (empty, or every line has \"kept\": false)")
    return records


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def turn_end_id(tokenizer) -> int:
    """The EOS id that closes an assistant turn in this chat template (e.g. <end_of_turn> for
    Gemma, <|im_end|> for ChatML); the tokenizer's eos_token_id if the template shows none."""
    eos = set(getattr(tokenizer, "eos_token_ids", None) or []) or {tokenizer.eos_token_id}
    if len(eos) > 1 and getattr(tokenizer, "chat_template", None) is not None:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False
            )
            seen = [t for t in tokenizer.encode(text, add_special_tokens=False) if t in eos]
            if seen:
                return int(seen[-1])
        except Exception:  # a template that cannot render a 2-turn chat: fall back
            pass
    return int(tokenizer.eos_token_id)


def make_examples(tokenizer, records: Iterable[dict], max_seq_len: int = 2048) -> tuple[list[Example], dict]:
    """Tokenize records. Prompt ids: ``prompt_ids`` or the chat template (mlxgate.prompts); completion
    ids: ``completion_ids`` or encode(completion, add_special_tokens=False), plus the turn-closing
    EOS unless the record says "finish": "length" (a cut-off completion has no end to learn) or
    already ends with an EOS. Drops empty completions and sequences over ``max_seq_len``.
    Returns (examples, {reason: count} of drops)."""
    from mlxgate.prompts import prompt_ids as build_prompt

    eos_ids = set(getattr(tokenizer, "eos_token_ids", None) or []) | {tokenizer.eos_token_id}
    end = turn_end_id(tokenizer)
    examples, dropped = [], {"empty_completion": 0, "too_long": 0}
    for rec in records:
        p = list(rec["prompt_ids"]) if _is_ids(rec.get("prompt_ids")) else build_prompt(tokenizer, rec["prompt"])
        if _is_ids(rec.get("completion_ids")):
            c = list(rec["completion_ids"])
        else:
            c = list(tokenizer.encode(rec["completion"], add_special_tokens=False))
        if not c or all(t in eos_ids for t in c):
            dropped["empty_completion"] += 1
            continue
        if rec.get("finish") != "length" and c[-1] not in eos_ids:
            c.append(end)
        if len(p) + len(c) > max_seq_len or not p:
            dropped["too_long" if p else "empty_completion"] += 1
            continue
        examples.append(Example(p, c))
    return examples, dropped


def split_val(examples: list[Example], val_frac: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded shuffle, then floor(n · val_frac) held out (SPEC §5.4: 1/8); at least one training
    example always remains."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = _n_val(len(examples), val_frac)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def _n_val(n_examples: int, val_frac: float) -> int:
    return min(int(n_examples * val_frac), n_examples - 1)


def total_steps(n_examples: int, cfg: "HealConfig") -> int:
    """Micro-steps (``on_step`` calls) a heal of ``n_examples`` runs: epochs x micro-batches of
    the training split (what progress bars count to)."""
    return cfg.epochs * math.ceil((n_examples - _n_val(n_examples, cfg.val_frac)) / cfg.batch_size)


def bucket(n: int, minimum: int = 16) -> int:
    """``n`` rounded up to a coarse grid (steps of a quarter to an eighth of the size: 16, 32, ...,
    128, 160, 192, ...): a compiled step is traced once per distinct shape, so shapes are kept to a
    few at <= 25% padding."""
    step = max(minimum, 1 << max(int(math.log2(max(n, 1))) - 2, 0))
    return step * max(1, math.ceil(n / step))


def collate(batch: list[Example]) -> tuple[mx.array, mx.array]:
    """Right-padded ids [B, L] int32 and the target mask [B, L-1] float32.

    mask[b, j] = 1 iff target ids[b, j+1] is a completion token: prompt targets and padding are 0,
    so they contribute nothing to SFT, KL, entropy or the token count (SPEC §7). L - 1 is rounded
    up by :func:`bucket`.
    """
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in batch]
    L = 1 + bucket(max(lengths) - 1)
    ids = np.zeros((len(batch), L), np.int32)
    mask = np.zeros((len(batch), L - 1), np.float32)
    for b, e in enumerate(batch):
        seq = e.prompt_ids + e.completion_ids
        ids[b, : len(seq)] = seq
        mask[b, len(e.prompt_ids) - 1 : len(seq) - 1] = 1.0
    return mx.array(ids), mx.array(mask)


def select(mask: mx.array, n: int | None = None) -> tuple[mx.array, mx.array]:
    """Flat indices ``sel`` [N] int32 of the completion targets (mask > 0) of a [B, T] mask, and
    weights ``w`` [N] float32 (1 for them). N is rounded up by :func:`bucket` (padding entries:
    index 0, weight 0), or is ``n`` when given (>= the count; data-parallel ranks pad to a common
    N). The vocabulary-sized work (log-softmax, KL, entropy) then runs only on these rows, never
    on prompt or padding rows."""
    flat = np.flatnonzero(np.array(mask).reshape(-1) > 0).astype(np.int32)
    n = bucket(flat.size) if n is None else n
    sel = np.zeros(n, np.int32)
    sel[: flat.size] = flat
    w = np.zeros(n, np.float32)
    w[: flat.size] = 1.0
    return mx.array(sel), mx.array(w)


def micro_batches(examples: list[Example], batch_size: int, rng: random.Random | None) -> list[list[Example]]:
    """Length-grouped micro-batches (sorted by length, so little padding), in shuffled order
    (``rng`` None keeps them sorted, for evaluation)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids) + len(examples[i].completion_ids))
    groups = [[examples[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(groups)
    return groups


# ----------------------------------------------------------------------------- loss


def kl_per_position(logits: mx.array, ref_logits: mx.array, direction: str = KL_DIR) -> mx.array:
    """KL_t [...] float32 nats: KL(student_t ‖ reference_t) for ``rev``, KL(reference_t ‖ student_t)
    for ``fwd``. logits [..., V]."""
    return ops.kl(logits, ref_logits) if direction == "rev" else ops.kl(ref_logits, logits)


def barrier_term(kl_t: mx.array, w: mx.array, agg: str, tau: float, lam_r: float) -> tuple[mx.array, mx.array]:
    """(λ_r · relu(agg_{t∈S} KL_t − τ), agg_{t∈S} KL_t): one hinge on the aggregate over the pooled
    completion positions S (w > 0), not a hinge per position (SPEC §5.4, §5.8)."""
    kl_agg = aggregate_kl(kl_t, agg, w > 0)
    return lam_r * mx.maximum(kl_agg - tau, 0.0), kl_agg


def _global(local: mx.array, total: mx.array) -> mx.array:
    """``total``'s value with ``local``'s gradient: each rank differentiates only its own share of
    a cross-rank sum, so summing the ranks' gradients gives the gradient of the global value."""
    return total + (local - mx.stop_gradient(local))


def global_barrier_stats(kl_t: mx.array, w: mx.array, agg: str, n_ranks: int, rank: int, n_tot: mx.array, sums: mx.array) -> tuple[mx.array, mx.array]:
    """(agg_{t∈S} KL_t, mean KL) over the completion positions S of every rank's rows (one global
    micro-batch), as in a single process holding them all. ``kl_t``/``w`` [N] this rank's
    positions (N equal on every rank), ``n_tot`` the global |S|, ``sums`` [2] this rank's
    (Σ KL_t, Σ KL_t²) over S. mean/rmse all_sum the sums; p95/max all_gather every rank's KL
    values (padding masked by w) and aggregate the pooled vector. Gradients reach only this rank's
    positions (see :func:`_global`)."""
    total = _global(sums, mx.distributed.all_sum(mx.stop_gradient(sums)))
    kl_mean = mx.stop_gradient(total[0]) / n_tot
    if agg == "mean":
        return total[0] / n_tot, kl_mean
    if agg == "rmse":
        return mx.sqrt(total[1] / n_tot + RMSE_EPS), kl_mean
    pooled = mx.distributed.all_gather(mx.stop_gradient(kl_t)[None]).reshape(n_ranks, -1)
    pooled = mx.where((mx.arange(n_ranks) == rank)[:, None], kl_t[None], pooled)
    masks = mx.distributed.all_gather(w[None]).reshape(-1) > 0
    return aggregate_kl(pooled.reshape(-1), agg, masks), kl_mean


def make_loss(switch: lora.LoRASwitch, layers: list[lora.StackedLoRALinear], cfg: HealConfig, lam_r: float, n_ranks: int = 1, rank: int = 0) -> Callable:
    """The heal loss ``loss(model, inputs [B,T], targets [B,T], sel [N], w [N]) -> (loss, sft,
    kl_agg, kl_mean, barrier, spectral, entropy)``, float32 scalars in nats.

    Data-parallel (``n_ranks`` > 1): the loss takes a 6th input ``n_tot``, the global number of
    completion positions of the global micro-batch whose rows this rank holds. Every rank then
    returns the global values (SFT over all ranks' tokens, the barrier on the pooled KL
    aggregate), and the ranks' gradients sum to the single-process gradient of that batch: each
    rank differentiates only its own positions, the spectral term is scaled by 1/n_ranks.

    ``sel``/``w`` from :func:`select`: the flat positions of the completion targets. Prompt and
    padding targets are not selected, so they enter no term (SPEC §7). ``entropy`` is the mean H_t
    over the completion positions, NaN unless the objective is sft-entropy.
    """
    ref_prev = cfg.ref == "prev"

    if n_ranks > 1:
        return _make_dp_loss(switch, layers, cfg, lam_r, n_ranks, rank)

    def loss(model, inputs, targets, sel, w):
        with lora.lora_mode(switch, current=False, prev=ref_prev):
            ref_logits = mx.stop_gradient(model(inputs))
        logits = model(inputs)
        V = logits.shape[-1]
        logits, ref_logits = logits.reshape(-1, V)[sel], ref_logits.reshape(-1, V)[sel]  # [N, V]
        targets = targets.reshape(-1)[sel]
        n = mx.maximum(w.sum(), 1.0)

        entropy = mx.array(float("nan"))  # only computed when the objective uses it
        if cfg.objective == "sft-entropy":
            stats = ops.entropy_stats(logits, targets)  # float32, from log-softmax: no 0·log 0
            logprob, entropy = stats["target_logprob"], (stats["entropy"] * w).sum() / n
        else:
            logprob = ops.target_logprob(logits, targets)
        sft = -(logprob * w).sum() / n
        kl_t = kl_per_position(logits, ref_logits, cfg.kl)
        barrier, kl_agg = barrier_term(kl_t, w, cfg.agg, cfg.tau, lam_r)
        sigma = mx.stack([power_iteration_sigma_max(m.lora_a, m.lora_b, m.scale, cfg.power_steps) for m in layers])
        spectral = cfg.spectral_lam * sigma.mean()
        total = sft + barrier + spectral
        if cfg.objective == "sft-entropy":
            total = total - cfg.entropy_lam * entropy

        kl_mean = mx.stop_gradient((kl_t * w).sum() / n)
        return total, sft, kl_agg, kl_mean, barrier, spectral, entropy

    return loss


def _make_dp_loss(switch, layers, cfg: HealConfig, lam_r: float, n_ranks: int, rank: int) -> Callable:
    ref_prev = cfg.ref == "prev"

    def loss(model, inputs, targets, sel, w, n_tot):
        with lora.lora_mode(switch, current=False, prev=ref_prev):
            ref_logits = mx.stop_gradient(model(inputs))
        logits = model(inputs)
        V = logits.shape[-1]
        logits, ref_logits = logits.reshape(-1, V)[sel], ref_logits.reshape(-1, V)[sel]
        targets = targets.reshape(-1)[sel]
        n_tot = mx.maximum(n_tot, 1.0)
        if cfg.objective == "sft-entropy":
            stats = ops.entropy_stats(logits, targets)
            logprob, ent_sum = stats["target_logprob"], (stats["entropy"] * w).sum()
        else:
            logprob, ent_sum = ops.target_logprob(logits, targets), mx.array(0.0)
        kl_t = kl_per_position(logits, ref_logits, cfg.kl)
        local = mx.stack([-(logprob * w).sum(), ent_sum])
        total = _global(local, mx.distributed.all_sum(mx.stop_gradient(local)))
        sft = total[0] / n_tot
        entropy = total[1] / n_tot if cfg.objective == "sft-entropy" else mx.array(float("nan"))
        sums = mx.stack([(kl_t * w).sum(), (kl_t * kl_t * w).sum()])
        kl_agg, kl_mean = global_barrier_stats(kl_t, w, cfg.agg, n_ranks, rank, n_tot, sums)
        barrier = lam_r * mx.maximum(kl_agg - cfg.tau, 0.0)
        sigma = mx.stack([power_iteration_sigma_max(m.lora_a, m.lora_b, m.scale, cfg.power_steps) for m in layers])
        spectral = cfg.spectral_lam * sigma.mean()
        # Every rank computes the same spectral term; its gradient must be counted once in the sum.
        spectral_g = mx.stop_gradient(spectral) + (spectral - mx.stop_gradient(spectral)) / n_ranks
        total_loss = sft + barrier + spectral_g
        if cfg.objective == "sft-entropy":
            total_loss = total_loss - cfg.entropy_lam * entropy
        return total_loss, sft, kl_agg, kl_mean, barrier, spectral, entropy

    return loss


def dp_batch(group: list[Example], n_ranks: int, rank: int) -> tuple[mx.array, mx.array, mx.array, mx.array, int]:
    """This rank's share of one global micro-batch: (ids, sel, w, n_tot, n_pad). Rows are split
    in contiguous blocks (:func:`mlxgate.distributed.shard`); a rank left without rows (a short
    last batch) runs one row with every weight 0, so it contributes nothing but still joins the
    collectives. ``n_pad``: the common selected-position count (the largest rank's bucket)."""
    counts = [sum(len(e.completion_ids) for e in D.shard(group, n_ranks, r)[1]) for r in range(n_ranks)]
    n_pad = max(bucket(c) for c in counts)
    rows = D.shard(group, n_ranks, rank)[1]
    ids, mask = collate(rows or group[:1])
    if not rows:
        mask = mx.zeros_like(mask)
    sel, w = select(mask, n_pad)
    return ids, sel, w, mx.array(float(sum(counts))), n_pad


# ----------------------------------------------------------------------------- train


def _schedule(cfg: HealConfig, total_steps: int):
    """Linear warmup 0 -> lr over 10% of the optimizer steps, then cosine to 0 (SPEC §5.4)."""
    warmup = max(1, round(cfg.warmup_frac * total_steps)) if cfg.warmup_frac > 0 else 0
    cosine = optim.cosine_decay(cfg.lr, max(total_steps - warmup, 1), 0.0)
    if warmup == 0:
        return cosine
    return optim.join_schedules([optim.linear_schedule(0.0, cfg.lr, warmup), cosine], [warmup])


def heal(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    config: HealConfig = HealConfig(),
    prev_adapters: Iterable[str | Path] = (),
    on_step: Callable[[dict], None] | None = None,
    out: str | Path | None = None,
) -> HealResult:
    """Train one heal round on ``examples`` (in place: ``model`` gets a LoRA stack) and return it.

    ``prev_adapters``: adapter directories of earlier rounds (or their factors as read by
    :func:`mlxgate.lora.read_adapter`), oldest first, kept frozen in the stack. ``on_step(record)`` is called after every micro-step with that step's metrics.
    ``out``: if given, the adapter is written there atomically (see :func:`save_adapter`).
    """
    cfg = config
    cfg.validate()
    if not examples:
        raise UserError("no training examples (all completions were dropped)")
    prev_adapters = list(prev_adapters)
    # Directories are read here; already-read rounds ({path: LoRAFactors}, e.g. the loop's ranks
    # that do not hold the run directory) pass through.
    prev = [p if isinstance(p, dict) else lora.read_adapter(p)[1] for p in prev_adapters]
    r = cfg.round if cfg.round is not None else len(prev)
    lam_r = cfg.lam_r(r)

    switch = lora.attach(model, cfg.rank, cfg.scale, prev, seed=cfg.seed)
    _check_prev_used(model, prev, [f"#{i + 1}" if isinstance(a, dict) else a for i, a in enumerate(prev_adapters)])
    layers = [m for _, m in lora.stacked_layers(model)]
    n_layers = len(model.layers)
    train, val = split_val(examples, cfg.val_frac, cfg.seed)

    rng = random.Random(cfg.seed)
    per_epoch = len(micro_batches(train, cfg.batch_size, None))
    opt_steps = cfg.epochs * math.ceil(per_epoch / cfg.grad_accum)
    optimizer = optim.AdamW(_schedule(cfg, opt_steps), betas=list(cfg.betas), weight_decay=cfg.weight_decay, bias_correction=True)
    # Data parallel under mlx.launch: every rank builds the same global micro-batches (same seed)
    # and trains on its rows of each; the gradients are summed over ranks before the update.
    n_ranks, rank = D.size(), D.rank()
    loss_and_grad = nn.value_and_grad(model, make_loss(switch, layers, cfg, lam_r, n_ranks, rank))

    def micro_step(ids, sel, w, acc):
        (loss, *parts), grads = loss_and_grad(model, ids[:, :-1], ids[:, 1:], sel, w)
        acc = grads if acc is None else tree_map(mx.add, acc, grads)
        return (loss, *parts), acc

    def dp_micro_step(ids, sel, w, n_tot, acc):
        (loss, *parts), grads = loss_and_grad(model, ids[:, :-1], ids[:, 1:], sel, w, n_tot)
        acc = grads if acc is None else tree_map(mx.add, acc, grads)
        return (loss, *parts), acc

    def update(acc, k):
        grads = tree_map(lambda g: g / k, acc)
        grads, grad_norm = optim.clip_grad_norm(grads, cfg.grad_clip)
        optimizer.update(model, grads)
        return grad_norm

    state = [model.state, optimizer.state]
    if cfg.compile:
        micro_step = mx.compile(micro_step, inputs=state, outputs=state)
        dp_micro_step = mx.compile(dp_micro_step, inputs=state, outputs=state)
        update = mx.compile(update, inputs=state, outputs=state)

    model.train()
    history, val_hist = [], []
    train_time, tokens, step, opt_step, comm_time = 0.0, 0, 0, 0, 0.0
    mx.reset_peak_memory()
    for epoch in range(cfg.epochs):
        groups = micro_batches(train, cfg.batch_size, rng)
        acc, k = None, 0
        for i, batch in enumerate(groups):
            tic = time.perf_counter()
            if n_ranks == 1:
                ids, mask = collate(batch)
                sel, w = select(mask)
                (loss, sft, kl_agg, kl_mean, barrier, spectral, entropy), acc = micro_step(ids, sel, w, acc)
            else:
                ids, sel, w, n_tot, _ = dp_batch(batch, n_ranks, rank)
                (loss, sft, kl_agg, kl_mean, barrier, spectral, entropy), acc = dp_micro_step(ids, sel, w, n_tot, acc)
            ntok = sum(len(e.completion_ids) for e in batch)  # the global micro-batch's tokens
            k += 1
            grad_norm = None
            if k == cfg.grad_accum or i == len(groups) - 1:
                if n_ranks > 1:
                    with D.guard(f"heal step {step + 1}"):
                        mx.eval(loss, acc)
                        t_comm = time.perf_counter()
                        acc = D.all_sum_tree(acc)
                        mx.eval(acc)
                    comm_time += time.perf_counter() - t_comm
                grad_norm = update(acc, mx.array(float(k)))
                acc, k = None, 0
                opt_step += 1
            with D.guard(f"heal step {step + 1}"):
                mx.eval(loss, sft, kl_agg, kl_mean, barrier, spectral, entropy, acc, grad_norm, state)
            dt = time.perf_counter() - tic
            train_time += dt
            tokens += ntok
            step += 1
            rec = {
                "epoch": epoch, "step": step, "opt_step": opt_step,
                "loss": loss.item(), "sft": sft.item(), "kl_agg": kl_agg.item(), "kl_mean": kl_mean.item(),
                "barrier": barrier.item(), "hinge_active": bool(kl_agg.item() > cfg.tau),
                "spectral": spectral.item(), "entropy": None if cfg.objective == "sft" else entropy.item(),
                "grad_norm": None if grad_norm is None else grad_norm.item(),
                "lr": float(optimizer.learning_rate.item()), "tokens": ntok, "tok_s": ntok / dt, "elapsed_s": train_time,
            }
            for key in ("loss", "sft", "kl_agg", "entropy"):
                if rec[key] is not None and not math.isfinite(rec[key]):
                    raise UserError(f"heal diverged: {key} became {rec[key]} at step {step}; try a lower --lr")
            history.append(rec)
            if on_step is not None:
                on_step(rec)
        if val:
            with D.guard("validation"):
                val_hist.append({"epoch": epoch, **evaluate(model, switch, val, cfg)})
    model.eval()

    active = [h["hinge_active"] for h in history]
    summary = {
        "round": r, "lam_r": lam_r, "steps": step, "optimizer_steps": opt_step,
        "n_train": len(train), "n_val": len(val), "train_tokens": tokens,
        "tok_s": tokens / train_time if train_time > 0 else 0.0, "train_time_s": train_time,
        "hinge_active_frac": sum(active) / len(active), "peak_memory_bytes": int(mx.get_peak_memory()),
        "final_loss": history[-1]["loss"], "final_kl_agg": history[-1]["kl_agg"],
        "n_ranks": n_ranks,
    }
    if n_ranks > 1:
        summary["allreduce_s"] = comm_time
    result = HealResult(lora.current_weights(model), n_layers, cfg, history, val_hist, summary)
    if out is not None and D.is_main():
        result.adapter_dir = save_adapter(out, result)
    return result


def _check_prev_used(model: nn.Module, prev: list[dict], paths: Iterable) -> None:
    adapted = {p for p, _ in lora.stacked_layers(model)}
    for rnd, path in zip(prev, paths):
        extra = sorted(set(rnd) - adapted)
        if extra:
            raise UserError(f"adapter {path} adapts {extra[0]}, outside this model's heal blocks; bake it into the model first")


def evaluate(model: nn.Module, switch: lora.LoRASwitch, examples: list[Example], cfg: HealConfig, batch_size: int | None = None) -> dict:
    """SFT (token-mean NLL, nats) and the KL aggregates (mean, rmse, p95, max, nats; float64)
    pooled over every completion position of ``examples``, student vs the configured reference."""
    nll, n, kls = 0.0, 0, []
    batches = micro_batches(examples, batch_size or cfg.batch_size, None)
    _, batches = D.shard(batches)  # data parallel: each rank scores its block of batches
    for batch in batches:
        ids, mask = collate(batch)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        with lora.lora_mode(switch, current=False, prev=cfg.ref == "prev"):
            ref_logits = model(inputs)
        with lora.lora_mode(switch, current=True, prev=True):
            logits = model(inputs)
        kl_t = kl_per_position(logits, ref_logits, cfg.kl)
        lp = ops.target_logprob(logits, targets)
        mx.eval(kl_t, lp)
        m = np.array(mask) > 0
        nll -= float(np.array(lp, dtype=np.float64)[m].sum())
        n += int(m.sum())
        kls.append(np.array(kl_t, dtype=np.float64)[m])
    if D.size() > 1:
        parts = D.gather_ordered([(nll, n, np.concatenate(kls) if kls else np.zeros(0))], [D.rank()], all_ranks=True, what="validation")
        nll, n, kls = sum(p[0] for p in parts), sum(p[1] for p in parts), [p[2] for p in parts]
    aggs = kl_aggregates(np.concatenate(kls) if kls else np.zeros(0))
    return {"sft": nll / max(n, 1), "tokens": n, **{f"kl_{k}": v for k, v in aggs.items() if k != "n"}}


# ----------------------------------------------------------------------------- save


def save_adapter(out: str | Path, result: HealResult, extra: dict | None = None) -> Path:
    """Write ``adapters.safetensors`` + ``adapter_config.json`` (mlx-lm's format: loadable by
    ``mlx_lm.utils.load(..., adapter_path=out)``, ``mlx_lm.generate --adapter-path``, ``mlx_lm.fuse``)
    and ``heal.json`` (settings, summary, per-step history) into ``out``, atomically: everything is
    written to a temporary sibling directory that replaces ``out`` in one rename."""
    cfg = result.config
    config = lora.adapter_config(result.n_layers, cfg.rank, cfg.scale)
    config["mlxgate"]["heal"] = {**asdict(cfg), "scale": cfg.scale}
    if extra:
        config["mlxgate"].update(extra)
    record = {"config": config["mlxgate"]["heal"], "summary": result.summary, "val": result.val, "history": result.history}
    with atomic_dir(out) as tmp:
        mx.save_safetensors(str(tmp / lora.ADAPTER_WEIGHTS), result.weights, metadata={"format": "mlx"})
        (tmp / lora.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / HEAL_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return Path(out)
