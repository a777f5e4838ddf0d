"""Coherent Entropy Reactor (SPEC §6): the reactor, its mirror test, commutation cost, training.

- :mod:`mlxgate.cer.model`: ``CoherentEntropyReactor``, ``CERConfig``, the control law.
- :mod:`mlxgate.cer.mirror`: PEAKED / UNIFORM / RANDOM mirror test against the published table.
- :mod:`mlxgate.cer.commutation`: the original's entropy-difference "commutation cost" and a
  symmetric KL beside it.
- :mod:`mlxgate.cer.train`: training with differentiable entropy and mass terms.
"""

from mlxgate.cer.model import CERConfig, CoherentEntropyReactor, ReactorOutput, StepLog, count_parameters

__all__ = ["CERConfig", "CoherentEntropyReactor", "ReactorOutput", "StepLog", "count_parameters"]
