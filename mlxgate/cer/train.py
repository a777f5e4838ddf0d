"""Training the reactor with its entropy and mass terms as real, differentiable loss terms.

The original's trainer turned the entropy and the semantic mass into Python floats before adding
them to the loss (SPEC §7), so they contributed nothing to the gradient. Here both are computed on
the reactor's states as mx arrays: the entropy through :func:`mlxgate.ops.entropy` and its VJP.

Task (ships with the code, no data files): masked-symbol prediction on sequences from a known
first-order Markov chain over ``vocab = input_dim`` symbols, each symbol with ``successors``
possible next symbols (Dirichlet(1) probabilities, fixed by ``chain_seed``). Visible positions are
one-hot distributions; masked positions (a random subset of the odd positions, so both neighbours
are always visible) get the uniform distribution and are the only positions in the loss. The
attention is unmasked (SPEC §6), which is why the task is masked rather than next-symbol
prediction: a next-symbol target would be visible in the input. The Bayes-optimal prediction is
known in closed form, p(x_t | x_{t-1}, x_{t+1}) ∝ T[x_{t-1}, x_t] T[x_t, x_{t+1}], so the loss
floor is reported beside the loss.

loss = CE(masked positions) + entropy_weight * mean_steps (H_step - target)^2
       + mass_weight * 1 / (mean_steps mass + 1e-6)

H_step is the state entropy after control at each refinement step (nats); the mass term is the
original's "higher mass is better". Units: CE and H in nats.

The phase is reset to 0 before every training batch by default (each batch is an independent
experiment and evaluation also starts from phase 0); ``carry_phase=True`` lets it run on across
batches as the original's buffer did, which makes the modulation 1 + 0.3 sin(phase) drift between
0.7 and 1.3 from batch to batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxgate.io import atomic_path, write_json
from mlxgate.cer.model import BRAKE, ESCAPE, NONE, CERConfig, CoherentEntropyReactor
from mlxgate.errors import UserError
from mlxgate.ops import target_logprob

MASS_EPS = 1e-6  # the original's 1 / (mass + 1e-6)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch: int = 32
    seq: int = 16
    lr: float = 1e-4
    entropy_weight: float = 0.1  # the original TrainingConfig's defaults
    mass_weight: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 50
    eval_batch: int = 64
    successors: int = 4
    mask_rate: float = 0.5  # of the odd positions
    chain_seed: int = 1234
    carry_phase: bool = False  # False: reset the phase to 0 before every batch, as eval does


# ---------------------------------------------------------------------------------------------
# The synthetic task


def markov_chain(vocab: int, successors: int, seed: int) -> np.ndarray:
    """Transition matrix T [vocab, vocab] float64: each row has ``successors`` non-zero entries."""
    if not 1 <= successors <= vocab:
        raise UserError(f"successors must be between 1 and {vocab}, got {successors}")
    rng = np.random.default_rng(seed)
    t = np.zeros((vocab, vocab))
    for s in range(vocab):
        nxt = rng.choice(vocab, size=successors, replace=False)
        t[s, nxt] = rng.dirichlet(np.ones(successors))
    return t


@dataclass
class Batch:
    x: mx.array  # [batch, seq, vocab] float32 input distributions
    targets: mx.array  # [batch, seq] int32 true symbols
    mask: mx.array  # [batch, seq] float32, 1 at masked (scored) positions
    bayes_logp: np.ndarray = field(repr=False)  # [batch, seq] float64 log p*(true | neighbours)


def sample_batch(rng: np.random.Generator, t: np.ndarray, batch: int, seq: int, mask_rate: float) -> Batch:
    vocab = t.shape[0]
    cum = np.cumsum(t, axis=1)
    sym = np.empty((batch, seq), dtype=np.int64)
    sym[:, 0] = rng.integers(0, vocab, size=batch)
    for i in range(1, seq):
        u = rng.random(batch)[:, None]
        sym[:, i] = np.minimum((u > cum[sym[:, i - 1]]).sum(axis=1), vocab - 1)
    mask = np.zeros((batch, seq), dtype=bool)
    mask[:, 1::2] = rng.random((batch, len(range(1, seq, 2)))) < mask_rate
    x = np.eye(vocab, dtype=np.float32)[sym]
    x[mask] = 1.0 / vocab
    # Closed-form posterior at masked positions (neighbours are even positions, never masked).
    post = t[sym[:, :-1]]  # [batch, seq-1, vocab]: p(x_t | x_{t-1}) for t = 1..seq-1
    right = np.ones((batch, seq - 1, vocab))
    right[:, :-1] = t[:, sym[:, 2:]].transpose(1, 2, 0)  # T[x_t, x_{t+1}] as a function of x_t
    post = post * right
    post /= post.sum(axis=-1, keepdims=True)
    bayes = np.zeros((batch, seq))
    picked = np.take_along_axis(post, sym[:, 1:, None], axis=-1)[..., 0]
    bayes[:, 1:] = np.log(picked)
    return Batch(mx.array(x), mx.array(sym.astype(np.int32)), mx.array(mask.astype(np.float32)), bayes)


def bayes_ce(b: Batch) -> float:
    """The loss floor on this batch: mean -log p*(true) over masked positions, nats."""
    m = np.asarray(b.mask) > 0
    return float(-b.bayes_logp[m].mean()) if m.any() else float("nan")


# ---------------------------------------------------------------------------------------------
# Loss and evaluation


def loss_terms(model: CoherentEntropyReactor, b: Batch, tc: TrainConfig):
    """(loss, ce, entropy_term, mass_term, mean state H, mean mass, actions); all but the last
    are scalar arrays and differentiable with respect to the model's parameters."""
    out = model(b.x)
    n = mx.maximum(mx.sum(b.mask), 1.0)
    ce = -mx.sum(target_logprob(out.y, b.targets) * b.mask) / n
    target = model.config.target_entropy
    ent_term = mx.mean(mx.square(out.entropies - target))
    mass_term = 1.0 / (out.mass + MASS_EPS)
    loss = ce + tc.entropy_weight * ent_term + tc.mass_weight * mass_term
    actions = [s.action for s in out.trajectory]
    return loss, ce, ent_term, mass_term, mx.mean(out.entropies), out.mass, actions


