"""The Coherent Entropy Reactor (CER) as ``mlx.nn`` modules (SPEC §6).

Shapes: input ``x`` [batch, seq, input_dim] (each row a probability distribution), latent state
``z`` [batch, seq, hidden_dim], output ``y`` [batch, seq, output_dim] (logits). Entropies are in
nats; the state entropy H is one scalar: the softmax entropy of z over the hidden axis, averaged over
batch and positions (through :func:`mlxgate.ops.entropy`).

Per refinement step (2 blocks x 3 steps, weights shared within a block):

1. pre-LN block: z += MHA(LN(z)); z += FFN(LN(z))
2. Kuramoto: phase += 0.1 * K * sin(target - H(z)); z *= 1 + 0.3 * sin(phase)
3. control on the recomputed H: ESCAPE if H < target (z += N(0,1) * min(target - H, 2.0) * 0.1),
   BRAKE if H > target + 0.5 (z /= max(0.5, 1 - 0.1 * (H - target))), else none.
4. log layer, step, H after control, semantic mass mean(1 - sum p^2), phase, action, deficit
   (+min(target - H, 2) for ESCAPE, -(H - target) for BRAKE, 0 for none, all from the pre-control
   H), sum p and mean max p.

Parameter count with the defaults is 1,645,952, the same as the PyTorch original:

==============================  ===========================================  =========
encoder Linear(128, 256)        128*256 + 256                                   33,024
encoder LayerNorm(256)          256 + 256                                          512
per block (x2):
  LayerNorm x2                  2 * 512                                          1,024
  MHA in_proj (q, k, v fused)   3*256*256 + 3*256                              197,376
  MHA out_proj                  256*256 + 256                                   65,792
  FFN Linear(256, 1024)         256*1024 + 1024                                263,168
  FFN Linear(1024, 256)         1024*256 + 256                                 262,400
  block total                                                                  789,760
output Linear(256, 128)         256*128 + 128                                   32,896
total                           33,024 + 512 + 2*789,760 + 32,896            1,645,952
==============================  ===========================================  =========

No final LayerNorm. The phase is not a parameter (a private attribute, carried across calls).
Initialisation follows PyTorch's defaults so that the mirror-test statistics are comparable:
Linear U(+-1/sqrt(fan_in)) for weight and bias (MLX's default is the same), MHA in_proj Xavier-
uniform over the fused [3h, h] matrix with zero bias, out_proj bias zero, LayerNorm (1, 0).

Gradients through the controls (``control_grad``):

- ``"stop"`` (default): the control's coefficients (noise scale, brake divisor) are constants, so
  the backward pass sees ESCAPE as z + const and BRAKE as z * const. No gradient flows through the
  control's dependence on H: "controls do not pass gradients" (SPEC §6).
- ``"pass"``: the coefficients are differentiable functions of H (min/max clamps included).
- ``"detach"``: what the original's ``torch.no_grad()`` block literally did: whenever a control
  fires, the new z is cut from the graph, so nothing before it receives gradient.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from mlxgate.ops import entropy

# SPEC §6 constants (the original's hard-coded values are here with their names).
TARGET_ENTROPY = 3.0  # nats
KURAMOTO_K = 2.0
KURAMOTO_STEP = 0.1  # phase += KURAMOTO_STEP * K * sin(target - H)
MODULATION_AMPLITUDE = 0.3  # z *= 1 + A * sin(phase)
DRIFT_STRENGTH = 0.1  # ESCAPE noise scale per nat of deficit
MAX_DRIFT_DEFICIT = 2.0  # nats; ESCAPE deficit clamp
HYSTERESIS_MARGIN = 0.5  # nats above target before BRAKE
BRAKE_SLOPE = 0.1  # divisor = 1 - slope * excess
TEMPERATURE_FLOOR = 0.5  # divisor floor

NONE, ESCAPE, BRAKE = "none", "ESCAPE", "BRAKE"
CONTROL_GRAD_MODES = ("stop", "pass", "detach")


@dataclass(frozen=True)
class CERConfig:
    """Architecture and control constants; the defaults are SPEC §6."""

    input_dim: int = 128
    hidden_dim: int = 256
    output_dim: int = 128
    num_blocks: int = 2
    refinement_steps: int = 3
    num_heads: int = 4
    ffn_mult: int = 4
    dropout: float = 0.1
    kuramoto_k: float = KURAMOTO_K
    kuramoto_step: float = KURAMOTO_STEP
    modulation_amplitude: float = MODULATION_AMPLITUDE
    target_entropy: float = TARGET_ENTROPY
    drift_strength: float = DRIFT_STRENGTH
    max_drift_deficit: float = MAX_DRIFT_DEFICIT
    hysteresis_margin: float = HYSTERESIS_MARGIN
    brake_slope: float = BRAKE_SLOPE
    temperature_floor: float = TEMPERATURE_FLOOR
    control_grad: str = "stop"

    def __post_init__(self):
        if self.control_grad not in CONTROL_GRAD_MODES:
            raise ValueError(f"control_grad must be one of {CONTROL_GRAD_MODES}, got {self.control_grad!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Measurements and the control law (plain functions: unit-testable on hand-built states)


def state_entropy(z: mx.array) -> mx.array:
    """Mean softmax entropy of z over its last axis, nats. [..., hidden] -> scalar float32."""
    return mx.mean(entropy(z))


def semantic_mass(z: mx.array) -> mx.array:
    """mean(1 - sum p^2), p = softmax(z) over the last axis. [..., hidden] -> scalar float32.

    0 for a one-hot p, 1 - 1/K for a uniform p over K entries (the CER "Fisher proxy").
    """
    p = mx.softmax(z.astype(mx.float32), axis=-1)
    return mx.mean(1.0 - mx.sum(p * p, axis=-1))


def phase_update(phase, h, cfg: CERConfig = CERConfig()):
    """phase + step * K * sin(target - H) (radians); works on floats and mx arrays."""
    sin = mx.sin if isinstance(h, mx.array) or isinstance(phase, mx.array) else math.sin
    return phase + cfg.kuramoto_step * cfg.kuramoto_k * sin(cfg.target_entropy - h)


def control_decision(h: float, cfg: CERConfig = CERConfig()) -> tuple[str, float, float]:
    """Which control fires for a pre-control state entropy ``h`` (nats).

    Returns (action, deficit, coefficient): for ESCAPE the noise scale min(target - H, max) *
    strength and deficit = min(target - H, max) > 0; for BRAKE the divisor
    max(floor, 1 - slope * (H - target)) and deficit = -(H - target) < 0; for none (NONE, 0, 1).
    """
    target = cfg.target_entropy
    if h < target:
        deficit = min(target - h, cfg.max_drift_deficit)
        return ESCAPE, deficit, deficit * cfg.drift_strength
    if h > target + cfg.hysteresis_margin:
        excess = h - target
        return BRAKE, -excess, max(cfg.temperature_floor, 1.0 - cfg.brake_slope * excess)
    return NONE, 0.0, 1.0


def apply_control(
    z: mx.array, h: mx.array, cfg: CERConfig = CERConfig(), noise: mx.array | None = None
) -> tuple[mx.array, str, float]:
    """Apply ESCAPE / BRAKE / none to z given its pre-control entropy ``h`` (scalar array).

    ``noise`` (same shape as z) replaces the N(0,1) draw, for tests. Returns (z', action, deficit).
    """
    action, deficit, coef = control_decision(h.item(), cfg)
    if action == NONE:
        return z, action, deficit
    if cfg.control_grad == "pass":
        target = cfg.target_entropy
        if action == ESCAPE:
            coef = mx.minimum(target - h, cfg.max_drift_deficit) * cfg.drift_strength
        else:
            coef = mx.maximum(cfg.temperature_floor, 1.0 - cfg.brake_slope * (h - target))
    if action == ESCAPE:
        if noise is None:
            noise = mx.random.normal(z.shape, dtype=z.dtype)
        out = z + noise * coef
    else:
        out = z / coef
    if cfg.control_grad == "detach":
        out = mx.stop_gradient(out)
    return out, action, deficit


# ---------------------------------------------------------------------------------------------
# Modules


class SelfAttention(nn.Module):
    """Unmasked multi-head self-attention laid out like torch's nn.MultiheadAttention.

    Written out (not mx.fast.scaled_dot_product_attention) because the original applies dropout to
    the attention weights. [batch, seq, dims] -> [batch, seq, dims].
    """

    def __init__(self, dims: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj = nn.Linear(dims, 3 * dims)
        self.out_proj = nn.Linear(dims, dims)
        bound = math.sqrt(6.0 / (dims + 3 * dims))  # xavier_uniform on the fused [3d, d] weight
        self.in_proj.weight = mx.random.uniform(-bound, bound, (3 * dims, dims))
        self.in_proj.bias = mx.zeros((3 * dims,))
        self.out_proj.bias = mx.zeros((dims,))
        self.attn_dropout = nn.Dropout(dropout)

    def __call__(self, x: mx.array) -> mx.array:
        b, s, d = x.shape
        h = self.num_heads
        q, k, v = mx.split(self.in_proj(x), 3, axis=-1)
        q, k, v = (t.reshape(b, s, h, d // h).transpose(0, 2, 1, 3) for t in (q, k, v))
        scores = (q * (d // h) ** -0.5) @ k.transpose(0, 1, 3, 2)
        weights = self.attn_dropout(mx.softmax(scores, axis=-1))
        out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, s, d)
        return self.out_proj(out)


class RefinementBlock(nn.Module):
    """Pre-LN transformer block: z + MHA(LN z), then + FFN(LN z). [batch, seq, hidden]."""

    def __init__(self, dims: int, num_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dims)
        self.attn = SelfAttention(dims, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dims)
        # Dropout after GELU and after the second Linear, as in the original's nn.Sequential.
        self.ffn = nn.Sequential(
            nn.Linear(dims, ffn_mult * dims),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_mult * dims, dims),
            nn.Dropout(dropout),
        )

    def __call__(self, z: mx.array) -> mx.array:
        z = z + self.attn(self.norm1(z))
        return z + self.ffn(self.norm2(z))


class Encoder(nn.Module):
    """LayerNorm(Linear(x)): [batch, seq, input_dim] distributions -> [batch, seq, hidden]."""

    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.norm(self.proj(x))


@dataclass(frozen=True)
class StepLog:
    """One refinement step. Entropies in nats; phase in radians; deficit from the pre-control H."""

    layer: int
    step: int
    entropy: float  # state entropy after control
    mass: float  # mean(1 - sum p^2) after control
    phase: float
    action: str  # ESCAPE | BRAKE | none
    deficit: float
    sum_p: float
    max_p: float  # mean over positions of max_i p_i


class ReactorOutput(NamedTuple):
    """What one reactor call returns.

    y: [batch, seq, output_dim] logits. mass: scalar, mean semantic mass over the steps.
    entropies, masses: [n_steps] differentiable state entropy (nats) and mass after control.
    trajectory: one :class:`StepLog` per step (plain floats).
    """

    y: mx.array
    mass: mx.array
    entropies: mx.array
    masses: mx.array
    trajectory: list[StepLog]


class CoherentEntropyReactor(nn.Module):
    """The reactor. Call it on [batch, seq, input_dim]; see the module docstring for the step.

    The Kuramoto phase is a scalar carried across calls (a private attribute, not a parameter and
    not differentiated across calls); :meth:`reset_phase` sets it, per experiment. Dropout is
    active in ``train()`` mode (the default of a new module, as in PyTorch), off in ``eval()``.
    """

    def __init__(self, config: CERConfig | None = None, **overrides):
        super().__init__()
        cfg = config or CERConfig()
        if overrides:
            cfg = CERConfig(**{**cfg.to_dict(), **overrides})
        self.config = cfg
        self.encoder = Encoder(cfg.input_dim, cfg.hidden_dim)
        self.blocks = [
            RefinementBlock(cfg.hidden_dim, cfg.num_heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.num_blocks)
        ]
        self.output_proj = nn.Linear(cfg.hidden_dim, cfg.output_dim)
        self._phase = mx.array(0.0)

    @property
    def phase(self) -> float:
        return self._phase.item()

    def reset_phase(self, value: float = 0.0) -> None:
        self._phase = mx.array(float(value))

    def __call__(self, x: mx.array) -> ReactorOutput:
        cfg = self.config
        z = self.encoder(x)
        phase = self._phase
        ents, masses, log = [], [], []
        for layer, block in enumerate(self.blocks):
            for step in range(cfg.refinement_steps):
                z = block(z)
                phase = phase_update(phase, state_entropy(z), cfg)
                z = z * (1.0 + cfg.modulation_amplitude * mx.sin(phase))
                z, action, deficit = apply_control(z, state_entropy(z), cfg)
                h, m = state_entropy(z), semantic_mass(z)
                p = mx.softmax(z.astype(mx.float32), axis=-1)
                sum_p, max_p = mx.mean(mx.sum(p, axis=-1)), mx.mean(mx.max(p, axis=-1))
                mx.eval(h, m, phase, sum_p, max_p)
                ents.append(h)
                masses.append(m)
                log.append(StepLog(layer, step, h.item(), m.item(), phase.item(), action, deficit,
                                   sum_p.item(), max_p.item()))
        self._phase = mx.stop_gradient(phase)
        y = self.output_proj(z)
        masses_arr = mx.stack(masses)
        return ReactorOutput(y, mx.mean(masses_arr), mx.stack(ents), masses_arr, log)


def count_parameters(model: nn.Module) -> int:
    """Number of scalars in the model's parameters (the phase is not one)."""
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))
