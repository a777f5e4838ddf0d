"""Real-model numbers for the steering half of issue 7 (SmolLM2-135M-Instruct, CPU-sized).

Extracts the SPEC §5.1 care-over-authority vector from N contexts, prints ‖v_L‖ and the residual
norm per layer, the projection of the hidden state onto v̂ vs C (at the last steered block and 3
blocks downstream), then a small walk-C + collect (short completions) to show the filter's yield.
Run: .venv/bin/python bench/steer_smollm.py [N_CONTEXTS] [MAX_TOKENS]
"""

import json
import sys
import time

import mlxgate  # noqa: F401

from mlxgate.models import load
from mlxgate.prompts import prompt_ids
from mlxgate.steer import collect as K
from mlxgate.steer import control as S
from mlxgate.steer import extract as E


def main(n_ctx: int = 64, max_tokens: int = 48) -> None:
    model, tok, info = load("smollm2-135m-instruct")
    ctx = E.load_contexts(None, n_ctx)
    t = time.time()
    sv = E.extract(model, tok, ctx, E.default_layers(info.n_layers), info=info)
    print(f"extract: {n_ctx} contexts, layers {sv.layers}, {time.time() - t:.1f}s")
    print(json.dumps(E.summary(sv), indent=1))
    ids = [prompt_ids(tok, c) for c in E.load_contexts(None, 8)]
    last = sv.layers[-1]
    for c in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        at = S.mean_projection(model, sv, c, ids, last)
        down = S.mean_projection(model, sv, c, ids, last + 3, direction=last)
        dose = max(d for d in S.relative_dose(sv, c).values())
        print(f"C={c:<5} proj@L{last}={at:8.2f}  proj@L{last + 3}={down:8.2f}  max |Cv|/|h|={dose:.3f}")
    t = time.time()
    try:
        res = K.settle_and_collect(
            model, tok, sv, E.default_contexts(), n_keep=8, min_keep=4, max_tokens=max_tokens, seed=0,
            on_event=lambda e: print(e["stage"], {k: e[k] for k in e if k in ("kappa", "pass_rate", "kept", "dropped", "steps")}),
        )
        print(f"collect: κ={res.kappa:.3f} kept {len(res.kept)} dropped {len(res.dropped)} in {time.time() - t:.0f}s")
        rows = res.kept[:2] + res.dropped[:3]
    except K.CollectError as err:
        print("collect failed:", err)
        rows = err.result.dropped[:3]
    reasons = {}
    for r in (res.probes + res.kept + res.dropped) if "res" in dir() else []:
        for x in r.get("reason", "kept").split("; "):
            reasons[x.split(":")[0]] = reasons.get(x.split(":")[0], 0) + 1
    print("probe + batch outcomes (a drop counts once per failed check):", reasons)
    for r in rows:
        print(json.dumps({k: r.get(k) for k in ("prompt", "completion", "coeff", "reason")})[:400])


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