def _count(actions: list[str]) -> dict[str, int]:
    return {a: actions.count(a) for a in (BRAKE, ESCAPE, NONE)}


def evaluate(model: CoherentEntropyReactor, b: Batch, tc: TrainConfig) -> dict:
    """Eval-mode metrics on a fixed batch, from phase 0; the model's phase and mode are restored."""
    was_training, phase = model.training, model.phase
    model.eval()
    model.reset_phase()
    try:
        out = model(b.x)
        n = mx.maximum(mx.sum(b.mask), 1.0)
        ce = (-mx.sum(target_logprob(out.y, b.targets) * b.mask) / n).item()
    finally:
        model.train(was_training)
        model.reset_phase(phase)
    target = model.config.target_entropy
    ents = [s.entropy for s in out.trajectory]
    return {
        "ce": ce,
        "bayes_ce": bayes_ce(b),
        "state_entropy_mean": float(np.mean(ents)),
        "state_entropy_last": ents[-1],
        "abs_gap_to_target": float(np.mean(np.abs(np.asarray(ents) - target))),
        "mass": out.mass.item(),
        "actions": _count([s.action for s in out.trajectory]),
        "step_entropies": ents,
    }


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(model: CoherentEntropyReactor, path: str | Path, extra: dict | None = None) -> None:
    """Parameters as safetensors; config, phase and ``extra`` as JSON strings in the metadata."""
    meta = {
        "format": "mlxgate-cer",
        "config": json.dumps(model.config.to_dict()),
        "phase": repr(model.phase),
        "extra": json.dumps(extra or {}),
    }
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    with atomic_path(path, suffix=".safetensors") as tmp:
        mx.save_safetensors(str(tmp), weights, metadata=meta)


