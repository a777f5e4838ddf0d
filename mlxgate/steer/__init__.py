"""Steering vectors (SPEC §5.1-§5.2), split as in repeng: extraction apart from control.

- :mod:`~mlxgate.steer.extract`: persona-pair mean-difference vectors at the assistant tag; file I/O.
- :mod:`~mlxgate.steer.control`: steered, batched, KV-cached generation (C·v added at every position).
- :mod:`~mlxgate.steer.walk`: walk-C dose control as a pure function of a pass-rate oracle.
- :mod:`~mlxgate.steer.collect`: walk-C + generation + filter -> kept/dropped rows for heal.

The submodules are the API (``from mlxgate.steer import extract as E; E.extract(...)``); the
names below are the common entry points under names that do not shadow a submodule.
"""

from mlxgate.steer.control import mean_projection, parse_coeff, relative_dose, steered_generate
from mlxgate.steer.extract import DEFAULT_NEG, DEFAULT_POS, SteeringVector, check_compatible, default_layers
from mlxgate.steer.extract import extract as extract_vector
from mlxgate.steer.extract import load as load_vector
from mlxgate.steer.extract import save as save_vector
from mlxgate.steer.walk import WalkResult, walk_c

__all__ = [
    "DEFAULT_NEG",
    "DEFAULT_POS",
    "SteeringVector",
    "WalkResult",
    "check_compatible",
    "default_layers",
    "extract_vector",
    "load_vector",
    "mean_projection",
    "parse_coeff",
    "relative_dose",
    "save_vector",
    "steered_generate",
    "walk_c",
]
