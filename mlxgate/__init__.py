"""mlxgate: measure and steer language models with MLX.

Importing the package loads OpenBLAS before ``mlx.core`` (SPEC §1); keep this first.
"""

from mlxgate import _blas

_blas.load_openblas()

__version__ = "0.1.0"