def load_checkpoint(path: str | Path) -> CoherentEntropyReactor:
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as err:  # mlx raises RuntimeError/ValueError on a bad file
        raise UserError(f"cannot read CER checkpoint {path}: {err}") from None
    if meta.get("format") != "mlxgate-cer":
        raise UserError(f"{path} is not an mlxgate CER checkpoint (no format=mlxgate-cer metadata)")
    model = CoherentEntropyReactor(CERConfig(**json.loads(meta["config"])))
    model.update(tree_unflatten(list(weights.items())))
    model.reset_phase(float(meta["phase"]))
    return model


# ---------------------------------------------------------------------------------------------
# The loop


def train(
    tc: TrainConfig,
    rc: CERConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict, CoherentEntropyReactor]:
    """Train a fresh reactor on the Markov task; returns (log, model); the log is also written.

    out_dir gets ``train_log.json`` (rewritten at every eval) and ``cer.safetensors`` (at the end).
    Deterministic for a fixed ``tc.seed`` (weights, dropout, ESCAPE noise, data).
    """
    rc = rc or CERConfig()
    if rc.input_dim != rc.output_dim:
        raise UserError("the training task needs input_dim == output_dim (one symbol per dimension)")
    if tc.steps < 1 or tc.batch < 1 or tc.seq < 3:
        raise UserError("need steps >= 1, batch >= 1 and seq >= 3")
    mx.random.seed(tc.seed)
    model = CoherentEntropyReactor(rc)
    model.train()
    chain = markov_chain(rc.input_dim, tc.successors, tc.chain_seed)
    data_rng = np.random.default_rng(tc.seed)
    eval_batch = sample_batch(np.random.default_rng(tc.seed + 10_000), chain, tc.eval_batch, tc.seq, tc.mask_rate)
    opt = optim.Adam(learning_rate=tc.lr)

    def loss_fn(m, b):
        loss, ce, ent, mass_t, h, mass, _ = loss_terms(m, b, tc)
        return loss, (ce, ent, mass_t, h, mass)

    step_fn = nn.value_and_grad(model, loss_fn)
    log = {
        "task": {"kind": "masked-symbol Markov chain", "vocab": rc.input_dim, "successors": tc.successors,
                 "chain_seed": tc.chain_seed},
        "train_config": asdict(tc),
        "reactor_config": rc.to_dict(),
        "untrained": evaluate(model, eval_batch, tc),
        "history": [],
        "evals": [],
    }
    out = Path(out_dir) if out_dir else None

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("cer train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    t0 = time.perf_counter()
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=tc.steps, info="")
        for step in range(1, tc.steps + 1):
            b = sample_batch(data_rng, chain, tc.batch, tc.seq, tc.mask_rate)
            if not tc.carry_phase:
                model.reset_phase()
            (loss, (ce, ent, mass_t, h, mass)), grads = step_fn(model, b)
            grads, gnorm = optim.clip_grad_norm(grads, tc.grad_clip)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state, loss, gnorm)
            rec = {"step": step, "loss": loss.item(), "ce": ce.item(), "entropy_term": ent.item(),
                   "mass_term": mass_t.item(), "state_entropy": h.item(), "mass": mass.item(),
                   "grad_norm": gnorm.item(), "phase": model.phase}
            log["history"].append(rec)
            bar.update(task, advance=1, info=f"loss {rec['loss']:.3f} ce {rec['ce']:.3f} H {rec['state_entropy']:.2f}")
            if step % tc.eval_every == 0 or step == tc.steps:
                log["evals"].append({"step": step, **evaluate(model, eval_batch, tc)})
                if out:
                    write_json(out / "train_log.json", log)
    log["seconds"] = time.perf_counter() - t0
    log["final"] = log["evals"][-1]
    if out:
        save_checkpoint(model, out / "cer.safetensors", {"step": tc.steps, "train_config": asdict(tc)})
        write_json(out / "train_log.json", log)
    return log, model
