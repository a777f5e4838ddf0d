"""Helper for tests/test_distributed.py: 5 heal steps on a tiny fixture, single process or one rank
of ``mlx.launch``. Usage: heal_dp.py FIXTURE_DIR OUT_PREFIX AGG COMPILE(0|1) [DIE_RANK DIE_STEP]

Writes OUT_PREFIX.rank{r}.safetensors (this rank's final adapter weights) and, on rank 0,
OUT_PREFIX.json (history: kl_agg, loss per step; summary). DIE_RANK/DIE_STEP: that rank
SIGKILLs itself after that many micro-steps (the dead-peer test)."""

import json
import os
import signal
import sys

import mlxgate  # noqa: F401

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlxgate import distributed as D  # noqa: E402
from mlxgate import heal as H  # noqa: E402
from mlxgate.models import load  # noqa: E402


def records(n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    words = ["red", "blue", "green", "gold", "grey", "a very long and winding colour"]
    out = []
    for i in range(n):
        w = words[int(rng.integers(len(words)))]
        out.append({"prompt": f"colour {i}?", "completion": f"It is {w}. " * int(rng.integers(1, 4))})
    return out


def main() -> None:
    fixture, prefix, agg, comp = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    die_rank, die_step = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (-1, -1)
    model, tok, _ = load(fixture)
    ex, _ = H.make_examples(tok, records(17))
    # 17 examples, global micro-batch 4 -> groups 4,4,4,4,1: 5 steps; the 1-row group leaves rank 1
    # of 2 without rows (it still joins the collectives with zero weights).
    cfg = H.HealConfig(epochs=1 if die_rank < 0 else 40, batch_size=4, grad_accum=1, val_frac=0.0, lr=2e-3, rank=4, alpha=8,
                       seed=0, agg=agg, tau=0.0, lam=0.5, compile=comp)

    def on_step(rec):
        if D.rank() == die_rank and rec["step"] == die_step:
            os.kill(os.getpid(), signal.SIGKILL)

    res = H.heal(model, tok, ex, cfg, on_step=on_step, out=prefix + ".adapter")
    mx.save_safetensors(f"{prefix}.rank{D.rank()}.safetensors", res.weights)
    if D.is_main():
        json.dump({"history": res.history, "summary": res.summary}, open(prefix + ".json", "w"))


if __name__ == "__main__":
    main()
