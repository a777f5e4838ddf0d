"""Commutation cost of the reactor: does perturbing before or after the forward pass matter?

Two quantities on the same pair of distributions, both over the flattened output (all
batch x seq x output_dim logits as one softmax, as the original did), in nats:

- ``entropy_difference``: |H(softmax(P(S(x)))) - H(softmax(S(P(x))))|, exactly the CER code's
  "commutation cost" (SPEC §6). It is a difference of two entropies, not a divergence: two very
  different distributions with equal entropy score 0.
- ``symmetric_kl``: KL(A||B) + KL(B||A) (Jeffreys divergence) between A = softmax(P(S(x))) and
  B = softmax(S(P(x))), through :func:`mlxgate.ops.kl`. Zero only if A == B.

P(v) = v + epsilon * N(0, 1). As in the original, the model runs in eval mode (no dropout) and the
clean pass runs first, so the perturbed pass starts from the phase the clean pass left (the phase
is carried state); ``same_phase=True`` starts both passes from the same phase instead.
"""

from __future__ import annotations

import mlx.core as mx

from mlxgate.cer.model import CoherentEntropyReactor
from mlxgate.ops import entropy, kl

EPSILON = 0.1  # perturbation std (SPEC §6)


def commutation_cost(
    reactor: CoherentEntropyReactor, x: mx.array, epsilon: float = EPSILON, same_phase: bool = False
) -> dict[str, float]:
    """Both commutation measures for input x [batch, seq, input_dim]; see the module docstring.

    Returns {"entropy_difference", "symmetric_kl", "entropy_perturb_after", "entropy_perturb_before"}
    (nats). Restores the reactor's train/eval mode afterwards.
    """
    was_training = reactor.training
    reactor.eval()
    try:
        start_phase = reactor.phase
        y_clean = reactor(x).y
        a = (y_clean + epsilon * mx.random.normal(y_clean.shape)).reshape(-1)
        if same_phase:
            reactor.reset_phase(start_phase)
        x_pert = x + epsilon * mx.random.normal(x.shape)
        b = reactor(x_pert).y.reshape(-1)
        h_a, h_b = entropy(a), entropy(b)
        sym = kl(a, b) + kl(b, a)
        mx.eval(h_a, h_b, sym)
    finally:
        reactor.train(was_training)
    return {
        "entropy_difference": abs(h_a.item() - h_b.item()),
        "symmetric_kl": sym.item(),
        "entropy_perturb_after": h_a.item(),
        "entropy_perturb_before": h_b.item(),
    }
